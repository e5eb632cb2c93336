"""The operator's own Prometheus metrics (served on $KUBETUNE_METRICS_PORT, default 8080, at /metrics)."""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager

from kubetune_api import Phase, Reason, SweepPhase, TrialPhase, metric_key
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()
JOBS = Gauge("kubetune_operator_finetunejobs", "FineTuneJobs seen by this operator, by phase", ["phase"],
             registry=REGISTRY)
RECONCILES = Counter("kubetune_operator_reconciles", "Reconciles run", ["handler"], registry=REGISTRY)
ERRORS = Counter("kubetune_operator_reconcile_errors", "Reconciles that raised", ["handler"],
                 registry=REGISTRY)
DURATION = Histogram("kubetune_operator_reconcile_duration_seconds", "Reconcile duration", ["handler"],
                     registry=REGISTRY)
GPUS = Gauge("kubetune_operator_gpus_in_use", "GPUs requested by running training workers",
             registry=REGISTRY)
FAILURES = Counter("kubetune_operator_finetunejob_failures", "FineTuneJobs that failed, by reason",
                   ["reason"], registry=REGISTRY)
ATTEMPTS = Counter("kubetune_operator_finetunejob_attempts_ended", "Training attempts ended by an incident, by its "
                   "kind (status.attempts): preemptions, infrastructure, failures", ["kind"], registry=REGISTRY)
ATTEMPT_KINDS = ("preemptions", "infrastructure", "failures")
TEST_METRIC = Gauge(
    "kubetune_operator_finetunejob_test_metric",
    "A succeeded FineTuneJob's test split metrics (status.result.metrics), on the fine-tuned model and on the base "
    "model; `finetunejob_namespace`, not `namespace`, which Prometheus sets to the operator's own",
    ["finetunejob_namespace", "finetunejob", "model", "metric"], registry=REGISTRY)
RESULT_MODELS = {"test": "finetuned", "baseline": "baseline"}  # status.result.metrics key -> `model` label
DATA_QUALITY = Gauge(
    "kubetune_operator_finetunejob_data_quality_findings",
    "What a FineTuneJob's data-quality checks found (status.dataset.quality), per check and split: records (classes "
    "for rare_classes and unseen_classes), never a value of the data",
    ["finetunejob_namespace", "finetunejob", "check", "split"], registry=REGISTRY)
# A FineTuneSweep's series (status.counts, best, budget): a few per sweep, none per trial (the trials' validation
# curves are their trainers' kubetune_trainer_evaluation series, finetunejob="<sweep>-<n>").
SWEEPS = Gauge("kubetune_operator_finetunesweeps", "FineTuneSweeps seen by this operator, by phase", ["phase"],
               registry=REGISTRY)
SWEEP_LABELS = ["sweep_namespace", "sweep"]  # `sweep_namespace`, not `namespace`: Prometheus sets the operator's
SWEEP_TRIALS = Gauge("kubetune_operator_finetunesweep_trials", "A FineTuneSweep's trials by phase (status.counts)",
                     [*SWEEP_LABELS, "phase"], registry=REGISTRY)
SWEEP_OBJECTIVE = Gauge(
    "kubetune_operator_finetunesweep_objective", "Constant 1, labelled with the validation metric a FineTuneSweep "
    "judges its trials on, named as kubetune_trainer_evaluation's `metric` label (snake_case), and its goal",
    [*SWEEP_LABELS, "metric", "goal"], registry=REGISTRY)
SWEEP_BEST = Gauge("kubetune_operator_finetunesweep_best_metric", "The best trial's objective metric so far "
                   "(status.best.metric), once a trial has succeeded", [*SWEEP_LABELS, "metric"], registry=REGISTRY)
SWEEP_GPU_HOURS = Gauge("kubetune_operator_finetunesweep_gpu_hours", "GPU-hours of a FineTuneSweep's trials "
                        "(status.budget): used; with spec.budget.gpuHours also budget and left",
                        [*SWEEP_LABELS, "kind"], registry=REGISTRY)
SWEEP_GAUGES = {"trials": SWEEP_TRIALS, "objective": SWEEP_OBJECTIVE, "best": SWEEP_BEST, "gpu_hours": SWEEP_GPU_HOURS}

