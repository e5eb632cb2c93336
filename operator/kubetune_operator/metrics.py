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
TEST_METRIC = Gauge(
    "kubetune_operator_finetunejob_test_metric",
    "A succeeded FineTuneJob's test split metrics (status.result.metrics), on the fine-tuned model and on the base "
    "model; `finetunejob_namespace`, not `namespace`, which Prometheus sets to the operator's own",
    ["finetunejob_namespace", "finetunejob", "model", "metric"], registry=REGISTRY)
RESULT_MODELS = {"test": "finetuned", "baseline": "baseline"}  # status.result.metrics key -> `model` label

# Export every known label value from the start (0), so dashboards and rate() have series before the first
# reconcile error or failure.
HANDLERS = ("reconcile",)
# the operator's own reasons (ValidationFailed: validation's attempts ran out) and the Job controller's
# (BackoffLimitExceeded, DeadlineExceeded)
FAILURE_REASONS = (Reason.DatasetInvalid, Reason.ConfigInvalid, Reason.ValidationFailed, "BackoffLimitExceeded",
                   "DeadlineExceeded", Reason.Hung)
for _phase in Phase:
    JOBS.labels(_phase.value)
for _handler in HANDLERS:
    for _metric in (RECONCILES, ERRORS, DURATION):
        _metric.labels(_handler)
for _reason in FAILURE_REASONS:
    FAILURES.labels(_reason)

_jobs: dict[str, tuple[str, int]] = {}  # uid -> (phase, GPUs in use); a metrics cache only, never state
_results: dict[str, set[tuple[str, ...]]] = {}  # uid -> the label values of its TEST_METRIC series
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
           job: tuple[str, str] | None = None, result: dict | None = None) -> None:
    """After each reconcile: the job's phase and GPUs; with `job` (namespace, name), the test metrics of
    status.result once it has succeeded (again after an operator restart: its first reconcile records them)."""
    if phase == Phase.Failed and old_phase != Phase.Failed:
        FAILURES.labels(reason or "Unknown").inc()
    with _lock:
        _jobs[uid] = (phase or Phase.Pending.value, gpus)
        _refresh()
        if job is not None:
            _set_results(uid, job, result if phase == Phase.Succeeded else None)


def forget(uid: str) -> None:
    """The FineTuneJob is gone: drop it from the counts and remove its series."""
    with _lock:
        _jobs.pop(uid, None)
        _refresh()
        _set_results(uid, None, None)


def _set_results(uid: str, job: tuple[str, str] | None, result: dict | None) -> None:
    metrics = (result or {}).get("metrics") or {}
    series = {(*job, model, str(name)): float(value)
              for key, model in RESULT_MODELS.items() for name, value in (metrics.get(key) or {}).items()
              if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)} if job else {}
    for labels in _results.pop(uid, set()) - series.keys():
        TEST_METRIC.remove(*labels)
    for labels, value in series.items():
        TEST_METRIC.labels(*labels).set(value)
    if series:
        _results[uid] = set(series)


def _refresh() -> None:
    for p in Phase:
        JOBS.labels(p.value).set(sum(1 for phase, _ in _jobs.values() if phase == p))
    GPUS.set(sum(g for _, g in _jobs.values()))


ACTIVE = Gauge("kubetune_operator_active", "1 while this replica reconciles; 0 on standby (another holds the Lease)",
               registry=REGISTRY)
