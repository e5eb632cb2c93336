"""The Kubetune Grafana dashboard, built with grafana-foundation-sdk.

Three sections: a fleet view from the operator's metrics (jobs by phase, queue, GPUs in use, failures,
reconciles), a per-job view from the trainer's metrics, chosen with the `finetunejob` variable, and a per-sweep
view (trials, the best so far, each trial's validation curve), chosen with the `sweep` variable.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import prometheus as prom_b
from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.builders import table as table_b
from grafana_foundation_sdk.builders import timeseries as ts_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    DataTransformerConfig,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

UID = "kubetune"
TITLE = "Kubetune"
DATASOURCE_VAR = "datasource"
JOB_VAR = "finetunejob"
SWEEP_VAR = "sweep"

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${" + DATASOURCE_VAR + "}")
JOB = f'finetunejob="${JOB_VAR}"'
TEST_SPLIT = ', split="test"'
# the validation panel leaves out counts, and perplexity, whose scale would flatten the rest
VALIDATION_SHOWN = ', split="validation", model="finetuned", metric!~"tokens|samples|generated|perplexity"'
QUALITY = "kubetune_operator_finetunejob_data_quality_findings"
SWEEP = f'sweep="${SWEEP_VAR}"'
TRIALS = 'finetunejob=~"${' + SWEEP_VAR + '}-[0-9]+"'  # a sweep's trials are the FineTuneJobs <sweep>-<n>


@dataclass(frozen=True)
class Query:
    """One panel query: what a test runs against a real Prometheus."""

    panel: str
    expr: str
    legend: str = ""


def _target(query: Query, ref_id: str) -> prom_b.Dataquery:
    target = prom_b.Dataquery().expr(query.expr).ref_id(ref_id).datasource(DATASOURCE)
    return target.legend_format(query.legend or "__auto")


def _with_targets(panel, queries: list[Query], description: str):
    if description:
        panel = panel.description(description)
    for i, query in enumerate(queries):
        panel = panel.with_target(_target(query, chr(ord("A") + i)))
    return panel


def _stat(title: str, queries: list[Query], unit: str = "short", width: int = 4, description: str = "",
          text_mode: common.BigValueTextMode = common.BigValueTextMode.AUTO):
    panel = (
        stat_b.Panel()
        .title(title)
        .datasource(DATASOURCE)
        .text_mode(text_mode)
        .unit(unit)
        .height(4)
        .span(width)
        .graph_mode(common.BigValueGraphMode.AREA)
        .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]))
    )
    return _with_targets(panel, queries, description)


def _timeseries(title: str, queries: list[Query], unit: str = "short", width: int = 12,
                description: str = ""):
    panel = (
        ts_b.Panel()
        .title(title)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(width)
        .line_width(1)
        .fill_opacity(10)
        .legend(common_b.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST).placement(
            common.LegendPlacement.BOTTOM).show_legend(True))
    )
    return _with_targets(panel, queries, description)


def _table(title: str, query: Query, rows: str, columns: str, width: int = 12, description: str = "",
           decimals: int = 4):
    """The latest value of each series of an instant query, as a matrix: a row per `rows` label value, a column
    per `columns` label value."""
    target = _target(query, "A").instant().format(PromQueryFormat.TABLE)
    panel = (
        table_b.Panel()
        .title(title)
        .datasource(DATASOURCE)
        .height(8)
        .span(width)
        .decimals(decimals)
        .show_header(True)
        .with_target(target)
        .with_transformation(DataTransformerConfig(id_val="groupingToMatrix", options={
            "rowField": rows, "columnField": columns, "valueField": "Value", "emptyValue": "null"}))
    )
    return panel.description(description) if description else panel


def _q(panel: str, expr: str, legend: str = "") -> Query:
    return Query(panel=panel, expr=expr, legend=legend)


def _fleet_panels() -> list:
    def phase(p: str) -> str:
        return f'max(kubetune_operator_finetunejobs{{phase="{p}"}})'

    return [
        _stat("Running jobs", [_q("Running jobs", phase("Running"))]),
        _stat("Queued jobs", [_q("Queued jobs", phase("Queued"))],
              description="Jobs waiting for GPUs"),
        _stat("Pending / validating", [
            _q("Pending / validating", phase("Pending"), "Pending"),
            _q("Pending / validating", phase("Validating"), "Validating"),
        ], text_mode=common.BigValueTextMode.VALUE_AND_NAME),
        _stat("GPUs in use", [_q("GPUs in use", "max(kubetune_operator_gpus_in_use)")]),
        _stat("Succeeded", [_q("Succeeded", phase("Succeeded"))]),
        _stat("Failed", [_q("Failed", phase("Failed"))]),
        _timeseries("Jobs by phase", [
            _q("Jobs by phase", "max by (phase) (kubetune_operator_finetunejobs)", "{{phase}}"),
        ], width=8),
        _timeseries("Failures by reason", [
            _q("Failures by reason",
               "sum by (reason) (increase(kubetune_operator_finetunejob_failures_total[$__rate_interval]))",
               "{{reason}}"),
        ], width=8),
        _timeseries("Attempts ended by kind", [
            _q("Attempts ended by kind",
               "sum by (kind) (increase(kubetune_operator_finetunejob_attempts_ended_total[$__rate_interval]))",
               "{{kind}}"),
        ], width=8, description="Training attempts ended by an incident (each is followed by a new training Job, "
                                "within runPolicy's budget of its kind): preemptions, infrastructure, failures"),
        _timeseries("Progress of running jobs", [
            _q("Progress of running jobs", "max by (finetunejob) (kubetune_trainer_progress_ratio)",
               "{{finetunejob}}"),
        ], unit="percentunit", width=8),
        _timeseries("Reconciles by handler", [
            _q("Reconciles by handler",
               "sum by (handler) (rate(kubetune_operator_reconciles_total[$__rate_interval]))",
               "{{handler}}"),
            _q("Reconciles by handler",
               "sum by (handler) (rate(kubetune_operator_reconcile_errors_total[$__rate_interval]))",
               "{{handler}} errors"),
        ], unit="ops"),
        _table("Data quality by job", _q(
            "Data quality by job",
            # a row per FineTuneJob (namespace/name), a column per check, the splits added up
            "label_join(sum by (finetunejob_namespace, finetunejob, check) (max by (finetunejob_namespace, "
            f'finetunejob, check, split) ({QUALITY})), "ftj", "/", "finetunejob_namespace", "finetunejob")',
        ), rows="ftj", columns="check", width=24, decimals=0,
            description="What each validated job's data-quality checks found (status.dataset.quality), all splits "
                        "together: duplicates, leakage (exact, near), personal data by kind, label conflicts and "
                        "suspected label errors, rare and unseen classes, and the records dropped"),
        _timeseries("Reconcile duration p95", [
            _q("Reconcile duration p95",
               "histogram_quantile(0.95, sum by (le, handler) "
               "(rate(kubetune_operator_reconcile_duration_seconds_bucket[$__rate_interval])))",
               "{{handler}}"),
        ], unit="s"),
    ]


def _job_panels() -> list:
    def m(name: str, extra: str = "") -> str:
        return f"kubetune_trainer_{name}{{{JOB}{extra}}}"

    return [
        _stat("Phase", [_q("Phase", f"max by (phase) ({m('phase')}) == 1", "{{phase}}")],
              description="downloading, validating, training, evaluating, uploading, done",
              text_mode=common.BigValueTextMode.NAME),
        _stat("Progress", [_q("Progress", f"max({m('progress_ratio')})")], unit="percentunit"),
        _stat("ETA", [_q("ETA", f"max({m('eta_seconds')})")], unit="s"),
        _stat("Step", [
            _q("Step", f"max({m('step')})", "step"),
            _q("Step", f"max({m('total_steps')})", "total"),
        ], text_mode=common.BigValueTextMode.VALUE_AND_NAME),
        _stat("Epoch", [_q("Epoch", f"max({m('epoch')})")]),
        _stat("Checkpoint age", [
            _q("Checkpoint age", f"time() - max({m('last_checkpoint_timestamp_seconds')})"),
        ], unit="s", description="Time since the last checkpoint was saved"),
        _timeseries("Loss", [
            _q("Loss", f"max({m('train_loss')})", "train"),
            _q("Loss", f"max({m('validation_loss')})", "validation"),
        ]),
        _timeseries("Learning rate", [_q("Learning rate", f"max({m('learning_rate')})", "learning rate")]),
        _timeseries("Throughput", [
            _q("Throughput", f"max({m('tokens_per_second')})", "tokens/s"),
            _q("Throughput", f"max({m('samples_per_second')})", "samples/s"),
        ]),
        _timeseries("Gradient norm", [_q("Gradient norm", f"max({m('grad_norm')})", "grad norm")]),
        _timeseries("Objective metrics", [
            _q("Objective metrics", f"max by (metric) ({m('train_metric')})", "{{metric}}"),
        ], description="Preference tuning (objective dpo, orpo) over each logging window: rewards_accuracy, "
                       "rewards_margin, rewards_chosen, rewards_rejected, logps; empty for sft"),
        _timeseries("GPU memory used", [
            _q("GPU memory used", f"max by (gpu) ({m('gpu_memory_used_bytes')})", "GPU {{gpu}}"),
        ], unit="bytes"),
        _timeseries("GPU utilization", [
            _q("GPU utilization", f"max by (gpu) ({m('gpu_utilization_ratio')})", "GPU {{gpu}}"),
        ], unit="percentunit"),
        _stat("Tokens trained", [_q("Tokens trained", f"max({m('tokens_trained_total')})")], width=6),
        _stat("Checkpoints", [_q("Checkpoints", f"max({m('checkpoints_total')})")], width=6),
        _stat("Model", [
            _q("Model", f"max by (method, base_model) ({m('info')})", "{{method}} on {{base_model}}"),
        ], width=12, text_mode=common.BigValueTextMode.NAME),
        _table("Test metrics: fine-tuned vs baseline", _q(
            "Test metrics: fine-tuned vs baseline",
            # the operator keeps the result for as long as the FineTuneJob exists; the trainer serves it until
            # it exits, before the operator has seen the job succeed
            f"max by (metric, model) (kubetune_operator_finetunejob_test_metric{{{JOB}}}) "
            f"or max by (metric, model) ({m('evaluation', TEST_SPLIT)})",
        ), rows="metric", columns="model",
            description="The test split on the fine-tuned model and on the base model before fine-tuning "
                        "(evaluation.baseline); per-class scores are in the manifest"),
        _table("Data quality", _q(
            "Data quality", f"max by (check, split) ({QUALITY}{{{JOB}}})",
        ), rows="check", columns="split", decimals=0,
            description="What the validation's data-quality checks found in each split (status.dataset.quality); "
                        "the lines are in `kubetune validate --json`"),
        _timeseries("Validation metrics", [
            _q("Validation metrics", f"max by (metric) ({m('evaluation', VALIDATION_SHOWN)})", "{{metric}}"),
        ], description="The validation split at each evaluation (evaluation.everySteps): loss, and for "
                       "classification accuracy and F1"),
    ]


def _sweep_panels() -> list:
    def m(name: str) -> str:
        return f"kubetune_operator_finetunesweep_{name}{{{SWEEP}}}"

    return [
        _timeseries("Trials by phase", [
            _q("Trials by phase", f"max by (phase) ({m('trials')})", "{{phase}}"),
        ], width=8, description="The sweep's trials over time: Pending, Running, Succeeded, Pruned (stopped early) "
                                "and Failed"),
        _timeseries("Best so far", [
            _q("Best so far", f"max by (metric) ({m('best_metric')})", "best {{metric}}"),
        ], width=8, description="The best trial's objective metric on the validation split (status.best)"),
        _timeseries("GPU-hours", [
            _q("GPU-hours", f"max by (kind) ({m('gpu_hours')})", "{{kind}}"),
        ], width=8, description="GPU-hours the trials used; with spec.budget.gpuHours, the budget and what is left"),
        _timeseries("Trial validation curves", [
            # each trial's trainer series of the metric the sweep judges on (the objective's `metric` label)
            _q("Trial validation curves",
               f'max by (finetunejob) (kubetune_trainer_evaluation{{{TRIALS}, split="validation", '
               f'model="finetuned"}} * on (metric) group_left () max by (metric) ({m("objective")}))',
               "{{finetunejob}}"),
        ], width=24, description="Each trial's objective metric on the validation split at each evaluation "
                                 "(evaluation.everySteps), from its trainer; a pruned trial's curve stops early"),
    ]


def build() -> dict:
    """The dashboard as a Grafana JSON model (a dict)."""
    datasource = dash_b.DatasourceVariable(DATASOURCE_VAR).label("Data source").type("prometheus")
    job = (
        dash_b.QueryVariable(JOB_VAR)
        .label("FineTuneJob")
        .datasource(DATASOURCE)
        .query(f"label_values(kubetune_trainer_info, {JOB_VAR})")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
    )
    sweep = (
        dash_b.QueryVariable(SWEEP_VAR)
        .label("FineTuneSweep")
        .datasource(DATASOURCE)
        .query(f"label_values(kubetune_operator_finetunesweep_trials, {SWEEP_VAR})")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
    )
    builder = (
        dash_b.Dashboard(TITLE)
        .uid(UID)
        .description("Kubetune fine-tuning: the operator's fleet and one FineTuneJob's training run")
        .tags(["kubetune", "fine-tuning"])
        .editable()
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(datasource)
        .with_variable(job)
        .with_variable(sweep)
        .with_row(dash_b.Row("Fleet"))
    )
    for panel in _fleet_panels():
        builder = builder.with_panel(panel)
    builder = builder.with_row(dash_b.Row(f"FineTuneJob ${JOB_VAR}"))
    for panel in _job_panels():
        builder = builder.with_panel(panel)
    builder = builder.with_row(dash_b.Row("Sweeps"))
    for panel in _sweep_panels():
        builder = builder.with_panel(panel)
    model = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    for panel_id, panel in enumerate(model["panels"], start=1):
        panel["id"] = panel_id
    return model


def to_json() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def panel_queries(model: dict | None = None) -> list[Query]:
    """Every query of every panel, in order (rows included)."""
    model = build() if model is None else model
    queries = []
    for panel in model.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                queries.append(
                    Query(inner.get("title", ""), target.get("expr", ""), target.get("legendFormat", ""))
                )
    return queries


def substitute(expr: str, finetunejob: str, rate_interval: str = "1m", sweep: str = "sweep") -> str:
    """An expression with the dashboard variables replaced, ready for the Prometheus query API."""
    expr = expr.replace("$__rate_interval", rate_interval)
    expr = re.sub(r"\$\{?" + SWEEP_VAR + r"\}?", sweep, expr)
    return re.sub(r"\$\{?" + JOB_VAR + r"\}?", finetunejob, expr)