# Export every known label value from the start (0), so dashboards and rate() have series before the first
# reconcile error or failure.
HANDLERS = ("reconcile",)
# the operator's own reasons (ValidationFailed: validation's attempts ran out) and the Job controller's
# (BackoffLimitExceeded, DeadlineExceeded)
FAILURE_REASONS = (Reason.DatasetInvalid, Reason.ConfigInvalid, Reason.ValidationFailed, Reason.BackoffLimitExceeded,
                   Reason.PreemptionLimitExceeded, Reason.InfrastructureLimitExceeded, "DeadlineExceeded", Reason.Hung)
for _phase in Phase:
    JOBS.labels(_phase.value)
for _handler in HANDLERS:
    for _metric in (RECONCILES, ERRORS, DURATION):
        _metric.labels(_handler)
for _reason in FAILURE_REASONS:
    FAILURES.labels(_reason)
for _kind in ATTEMPT_KINDS:
    ATTEMPTS.labels(_kind)
for _sweep_phase in SweepPhase:
    SWEEPS.labels(_sweep_phase.value)

_jobs: dict[str, tuple[str, int]] = {}  # uid -> (phase, GPUs in use); a metrics cache only, never state
_results: dict[str, set[tuple[str, ...]]] = {}  # uid -> the label values of its TEST_METRIC series
_quality: dict[str, set[tuple[str, ...]]] = {}  # uid -> the label values of its DATA_QUALITY series
_sweeps: dict[str, str] = {}  # uid -> the sweep's phase; a metrics cache only, never state
_sweep_series: dict[str, dict[str, set[tuple[str, ...]]]] = {name: {} for name in SWEEP_GAUGES}  # per gauge, uid ->
_lock = threading.Lock()


def serve(port: int) -> None:
    start_http_server(port, registry=REGISTRY)


@contextmanager
def track(handler: str):
    RECONCILES.labels(handler).inc()
    start = time.monotonic()
    try:
        yield
    except Exception:
        ERRORS.labels(handler).inc()
        raise
    finally:
        DURATION.labels(handler).observe(time.monotonic() - start)


def record(uid: str, old_phase: str | None, phase: str | None, reason: str | None, gpus: int,
           job: tuple[str, str] | None = None, result: dict | None = None, quality: dict | None = None) -> None:
    """After each reconcile: the job's phase and GPUs; with `job` (namespace, name), the test metrics of
    status.result once it has succeeded and the counts of status.dataset.quality once validated (again after an
    operator restart: its first reconcile records them)."""
    if phase == Phase.Failed and old_phase != Phase.Failed:
        FAILURES.labels(reason or "Unknown").inc()
    with _lock:
        _jobs[uid] = (phase or Phase.Pending.value, gpus)
        _refresh()
        if job is not None:
            _set_results(uid, job, result if phase == Phase.Succeeded else None)
            _set_series(DATA_QUALITY, _quality, uid, {(*job, *labels): value
                                                       for labels, value in quality_series(quality).items()})


def attempts_ended(old: dict | None, new: dict | None) -> None:
    """After each reconcile: the attempts that the status counts now and did not before, by kind (status.attempts
    before and after the write)."""
    for kind in ATTEMPT_KINDS:
        ended = ((new or {}).get(kind) or 0) - ((old or {}).get(kind) or 0)
        if ended > 0:
            ATTEMPTS.labels(kind).inc(ended)


def forget(uid: str) -> None:
    """The FineTuneJob is gone: drop it from the counts and remove its series."""
    with _lock:
        _jobs.pop(uid, None)
        _refresh()
        _set_results(uid, None, None)
        _set_series(DATA_QUALITY, _quality, uid, {})


