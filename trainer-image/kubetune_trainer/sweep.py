"""`kubetune sweep`: a FineTuneSweep on this machine, its trials one after another in this process.

The search is the operator's (kubetune_search): the same sampler, pruner and grid, each trial named `<sweep>-<n>`
with the template's values set by path, its output under `<output.uri>trials/<trial>/` and the shared data cache
`<output.uri>data-cache/` (the data is validated and tokenized by the first trial, reused by the others). Each
trial is `pipeline.run`, as `kubetune run` runs a job, with its metrics endpoint off.

Its validation evaluations go to its Optuna trial as the loop reports them (`report`, `should_prune`); when the
pruner says stop, the trial is asked to stop the way a suspend stops a job (StopSignal.request: a checkpoint at the
next step, then Preempted) and ends Pruned. A failed trial counts towards maxFailedTrials; a template that the
values make invalid ends the sweep (no later trial would fare better). `promote: best` copies the best trial's
published output to `<output.uri>best/` with sweep.json (promote.py, as the operator's promotion Job does).
parallelTrials and budget.gpuHours are the operator's: here the trials run one at a time, maxTrials of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from kubetune_api import (
    FineTuneSweep,
    Promote,
    Reason,
    SweepPhase,
    TrainerConfig,
    TrialPhase,
    join_uri,
    metric_key,
)
from kubetune_api.exitcodes import EXIT_CONFIG_INVALID, EXIT_UNEXPECTED
from kubetune_search import (
    ENDED,
    PROMOTED,
    ask,
    best_trial,
    promotion_record,
    pruned_why,
    retrain_name,
    retrain_spec,
    study,
    trial_count,
    trial_name,
    trial_spec,
)
from optuna.trial import TrialState
from rich.markup import escape
from rich.table import Table

from .configfile import trial_config
from .errors import ConfigError, Preempted
from .failure import failure
from .pipeline import run as run_pipeline
from .promote import promote
from .redact import redact
from .train import StopSignal

PRUNING = "the sweep's pruner"  # what asked the trial to stop (the stopped event's reason)


@dataclass
class TrialRow:
    """One trial as the leaderboard shows it."""

    name: str
    number: int
    parameters: dict[str, Any]
    phase: TrialPhase = TrialPhase.Pending
    stage: str | None = None  # while it runs: the pipeline's phase (downloading, validating, training, ...)
    metric: float | None = None  # the final value once succeeded, else the last evaluation's
    step: int | None = None  # the step of that value
    at: int | None = None  # while it runs: the training step, of `total`
    total: int | None = None
    reason: str | None = None  # why it was pruned or failed
    config: TrainerConfig | None = None  # what it ran with (its output.uri: where its output is)
    exit_code: int | None = None  # a failed trial's


@dataclass
class SweepRun:
    """The sweep as it goes: its trials, then how it ended."""

    sweep: FineTuneSweep
    trials: list[TrialRow] = field(default_factory=list)
    phase: SweepPhase = SweepPhase.Running
    reason: Reason = Reason.Searching
    message: str = ""
    best: TrialRow | None = None
    retrain: TrialRow | None = None  # promote retrain: the best parameters on train + validation
    promoted: str | None = None  # where promote best (or retrain) copied the output
    exit_code: int = 0

    @property
    def metric(self) -> str:
        return self.sweep.spec.metric()

    def finish(self, phase: SweepPhase, reason: Reason, message: str, exit_code: int = 0) -> SweepRun:
        self.phase, self.reason, self.message, self.exit_code = phase, reason, message, exit_code
        return self


Train = Callable[..., dict]  # pipeline.run(config, report=, stop=): the published manifest
Show = Callable[[SweepRun, TrialRow, dict], None]  # each event of a trial, after the row took it in


def _finite(value) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def run_sweep(sweep: FineTuneSweep, work_dir: Path, show: Show = lambda run, row, event: None,
              train: Train = run_pipeline) -> SweepRun:
    """Run the sweep's trials one after another; returns how it ended (the rows, the best, the phase)."""
    spec, run = sweep.spec, SweepRun(sweep)
    template = spec.template.model_dump(by_alias=True, exclude_unset=True, mode="json")
    s = study(spec)
    for number in range(trial_count(spec)):
        trial = ask(s, spec, number)
        row = TrialRow(trial_name(sweep.metadata.name, number), number, trial.params)
        run.trials.append(row)
        try:
            row.config = _local(trial_spec(template, spec, row.name, trial.params), row.name, run, work_dir)
        except ConfigError as e:  # the values make the template invalid: no later trial would fare better
            row.phase, row.reason = TrialPhase.Failed, e.message
            return run.finish(SweepPhase.Failed, Reason.InvalidChildSpec, f"trial {row.name}: {e.message}",
                              EXIT_CONFIG_INVALID)
        _run_trial(run, s, trial, row, train, show)
        # The study learns how it ended: the value of a succeeded trial, else its state.
        state = ENDED[row.phase] if row.phase != TrialPhase.Succeeded or row.metric is not None \
            else TrialState.FAIL  # succeeded without reporting the metric: nothing to learn from
        s.tell(trial, row.metric if state == TrialState.COMPLETE else None, state=state)
        run.best = best_trial(spec, run.trials)
        show(run, row, {"event": "trial_ended"})
        failed = [t for t in run.trials if t.phase == TrialPhase.Failed]
        if len(failed) >= spec.max_failed_trials:
            return run.finish(SweepPhase.Failed, Reason.TooManyFailedTrials,
                              f"{len(failed)} trials failed (maxFailedTrials {spec.max_failed_trials}); "
                              f"{row.name}: {row.reason}", row.exit_code or EXIT_UNEXPECTED)
    return _end(run, template, work_dir, train, show)


