"""The operator's own Prometheus metrics (served on $KUBETUNE_METRICS_PORT, default 8080, at /metrics)."""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager

from kubetune_api import Phase, Reason
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

_jobs: dict[str, tuple[str, int]] = {}  # uid -> (phase, GPUs in use); a metrics cache only, never state
_results: dict[str, set[tuple[str, ...]]] = {}  # uid -> the label values of its TEST_METRIC series
_quality: dict[str, set[tuple[str, ...]]] = {}  # uid -> the label values of its DATA_QUALITY series
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
