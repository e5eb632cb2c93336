"""FineTuneSweep's kopf handlers: thin. Any event of a sweep, or of one of its trial FineTuneJobs (labelled with
the sweep's name), reconciles the sweep: read it and its trials from the API server (never a cache, so a trial
just created is seen), `sweep.decide`, then prune (suspend) the stopped trials, create the new ones, write the
status (guarded by the sweep's resourceVersion), export its metrics and post the Events; with spec.promote best,
once the search is done, the promotion Job `<sweep>-promote` (`kubetune promote`) copies the best trial's output
(retrain: first the FineTuneJob `<sweep>-fit` trains the best parameters on train + validation, then its output is
copied). One reconcile per
sweep at a time; events that arrive meanwhile make one more. No daemon and no finalizer: nothing waits on a
clock, and the owner references let the garbage collector delete the trials and the Job with their sweep.

Registered by __main__ (`serve()`) when the API server serves FineTuneSweeps.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import kopf
from kubetune_api import TERMINAL

from . import GROUP, PLURAL, SWEEPS, VERSION, kube, metrics, policy, sweep
from .settings import OperatorSettings

FTS = (GROUP, VERSION, SWEEPS)
CHILDREN = {sweep.SWEEP_LABEL: kopf.PRESENT}
_running: set[tuple[str, str]] = set()
_again: set[tuple[str, str]] = set()
logger = logging.getLogger(__name__)


def sweep_path(namespace: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{SWEEPS}/{name}"


def reconcile(api: kube.Kube, namespace: str, name: str, settings: OperatorSettings) -> sweep.SweepDecision | None:
    """One reconcile, in a worker thread; None when the sweep is gone, its status write lost or a trial it would
    prune ended first (the change that beat it wakes another)."""
    body = api.get(sweep_path(namespace, name))
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    listed = api.call("GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}",
                      query={"labelSelector": f"{sweep.SWEEP_LABEL}={name}"})
    uid = body["metadata"]["uid"]
    trials = [t for t in listed["items"] if kube.owned_by(t, uid)]
    promotion = None
    if (body.get("spec") or {}).get("promote") in ("best", "retrain"):
        promotion = kube.owned_by(api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{sweep.promotion_name(name)}"),
                                  uid)
    since = api.admission_policy(settings.policy.binding) \
        if not trials and policy.sweep_needs_admission_check(body, settings.policy) else None
    now = datetime.now(UTC)
    d = sweep.decide(body, trials, now, settings, promotion, since)
    for trial in (t for t in trials if t["metadata"]["name"] in d.prune):
        if not prune(api, trial, d.prune[trial["metadata"]["name"]]):
            return None  # it ended meanwhile: its change wakes the next reconcile, which sees how
    for obj in d.create:
        try:
            api.create(obj, uid)
        except (kube.Refused, kube.Conflict) as e:  # the template with these values is not a FineTuneJob
            sweep.refused(d, body, obj["metadata"]["name"], str(e), now)
            break
    old = body.get("status") or {}
    changes = {k: d.status.get(k) for k in d.status.keys() | old.keys() if d.status.get(k) != old.get(k)}
    if changes:
        try:
            api.patch_status(body, changes)
        except kube.ApiError as e:
            if e.status != 409:
                raise
            return None
    metrics.record_sweep(uid, (namespace, name), d.status)
    for type_, reason, message in d.events:
        kopf.event(body, type=type_, reason=reason, message=message[:1000])
    if d.status.get("phase") != old.get("phase"):
        logger.info("FineTuneSweep %s/%s: phase %s -> %s: %s", namespace, name, old.get("phase"),
                    d.status.get("phase"), d.status.get("message"))
    return d


def prune(api: kube.Kube, trial: dict, why: str, tries: int = 3) -> bool:
    """Suspend the trial (its workers checkpoint, then stop), annotated with why; False when it ended first. The
    patch carries the resourceVersion it was judged at: a trial that succeeded between the read and the patch
    (its trainer publishing as the scrape saw its last evaluation) is not marked pruned, nor given a TrialPruned
    Event. A newer version that has not ended (a progress update) is patched again."""
    path = kube.object_path(trial)  # a FineTuneJob as listed: its apiVersion and kind are in it
    for _ in range(tries):
        patch = {"metadata": {"resourceVersion": trial["metadata"]["resourceVersion"],
                              "annotations": {sweep.PRUNED: why}}, "spec": {"runPolicy": {"suspend": True}}}
        try:
            api.merge_patch(path, patch)
            return True
        except kube.ApiError as e:
            if e.status != 409:
                raise
        trial = api.get(path)
        if trial is None or (trial.get("status") or {}).get("phase") in TERMINAL:
            return False
    return False


async def wake(namespace: str, name: str, settings: OperatorSettings) -> None:
    """Reconcile the sweep now, or once more after the reconcile already running."""
    key = (namespace, name)
    if key in _running:
        _again.add(key)
        return
    _running.add(key)
    try:
        while True:
            _again.discard(key)
            try:
                await asyncio.to_thread(reconcile, kube.client(), namespace, name, settings)
            except Exception:  # noqa: BLE001 -- logged; the next event of the sweep or a trial retries
                logger.exception("FineTuneSweep %s/%s: reconcile failed", namespace, name)
            if key not in _again:
                break
    finally:
        _running.discard(key)


async def sweep_changed(type, namespace, name, uid, memo, **_) -> None:
    if type == "DELETED":
        metrics.forget_sweep(uid)
    await wake(namespace, name, memo.settings)


async def child_changed(labels, namespace, memo, **_) -> None:
    await wake(namespace, labels[sweep.SWEEP_LABEL], memo.settings)


def serve() -> None:
    """Watch FineTuneSweeps, their trials and their promotion Jobs (called at startup where the API server serves
    FineTuneSweeps)."""
    kopf.on.event(*FTS)(sweep_changed)
    kopf.on.event(GROUP, VERSION, PLURAL, labels=CHILDREN)(child_changed)
    kopf.on.event("batch", "v1", "jobs", labels=CHILDREN)(child_changed)