def _local(doc: dict, name: str, run: SweepRun, work_dir: Path) -> TrainerConfig:
    """A trial's (or the retrain's) spec as a config for this machine: this work dir, no metrics endpoint."""
    config = trial_config(doc, name, f"{run.sweep.metadata.name}: trial {name}")
    return config.model_copy(update={"work_dir": str(work_dir.resolve()),
                                     "metrics": config.metrics.model_copy(update={"enabled": False})})


def _run_trial(run: SweepRun, s: optuna.Study | None, trial: optuna.Trial | None, row: TrialRow, train: Train,
               show: Show) -> None:
    """Train one trial, its evaluations reported to the study's pruner as they come (none for the retrain,
    `trial` None); the row says how it ended."""
    key = metric_key(run.metric)  # the trainer's events name metrics in snake_case
    stop = StopSignal()

    def report(event: dict) -> None:
        kind = event["event"]
        if kind == "phase":
            row.stage = event["phase"]
        elif kind == "plan":
            row.total, row.at = event["total_steps"], event["start_step"]
        elif kind == "train":
            row.at = event["step"]
        elif kind == "validation" and _finite(event.get(key)) is not None:
            row.metric, row.step = float(event[key]), event["step"]
            if trial is not None:  # a trial of the search, not the retrain: the pruner judges it
                trial.report(row.metric, row.step)
                if not stop.requested and trial.should_prune():  # stop at the next step, after a checkpoint
                    row.reason = f"{run.metric} {pruned_why(s, row.metric, row.step)}"
                    stop.request(PRUNING)
        show(run, row, event)

    row.phase = TrialPhase.Running
    try:
        manifest = train(row.config, report=report, stop=stop)
    except Preempted:
        if stop.why != PRUNING:
            raise  # SIGTERM: the sweep stops as its trial did (the trial checkpointed)
        row.phase = TrialPhase.Pruned
    except Exception as e:  # noqa: BLE001 - a trial's failure is its row's, the sweep goes on
        message, row.exit_code = failure(e)
        row.phase, row.reason = TrialPhase.Failed, redact(message)
    else:  # a pruning verdict at the last evaluation comes too late to save anything: the trial counts
        validation = (manifest.get("metrics") or {}).get("validation") or {}
        row.phase, row.reason = TrialPhase.Succeeded, None
        row.metric = _finite(validation.get(key))
        row.step = (manifest.get("selected") or {}).get("step", manifest.get("steps"))


