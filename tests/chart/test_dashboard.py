"""The Grafana dashboard: generated from code, every panel queries something, the variables exist, and every
query is valid PromQL (checked by promtool as recording rules)."""

from __future__ import annotations

import json
import re
import time

import pytest
import yaml
from kubetune_dashboard import panel_queries, substitute, to_json

from tests.chart.conftest import CHART, Prometheus, run, tool

DASHBOARD = CHART / "dashboards" / "kubetune.json"


def _model() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(model: dict) -> list[dict]:
    panels = []
    for panel in model["panels"]:
        panels += [panel, *panel.get("panels", [])]
    return [p for p in panels if p["type"] != "row"]


def test_chart_dashboard_is_the_generated_one():
    assert DASHBOARD.read_text() == to_json(), "run `make dashboard`"


def test_variables_exist():
    variables = {v["name"]: v for v in _model()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    job = variables["finetunejob"]
    assert job["type"] == "query" and "label_values(kubetune_trainer_info, finetunejob)" in str(job["query"])
    sweep = variables["sweep"]
    assert sweep["type"] == "query"
    assert "label_values(kubetune_operator_finetunesweep_trials, sweep)" in str(sweep["query"])


def test_every_panel_has_a_query_and_a_unique_id():
    model = _model()
    panels = _panels(model)
    assert len(panels) >= 20
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r} has an empty query"
            assert target["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))


def test_fleet_and_job_views_cover_the_metrics():
    exprs = " ".join(q.expr for q in panel_queries(_model()))
    for metric in ("kubetune_operator_finetunejobs", "kubetune_operator_gpus_in_use",
                   "kubetune_operator_finetunejob_failures_total", "kubetune_trainer_train_loss",
                   "kubetune_operator_finetunejob_attempts_ended_total",
                   "kubetune_trainer_validation_loss", "kubetune_trainer_learning_rate",
                   "kubetune_trainer_tokens_per_second", "kubetune_trainer_progress_ratio",
                   "kubetune_trainer_eta_seconds", "kubetune_trainer_gpu_memory_used_bytes",
                   "kubetune_trainer_gpu_utilization_ratio",
                   "kubetune_trainer_last_checkpoint_timestamp_seconds", "kubetune_trainer_evaluation",
                   "kubetune_operator_finetunejob_test_metric",
                   "kubetune_operator_finetunejob_data_quality_findings",
                   "kubetune_operator_finetunesweep_trials", "kubetune_operator_finetunesweep_best_metric",
                   "kubetune_operator_finetunesweep_gpu_hours", "kubetune_operator_finetunesweep_objective"):
        assert metric in exprs, f"no panel shows {metric}"
    for query in panel_queries(_model()):
        if "kubetune_trainer_" not in query.expr or ("by (finetunejob)" in query.expr and "sweep" not in query.expr):
            continue  # fleet panel
        assert 'finetunejob="$finetunejob"' in query.expr or 'finetunejob=~"${sweep}-[0-9]+"' in query.expr, \
            f"{query.panel}: not filtered by a variable"


def test_the_sweeps_row_selects_the_sweep_and_its_trials():
    """The Sweeps row: trials over time, the best so far, the budget, and each trial's validation curve (its
    trainer's series, the trial FineTuneJobs being <sweep>-<n>, of the sweep's objective metric)."""
    model = _model()
    rows = [p["title"] for p in model["panels"] if p["type"] == "row"]
    assert rows[-1] == "Sweeps"
    start = next(i for i, p in enumerate(model["panels"]) if p.get("title") == "Sweeps")
    titles = {p["title"]: p for p in model["panels"][start + 1:]}
    assert set(titles) == {"Trials by phase", "Best so far", "GPU-hours", "Trial validation curves"}
    for panel in titles.values():
        for target in panel["targets"]:
            assert 'sweep="$sweep"' in target["expr"], panel["title"]
    (curves,) = titles["Trial validation curves"]["targets"]
    assert 'kubetune_trainer_evaluation{finetunejob=~"${sweep}-[0-9]+", split="validation"' in curves["expr"]
    assert curves["legendFormat"] == "{{finetunejob}}"


def test_the_metrics_the_panels_query_are_exported():
    """Every kubetune_* name a panel queries is one the trainer or the operator exports (a renamed gauge would
    leave a panel empty), read from their real registries."""
    from kubetune_operator import metrics as operator_metrics
    from kubetune_trainer.metrics import TrainerMetrics

    trainer = TrainerMetrics("job", "lora", "s3://models/m/")
    trainer.gpu_memory.labels("job", "0").set(1)
    trainer.gpu_utilization.labels("job", "0").set(1)
    trainer.set_evaluation("test", "finetuned", {"loss": 1.0})
    trainer.set_train({"rewards_accuracy": 1.0})
    trainer.set(**dict.fromkeys(("step", "total_steps", "epoch", "progress_ratio", "eta_seconds", "train_loss",
                                 "validation_loss", "test_loss", "test_perplexity", "test_token_accuracy",
                                 "learning_rate", "grad_norm", "tokens_per_second", "samples_per_second",
                                 "last_checkpoint_timestamp_seconds"), 1.0))
    operator_metrics.record("dash-uid", "Running", "Succeeded", None, 0, job=("ml", "job"),
                            result={"metrics": {"test": {"loss": 1.0}}}, quality={"duplicates": {"train": 2}})
    operator_metrics.record_sweep("dash-sweep-uid", ("ml", "sweep"), SWEEP_STATUS)
    try:
        exported = {sample.name for registry in (trainer.registry, operator_metrics.REGISTRY)
                    for family in registry.collect() for sample in family.samples}
    finally:
        operator_metrics.forget("dash-uid")
        operator_metrics.forget_sweep("dash-sweep-uid")
    queried = {name for q in panel_queries(_model()) for name in re.findall(r"kubetune_[a-z_]+", q.expr)}
    assert queried - exported == set()


# A sweep's status as sweep.decide writes it (the parts its metrics read)
SWEEP_STATUS = {"phase": "Running", "objective": "loss (minimize)",
                "counts": {"total": 3, "pending": 0, "running": 1, "succeeded": 1, "pruned": 1, "failed": 0},
                "best": {"trial": "sweep-0", "metric": 0.8, "parameters": {}},
                "budget": {"gpuHours": 2.0, "used": 0.5, "left": 1.5}}


def test_every_query_is_valid_promql(tmp_path):
    rules = [{"record": f"kubetune:dashboard_query_{i}", "expr": substitute(q.expr, "some-job")}
             for i, q in enumerate(panel_queries(_model()))]
    path = tmp_path / "queries.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run(tool("promtool"), "check", "rules", str(path)).stdout
    assert f"SUCCESS: {len(rules)} rules found" in out


JOB = "support-bot"
TRAINER = f'finetunejob="{JOB}", namespace="ml", pod="{JOB}-0", job="ml/kubetune-trainer"'
OPERATOR = 'job="kubetune-metrics", namespace="kubetune-system", pod="kubetune-0"'


SWEEP_NAME = "lr-search"
SWEEP_LABELS = f'{OPERATOR}, sweep_namespace="ml", sweep="{SWEEP_NAME}"'
RESULT_SAMPLES = 8  # the operator's result series: the last 8 samples only
QUALITY = {("duplicates", "train"): 60, ("duplicates", "test"): 2, ("leakage_exact", "test"): 80,
           ("leakage_near", "test"): 3, ("pii_email", "train"): 3, ("label_conflicts", "train"): 25}


def _synthetic_series(end: float, minutes: int = 30, step: int = 15) -> str:
    """OpenMetrics text with every metric of the operator and trainer contracts, one sample per `step`s."""
    series: dict[str, list[str]] = {}

    def add(name: str, labels: str, value, t: float) -> None:
        labels = labels.replace(", ", ",")  # OpenMetrics: no blanks between labels
        series.setdefault(f"{name}{{{labels}}}", []).append(f"{value} {t:.3f}")

    phases = {"Pending": 1, "Validating": 0, "Queued": 2, "Running": 1, "Succeeded": 3, "Failed": 1,
              "Suspended": 0}
    n = minutes * 60 // step
    for i in range(n + 1):
        t = end - (n - i) * step
        for phase, count in phases.items():
            add("kubetune_operator_finetunejobs", f'{OPERATOR}, phase="{phase}"', count, t)
        add("kubetune_operator_gpus_in_use", OPERATOR, 4, t)
        failures = f'{OPERATOR}, reason="DatasetInvalid"'
        add("kubetune_operator_finetunejob_failures_total", failures, i // 40, t)
        for kind in ("preemptions", "infrastructure", "failures"):
            add("kubetune_operator_finetunejob_attempts_ended_total", f'{OPERATOR}, kind="{kind}"', i // 10, t)
        for handler in ("create", "timer"):
            labels = f'{OPERATOR}, handler="{handler}"'
            add("kubetune_operator_reconciles_total", labels, 3 * i, t)
            add("kubetune_operator_reconcile_errors_total", labels, i // 20, t)
            for le, share in (("0.05", 1), ("0.5", 2), ("+Inf", 3)):
                bucket = f'{labels}, le="{le}"'
                add("kubetune_operator_reconcile_duration_seconds_bucket", bucket, share * i, t)
            add("kubetune_operator_reconcile_duration_seconds_count", labels, 3 * i, t)
            add("kubetune_operator_reconcile_duration_seconds_sum", labels, 0.4 * i, t)
        gauges = {"step": 10 * i, "total_steps": 10 * n + 100, "epoch": i / n, "progress_ratio": i / (n + 10),
                  "eta_seconds": 600, "train_loss": 2.0 - i / n, "validation_loss": 2.1 - i / n,
                  "test_loss": 1.1, "test_perplexity": 3.0, "test_token_accuracy": 0.6, "learning_rate": 2e-4,
                  "grad_norm": 0.8, "tokens_per_second": 5000, "samples_per_second": 2.5,
                  "tokens_trained_total": 5000 * step * i, "checkpoints_total": i // 20,
                  "last_checkpoint_timestamp_seconds": end - 300}
        for name, value in gauges.items():
            add(f"kubetune_trainer_{name}", TRAINER, value, t)
        for phase in ("downloading", "validating", "training", "evaluating", "uploading", "done"):
            add("kubetune_trainer_phase", f'{TRAINER}, phase="{phase}"', int(phase == "training"), t)
        for gpu in ("0", "1"):
            add("kubetune_trainer_gpu_memory_used_bytes", f'{TRAINER}, gpu="{gpu}"', 40e9, t)
            add("kubetune_trainer_gpu_utilization_ratio", f'{TRAINER}, gpu="{gpu}"', 0.9, t)
        add("kubetune_trainer_info", f'{TRAINER}, method="lora", base_model="s3://models/llama/"', 1, t)
        for metric, value in (("rewards_accuracy", i / n), ("rewards_margin", 2 * i / n)):  # preference tuning
            add("kubetune_trainer_train_metric", f'{TRAINER}, metric="{metric}"', value, t)
        evaluations = {("validation", "finetuned"): {"loss": 2.1 - i / n, "accuracy": 0.5 + i / (3 * n)},
                       ("test", "finetuned"): {"loss": 1.1, "accuracy": 0.9},
                       ("test", "baseline"): {"loss": 2.4, "accuracy": 0.3}}
        for (split, model), values in evaluations.items():
            for metric, value in values.items():
                labels = f'{TRAINER}, split="{split}", model="{model}", metric="{metric}"'
                add("kubetune_trainer_evaluation", labels, value, t)
        if i >= n - RESULT_SAMPLES:  # the operator exports the result once it has seen the job succeed
            for model, values in (("finetuned", {"loss": 1.0, "accuracy": 0.91}),
                                  ("baseline", {"loss": 2.5, "accuracy": 0.31})):
                for metric, value in values.items():
                    labels = f'{OPERATOR}, finetunejob_namespace="ml", finetunejob="{JOB}", model="{model}", ' \
                             f'metric="{metric}"'
                    add("kubetune_operator_finetunejob_test_metric", labels, value, t)
        for phase, count in (("Pending", 0), ("Running", 1), ("Succeeded", i // 40), ("Pruned", 1), ("Failed", 0)):
            add("kubetune_operator_finetunesweep_trials", f'{SWEEP_LABELS}, phase="{phase}"', count, t)
        add("kubetune_operator_finetunesweep_objective", f'{SWEEP_LABELS}, metric="loss", goal="minimize"', 1, t)
        add("kubetune_operator_finetunesweep_best_metric", f'{SWEEP_LABELS}, metric="loss"', 2.0 - i / n, t)
        for kind, hours in (("used", i / n), ("budget", 2), ("left", 2 - i / n)):
            add("kubetune_operator_finetunesweep_gpu_hours", f'{SWEEP_LABELS}, kind="{kind}"', hours, t)
        for number in range(3):  # the trials' trainers; another sweep's job and the retrain are not trials
            for job in (f"{SWEEP_NAME}-{number}", f"{SWEEP_NAME}-fit", f"{SWEEP_NAME}x-{number}"):
                labels = TRAINER.replace(JOB, job)
                for metric, value in (("loss", 2.0 + number - i / n), ("accuracy", 0.5)):
                    add("kubetune_trainer_evaluation", f'{labels}, split="validation", model="finetuned", '
                        f'metric="{metric}"', value, t)
        for (check, split), value in QUALITY.items():  # the operator's, from the validation on
            for namespace in ("ml", "other"):  # a job of the same name in another namespace is its own row
                labels = f'{OPERATOR}, finetunejob_namespace="{namespace}", finetunejob="{JOB}", check="{check}", ' \
                         f'split="{split}"'
                add("kubetune_operator_finetunejob_data_quality_findings", labels, value, t)
    lines = [f"{key} {sample}" for key, samples in series.items() for sample in samples]
    return "\n".join(lines) + "\n# EOF\n"


def test_every_query_returns_data_from_a_real_prometheus(tmp_path):
    """Each panel query against a real Prometheus holding the contract's metrics (backfilled, synthetic).
    The same check against a real training run's scrape comes with the end-to-end tests."""
    end = float(int(time.time()) - 60)
    source = tmp_path / "metrics.om"
    source.write_text(_synthetic_series(end))
    data = tmp_path / "data"
    run(tool("promtool"), "tsdb", "create-blocks-from", "openmetrics", str(source), str(data))
    server = Prometheus(data)
    try:
        server.wait_ready()
        empty = [q for q in panel_queries(_model())
                 if not server.query(substitute(q.expr, JOB, sweep=SWEEP_NAME), at=end)]
        assert not empty, "panel queries without data: " + "; ".join(f"{q.panel}: {q.expr}" for q in empty)
        (var,) = server.query("count by (finetunejob) (kubetune_trainer_info)", at=end)
        assert var["metric"]["finetunejob"] == JOB  # what the variable's label_values() lists
        (table,) = [q for q in panel_queries(_model()) if q.panel.startswith("Test metrics")]

        def test_metrics(at: float) -> dict:
            return {(r["metric"]["model"], r["metric"]["metric"]): float(r["value"][1])
                    for r in server.query(substitute(table.expr, JOB), at=at)}

        # the operator's result once it has one; before that (the trainer has just evaluated), the trainer's
        assert test_metrics(end) == {("finetuned", "loss"): 1.0, ("finetuned", "accuracy"): 0.91,
                                     ("baseline", "loss"): 2.5, ("baseline", "accuracy"): 0.31}
        assert test_metrics(end - 15 * (RESULT_SAMPLES + 2)) == {
            ("finetuned", "loss"): 1.1, ("finetuned", "accuracy"): 0.9, ("baseline", "loss"): 2.4,
            ("baseline", "accuracy"): 0.3}
        (quality,) = [q for q in panel_queries(_model()) if q.panel == "Data quality"]
        per_split = {(r["metric"]["check"], r["metric"]["split"]): float(r["value"][1])
                     for r in server.query(substitute(quality.expr, JOB), at=end)}
        assert per_split == QUALITY
        (fleet,) = [q for q in panel_queries(_model()) if q.panel == "Data quality by job"]
        rows = {(r["metric"]["ftj"], r["metric"]["check"]): float(r["value"][1])
                for r in server.query(substitute(fleet.expr, JOB), at=end)}
        assert rows[(f"ml/{JOB}", "duplicates")] == 62 and rows[(f"other/{JOB}", "leakage_exact")] == 80
        assert len(rows) == 2 * 5  # five checks for each of the two jobs
        (curves,) = [q for q in panel_queries(_model()) if q.panel == "Trial validation curves"]
        trials = {r["metric"]["finetunejob"]: float(r["value"][1])
                  for r in server.query(substitute(curves.expr, JOB, sweep=SWEEP_NAME), at=end)}
        assert trials == {f"{SWEEP_NAME}-{n}": pytest.approx(1.0 + n) for n in range(3)}  # the objective's: loss
    finally:
        server.stop()