def sweep_series(status: dict | None) -> dict[str, dict[tuple[str, ...], float]]:
    """A FineTuneSweep's status -> its series' label values (after the sweep's) and values, by SWEEP_GAUGES name:
    trials {(phase,): count} for every trial phase; objective {(metric, goal): 1}, the metric snake_case as the
    trainer labels its evaluations; best {(metric,): value} once a trial has succeeded; gpu_hours {(kind,): hours}:
    used, and budget and left under a budget."""
    status = status or {}
    counts, budget = status.get("counts") or {}, status.get("budget") or {}
    metric, _, goal = (status.get("objective") or "").partition(" (")  # "loss (minimize)"
    metric = metric_key(metric)
    best = (status.get("best") or {}).get("metric")
    hours = {"used": budget.get("used"), "budget": budget.get("gpuHours"), "left": budget.get("left")}
    return {
        "trials": {(p.value,): float(counts.get(p.value.lower()) or 0) for p in TrialPhase},
        "objective": {(metric, goal.rstrip(")")): 1.0} if metric else {},
        "best": {(metric,): float(best)} if metric and _number(best) else {},
        "gpu_hours": {(kind,): float(v) for kind, v in hours.items() if _number(v)},
    }


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def record_sweep(uid: str, sweep: tuple[str, str], status: dict | None) -> None:
    """After each FineTuneSweep reconcile: its phase and series (sweep: its namespace and name)."""
    with _lock:
        _sweeps[uid] = (status or {}).get("phase") or SweepPhase.Pending.value
        _refresh_sweeps()
        for name, series in sweep_series(status).items():
            _set_series(SWEEP_GAUGES[name], _sweep_series[name], uid,
                        {(*sweep, *labels): value for labels, value in series.items()})


def forget_sweep(uid: str) -> None:
    """The FineTuneSweep is gone: drop it from the counts and remove its series."""
    with _lock:
        _sweeps.pop(uid, None)
        _refresh_sweeps()
        for name, gauge in SWEEP_GAUGES.items():
            _set_series(gauge, _sweep_series[name], uid, {})


def _refresh_sweeps() -> None:
    for p in SweepPhase:
        SWEEPS.labels(p.value).set(sum(1 for phase in _sweeps.values() if phase == p))


def quality_series(quality: dict | None) -> dict[tuple[str, str], float]:
    """status.dataset.quality -> {(check, split): count}: duplicates, leakage_exact, leakage_near, pii_<kind>
    (email, phone, card, secret) and dropped per split; label_conflicts, label_suspected and rare_classes of
    train; unseen_classes of the evaluation splits. Split names are the status's (plain names only)."""
    quality = quality or {}
    series: dict[tuple[str, str], float] = {}
    for check in ("duplicates", "dropped"):
        series.update({(check, split): n for split, n in (quality.get(check) or {}).items()})
    for prefix, key in (("leakage", "leakage"), ("pii", "pii")):
        for split, kinds in (quality.get(key) or {}).items():
            series.update({(f"{prefix}_{kind}", split): n for kind, n in kinds.items()})
    labels = quality.get("labels") or {}
    for check, key, split in (("label_conflicts", "conflicts", "train"), ("label_suspected", "suspected", "train"),
                              ("rare_classes", "rare", "train"), ("unseen_classes", "unseen", "evaluation")):
        value = labels.get(key)
        if value is not None:
            series[(check, split)] = len(value) if isinstance(value, list) else value
    return {key: float(n) for key, n in series.items() if isinstance(n, int | float) and not isinstance(n, bool)}


def _set_series(gauge: Gauge, known: dict[str, set[tuple[str, ...]]], uid: str,
                series: dict[tuple[str, ...], float]) -> None:
    """The job's series of `gauge` are `series` now: set them, remove the ones it no longer has."""
    for labels in known.pop(uid, set()) - series.keys():
        gauge.remove(*labels)
    for labels, value in series.items():
        gauge.labels(*labels).set(value)
    if series:
        known[uid] = set(series)


def _set_results(uid: str, job: tuple[str, str] | None, result: dict | None) -> None:
    metrics = (result or {}).get("metrics") or {}
    series = {(*job, model, str(name)): float(value)
              for key, model in RESULT_MODELS.items() for name, value in (metrics.get(key) or {}).items()
              if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)} if job else {}
    _set_series(TEST_METRIC, _results, uid, series)


def _refresh() -> None:
    for p in Phase:
        JOBS.labels(p.value).set(sum(1 for phase, _ in _jobs.values() if phase == p))
    GPUS.set(sum(g for _, g in _jobs.values()))


ACTIVE = Gauge("kubetune_operator_active", "1 while this replica reconciles; 0 on standby (another holds the Lease)",
               registry=REGISTRY)