def _end(run: SweepRun, template: dict, work_dir: Path, train: Train, show: Show) -> SweepRun:
    """The trials are done: the best one, promoted with promote best; with promote retrain, its parameters trained
    once more on train + validation (<sweep>-fit), and that promoted."""
    spec, best, done = run.sweep.spec, run.best, len(run.trials)
    if best is None:
        return run.finish(SweepPhase.Failed, Reason.NoTrialSucceeded, f"{done} trials done, none succeeded with a "
                          f"{run.metric} on the validation split", EXIT_UNEXPECTED)
    source = best
    if spec.promote == Promote.retrain:
        name = retrain_name(run.sweep.metadata.name)
        source = run.retrain = TrialRow(name, best.number, best.parameters)
        try:
            source.config = _local(retrain_spec(template, spec, name, best.parameters), name, run, work_dir)
        except ConfigError as e:
            source.phase, source.reason = TrialPhase.Failed, e.message
        else:
            _run_trial(run, None, None, source, train, show)
        show(run, source, {"event": "trial_ended"})
        if source.phase != TrialPhase.Succeeded:
            return run.finish(SweepPhase.Failed, Reason.RetrainFailed, f"{name}: {source.reason}",
                              source.exit_code or EXIT_UNEXPECTED)
    if spec.promote in (Promote.best, Promote.retrain):
        to = join_uri(spec.output.uri, PROMOTED)
        record = promotion_record(run.sweep.metadata.name, spec, best, run.retrain and run.retrain.name)
        try:
            promote(source.config, to, record, report=lambda event: None)  # the sweep's last line says where
        except Exception as e:  # noqa: BLE001 - the sweep fails, saying why
            message, code = failure(e)
            return run.finish(SweepPhase.Failed, Reason.PromotionFailed, f"copying {source.name}'s output to {to} "
                              f"failed: {redact(message)}", code)
        run.promoted = to
    retrained = f"; retrained as {run.retrain.name}" if run.retrain else ""
    promoted = f"; promoted to {run.promoted}" if run.promoted else ""
    return run.finish(SweepPhase.Succeeded, Reason.SearchCompleted,
                      f"{done} trials done; best {best.name}: {run.metric} {best.metric:.4g}{retrained}{promoted}")


# -- what people see -----------------------------------------------------------------------------------------------


def _human(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _short(path: str) -> str:
    """A parameter's column: its path less `hyperparameters.` and `method.`."""
    return path.removeprefix("hyperparameters.").removeprefix("method.")


PHASE_STYLE = {TrialPhase.Succeeded: "green", TrialPhase.Pruned: "yellow", TrialPhase.Failed: "red",
               TrialPhase.Running: "cyan", TrialPhase.Pending: "dim"}


def leaderboard(run: SweepRun) -> Table:
    """The trials, one row each: the parameters, the phase, the objective metric and its step; the best marked."""
    spec = run.sweep.spec
    paths = [p.path for p in spec.parameters]
    table = Table("trial", *(_short(p) for p in paths), "phase", f"{run.metric} ({spec.goal().value})", "step",
                  title=escape(f"FineTuneSweep {run.sweep.metadata.name}: {len(run.trials)}/{trial_count(spec)} "
                               "trials"))
    for row in [*run.trials, *([run.retrain] if run.retrain else [])]:
        running = row.phase == TrialPhase.Running
        phase = f"{row.phase.value}: {row.stage}" if running and row.stage else row.phase.value
        step = f"{row.at}/{row.total}" if running and row.total else "" if row.step is None else str(row.step)
        mark = " [bold green]best[/]" if run.best is row else ""
        table.add_row(escape(row.name) + mark, *(escape(_human(row.parameters.get(p))) for p in paths),
                      f"[{PHASE_STYLE[row.phase]}]{escape(phase)}[/]",
                      "" if row.metric is None else _human(row.metric), step)
    return table


def trial_line(row: TrialRow, metric: str) -> str:
    """How a trial ended, one line of rich markup: `lr-1 pruned at step 4: loss 2.31 at step 4 trails ...`."""
    if row.phase == TrialPhase.Succeeded:
        value = f"{metric} {_human(row.metric)}" if row.metric is not None else f"no validation {metric}"
        return f"[green]{escape(row.name)} succeeded[/]: {escape(value)} at step {row.step}"
    if row.phase == TrialPhase.Pruned:
        return f"[yellow]{escape(row.name)} pruned[/]: {escape(row.reason or '')}"
    return f"[red]{escape(row.name)} failed[/]: {escape(row.reason or '')}"
