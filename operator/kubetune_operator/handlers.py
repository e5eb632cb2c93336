"""kopf handlers: thin. Each one observes the API, asks `reconcile.decide` what to do, applies it and
patches the status. create/resume/update react at once; the timer is the resync that follows the
children (validation, training, metrics, hangs). All of them run the same idempotent reconcile.
"""

from __future__ import annotations

import copy
import logging
import os
from datetime import UTC, datetime

import kopf
from kubetune_trainer.spec import FineTuneJobSpec

from . import GROUP, PLURAL, VERSION, children, kube, metrics
from .reconcile import decide, running_pods
from .status import TERMINAL

FTJ = (GROUP, VERSION, PLURAL)
RESYNC_SECONDS = float(os.environ.get("KUBETUNE_RESYNC_SECONDS", "10"))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    # Handler progress in annotations: the status schema is structural and owned by reconcile.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.WARNING  # our own Events tell the story; kopf adds only problems
    # Peering "kubetune": used when kopf's peering CRDs exist, standalone otherwise (see docs/operator.md).
    settings.peering.name = "kubetune"
    settings.peering.mandatory = False
    settings.watching.server_timeout = 300
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]


@kopf.on.resume(*FTJ)
@kopf.on.create(*FTJ)
@kopf.on.update(*FTJ, field="spec")
def reconcile_on_change(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, **_) -> None:
    reconcile("change", body, patch, logger)


@kopf.timer(*FTJ, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS,
            when=lambda status, **_: status.get("phase") not in TERMINAL)
def resync(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, **_) -> None:
    reconcile("resync", body, patch, logger)


@kopf.on.delete(*FTJ, optional=True)
def forget(uid: str, **_) -> None:
    """Children go with ownerReferences GC; only the metrics cache needs cleaning."""
    metrics.forget(uid)


def reconcile(handler: str, body: kopf.Body, patch: kopf.Patch, logger: logging.Logger) -> None:
    raw = copy.deepcopy(dict(body))
    raw["spec"] = children.with_storage_defaults(raw.get("spec") or {})
    old = raw.get("status") or {}
    if old.get("phase") in TERMINAL:  # final: only counted (on resume, after an operator restart)
        metrics.record(raw["metadata"]["uid"], old["phase"], old["phase"], old.get("reason"), 0)
        return
    with metrics.track(handler):
        api = kube.client()
        try:
            port = _metrics_port(raw)
            observed = kube.observe(api, raw, port)
            decision = decide(raw, observed, datetime.now(UTC), children.default_image())
            created = kube.act(api, raw["metadata"], decision)
        except kube.ApiError as e:
            raise kopf.TemporaryError(str(e), delay=5) from e
    for what in created:
        kopf.event(body, type="Normal", reason="Created", message=f"created {what}")
    for type_, reason, message in decision.events:
        kopf.event(body, type=type_, reason=reason, message=message[:1000])
    patch_status(old, decision.status, patch)
    new = decision.status
    if new.get("phase") != old.get("phase"):
        logger.info("phase %s -> %s: %s", old.get("phase"), new.get("phase"), new.get("message"))
    gpus = len(running_pods(observed.training_pods)) * _gpus_per_worker(raw)
    metrics.record(raw["metadata"]["uid"], old.get("phase"), new.get("phase"), new.get("reason"), gpus)


def patch_status(old: dict, new: dict, patch: kopf.Patch) -> None:
    """Only the keys that changed; removed keys become null (JSON merge patch)."""
    for key in new.keys() | old.keys():
        if new.get(key) != old.get(key):
            patch.status[key] = new.get(key)


def _metrics_port(body: dict) -> int | None:
    try:
        spec = FineTuneJobSpec.model_validate(body["spec"])
        config = children.trainer_config(body["metadata"]["name"], spec)
    except ValueError:
        return None
    return config.metrics.port if config.metrics.enabled else None


def _gpus_per_worker(body: dict) -> int:
    return int(((body.get("spec") or {}).get("resources") or {}).get("gpusPerWorker", 1))
