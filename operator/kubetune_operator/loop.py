"""The control loop, informer-style: kopf's watches keep indexes of the children (Jobs, Pods, Services,
ConfigMaps labelled with their FineTuneJob), a change to any of them wakes that FineTuneJob's supervisor,
and the supervisor (one kopf daemon per FineTuneJob, so one reconcile at a time per object) runs:

    observe (the indexes, no API call) -> decide (reconcile.decide, pure) -> act (children)
      -> status (merge patch guarded by resourceVersion) -> after_status (deletes, finalizers) -> events

A resync every KUBETUNE_RESYNC_SECONDS (60) is only a safety net; rank 0's metrics are scraped by a task of
their own (scrape.py). Errors are retried with a growing delay and logged; API refusals become status. The
operator's settings (settings.py, read once by __main__) come in through the Supervisor and `apply`.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import kopf
from kubetune_api import Reason

from . import children, discovery, kube, metrics, outputs, policy, reconcile
from .reconcile import Decision, Observed, decide
from .scrape import Scraper
from .settings import OperatorSettings

ERROR_DELAYS = (1, 2, 5, 10, 30, 60)
THREADS = 16  # worker threads for the API calls of reconciles (and as many pooled connections)
WRITTEN_TTL = 10.0  # seconds our own writes stand in for a watch that has not brought them back yet
KOPF_FINALIZER = "kubetune.io/finalizer"  # kopf's, on each FineTuneJob, for its daemon
SUPERVISORS: dict[tuple[str, str], Supervisor] = {}  # (namespace, name) -> its supervisor


@dataclass
class _Flight:
    requested: float  # time.monotonic() before the request went out
    items: list | None = None
    error: Exception | None = None
    done: bool = False


class SharedList:
    """One LIST at a time, shared by the reconciles that need it (the other FineTuneJobs, for the output check
    where outputs.py's watch cannot answer: late, broken or not running).
    A caller gets the answer of a LIST requested after it asked, so every FineTuneJob created before its own is
    in it, as if it had listed alone; callers that ask while a LIST is in flight share the next one. A burst of
    new jobs makes one LIST per round trip, not one each (each answers every FineTuneJob). Nothing is kept
    once a LIST's callers have its answer (read-only for them)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._flight: _Flight | None = None

    def get(self, fetch: Callable[[], list]) -> list:
        asked = time.monotonic()
        with self._changed:
            while self._flight and self._flight.requested < asked:  # requested before this caller asked
                self._changed.wait()
            flight = self._flight
            if flight:  # requested since: share it
                while not flight.done:
                    self._changed.wait()
                if flight.error:
                    raise flight.error
                return flight.items
            flight = self._flight = _Flight(time.monotonic())
        try:
            flight.items = fetch()
            return flight.items
        except Exception as e:
            flight.error = e
            raise
        finally:
            with self._changed:
                flight.done, self._flight = True, None
                self._changed.notify_all()


FINETUNEJOBS: dict[str, SharedList] = {}  # namespace -> the LIST its new jobs share when outputs.py cannot answer


def wake(namespace: str | None, name: str | None, resource_version: str | None = None) -> None:
    """A watch event about a FineTuneJob or one of its children: wake its supervisor (and tell it which
    version of the FineTuneJob the watch has brought, when it is one)."""
    supervisor = SUPERVISORS.get((namespace, name))
    if supervisor:
        if resource_version:
            supervisor.seen(resource_version)
        supervisor.event.set()


@dataclass
class Indexes:
    """kopf indexes, each (namespace, FineTuneJob name) -> the children's bodies (trimmed)."""

    jobs: kopf.Index
    pods: kopf.Index
    services: kopf.Index
    config_maps: kopf.Index
    workloads: kopf.Index  # Kueue's, by namespace
    network_policies: kopf.Index | dict = field(default_factory=dict)

    def observe(self, body: dict, expected: dict[str, dict]) -> Observed:
        """The children as the indexes hold them; `expected` (by name) are children this supervisor has just
        created that the watch has not brought yet (controller-runtime's "expectations"). Names found in the
        index are removed from `expected`."""
        meta = body["metadata"]
        key, uid, names = (meta["namespace"], meta["name"]), meta["uid"], children.Names(meta["name"])

        def named(index: kopf.Index, name: str) -> dict | None:
            found = next((o for o in index.get(key, []) if o["metadata"]["name"] == name and kube.owned_by(o, uid)),
                         None)
            if found:
                expected.pop(name, None)
            return found or expected.get(name)

        def pods_of(job: dict | None) -> list[dict]:
            return [p for p in self.pods.get(key, []) if job and kube.owned_by(p, job["metadata"]["uid"])]

        current = reconcile.attempt(body.get("status") or {})
        o = Observed(config_map=named(self.config_maps, names.config_map),
                     validation_job=named(self.jobs, names.validation), service=named(self.services, names.service),
                     training_job=named(self.jobs, names.training(current)))
        o.validation_pods, o.training_pods = pods_of(o.validation_job), pods_of(o.training_job)
        # earlier attempts (and a Job of this operator's version before attempts, with no attempt label)
        o.previous_jobs = [j for j in self.jobs.get(key, []) if kube.owned_by(j, uid) and _earlier(j, current)]
        o.previous_pods = [p for p in self.pods.get(key, []) if _earlier(p, current) and not (
            o.training_job and kube.owned_by(p, o.training_job["metadata"]["uid"]))]
        o.workloads = list(self.workloads.get(meta["namespace"], [])) if discovery.served() else []
        o.network_policy = named(self.network_policies, names.network_policy)
        return copy.deepcopy(o)


def _earlier(obj: dict, current: int) -> bool:
    """A training Job or worker of an attempt before `current`."""
    labels = obj["metadata"].get("labels") or {}
    if labels.get(children.LABEL_COMPONENT) != "workers":
        return False
    number = children.attempt_of(obj)
    return number is None or number < current


def trim(body: kopf.Body) -> dict:
    """What the reconcile reads of a child: metadata, spec (Jobs: suspend, the mutable fields and completions,
    observe.completed), status."""
    meta = body.get("metadata", {})
    keep = ("name", "namespace", "uid", "labels", "annotations", "ownerReferences", "finalizers",
            "creationTimestamp", "deletionTimestamp", "resourceVersion")
    out = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
           "metadata": {k: copy.deepcopy(meta[k]) for k in keep if k in meta},
           "status": copy.deepcopy(dict(body.get("status") or {}))}
    if body.get("kind") == "Job":
        out["spec"] = {k: body["spec"].get(k) for k in
                       ("suspend", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "completions")}
    if body.get("kind") == "Workload":
        out["spec"] = {k: body["spec"].get(k) for k in ("active", "queueName", "priority")}
    if body.get("kind") == "ConfigMap":
        out["data"] = dict(body.get("data") or {})
    return out


class Supervisor:
    """One FineTuneJob's loop: woken by its own and its children's watch events, its scraper, a retry or the
    resync. The `body` kopf gives a daemon is live: it always holds the newest FineTuneJob seen."""

    def __init__(self, body: kopf.Body, logger: logging.Logger, settings: OperatorSettings):
        self.body, self.logger, self.settings = body, logger, settings
        self.key = (body["metadata"]["namespace"], body["metadata"]["name"])
        self.event = asyncio.Event()
        self.scraper = Scraper(self.key[1], self.event, settings.scrape_seconds)
        self.errors = 0
        # Our last status write, until the FineTuneJob's watch brings that version: deciding from the live
        # body before then would act on the status as it was before our own decision.
        self.written: tuple[dict, float] | None = None
        self.expected: dict[str, tuple[dict, float]] = {}  # children created, by name, until the index has them
        self.versions: collections.deque[str] = collections.deque(maxlen=32)  # seen by the watch, newest last

    def seen(self, resource_version: str) -> None:
        self.versions.append(resource_version)
        if self.written and self.written[0]["metadata"]["resourceVersion"] == resource_version:
            self.written = None

    def current(self) -> dict:
        """The newest FineTuneJob known: kopf's live body, or our own write while the watch lags behind it."""
        if self.written and time.monotonic() - self.written[1] < WRITTEN_TTL:
            return copy.deepcopy(self.written[0])
        self.written = None
        return copy.deepcopy(dict(self.body))

    async def run(self, stopped: kopf.DaemonStopped, indexes: Indexes) -> None:
        SUPERVISORS[self.key] = self
        scraping = asyncio.create_task(self.scraper.run())
        try:
            for _ in range(40):  # kopf adds its finalizer as it spawns the daemon: decide after it, not against it
                if KOPF_FINALIZER in (self.body["metadata"].get("finalizers") or []) or \
                        self.body["metadata"].get("deletionTimestamp"):
                    break
                self.event.clear()
                await _sleep(self.event, stopped, 0.25)
            while not stopped:
                self.event.clear()
                await _sleep(self.event, stopped, await self.step(indexes))
        finally:
            scraping.cancel()
            if SUPERVISORS.get(self.key) is self:
                del SUPERVISORS[self.key]

    async def step(self, indexes: Indexes) -> float:
        """One reconcile; returns how long to sleep unless woken: a retry's delay, else at most the resync."""
        raw = self.current()
        raw["spec"] = children.with_storage_defaults(raw.get("spec") or {}, self.settings)
        now = time.monotonic()
        expected = {name: obj for name, (obj, at) in self.expected.items() if now - at < WRITTEN_TTL}
        observed = indexes.observe(raw, expected)
        self.expected = {name: self.expected[name] for name in expected}
        observed.trainer_metrics = self.scraper.fresh()
        observed.scrape_failures, observed.scrape_error = self.scraper.failures, self.scraper.error
        try:
            with metrics.track("reconcile"):
                d, written, created = await asyncio.to_thread(apply, kube.client(), raw, observed, self.logger,
                                                              self.settings)
        except Exception as e:  # noqa: BLE001 -- logged, counted and retried with a growing delay
            self.errors += 1
            delay = ERROR_DELAYS[min(self.errors, len(ERROR_DELAYS)) - 1]
            self.logger.warning("reconcile failed (retrying in %ss): %s", delay, e)
            return delay
        for obj in created:
            self.expected[obj["metadata"]["name"]] = (trim(obj), time.monotonic())
        if written and written["metadata"]["resourceVersion"] not in self.versions:
            self.written = (written, time.monotonic())
        if d is None:  # the FineTuneJob changed under us: the watch brings the new version
            return 1
        self.scraper.target = d.metrics_url
        if d.status.get("reason") in (Reason.CreateForbidden, Reason.QuotaExceeded):  # retried with a growing delay
            self.errors += 1
            return ERROR_DELAYS[min(self.errors, len(ERROR_DELAYS)) - 1] * 5
        self.errors = 0
        resync = self.settings.resync_seconds
        return min(d.requeue_after or resync, resync)


async def _sleep(event: asyncio.Event, stopped: kopf.DaemonStopped, timeout: float) -> None:
    waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def apply(api: kube.Kube, body: dict, observed: Observed, logger: logging.Logger,
          settings: OperatorSettings) -> tuple[Decision | None, dict | None, list[dict]]:
    """One reconcile, in a worker thread: the decision (None when the status write lost to a newer
    FineTuneJob), the FineTuneJob as our status write left it (None when nothing was written) and the
    children it created. The clock is read here, once, for `decide`."""
    meta, old = body["metadata"], body.get("status") or {}
    now = datetime.now(UTC)
    current = reconcile.attempt(old)
    if (old.get("trainingJob") or {}).get("uid") and observed.training_job is None and old.get("phase") not in \
            reconcile.TERMINAL:  # the index may lag behind our own create: ask the API before calling it gone
        observed.training_job = kube.owned_by(api.get(kube.training_job_path(meta, current)), meta["uid"])
    if policy.needs_admission_check(body, settings.policy):
        observed.admission_policy = api.admission_policy(settings.policy.binding)
    if reconcile.needs_output_check(body):  # not kopf's index: a job created a moment ago counts too
        observed.finetunejobs = other_outputs(api, body, logger)
    d = decide(body, observed, now, settings)
    created: list[dict] = []
    try:
        created = kube.act(api, meta, d)
    except kube.Refused as e:
        d = reconcile.refused(body, d, e.obj, e.status, e.message)
    except kube.Conflict as e:
        d = reconcile.conflict(body, d, e.obj, e.owner)
    for obj in created:
        if obj["metadata"]["name"] == children.Names(meta["name"]).training(reconcile.attempt(d.status)):
            d.status["trainingJob"] = {**d.status.get("trainingJob", {}), "name": obj["metadata"]["name"],
                                       "uid": obj["metadata"]["uid"]}
    changes = {k: d.status.get(k) for k in d.status.keys() | old.keys() if d.status.get(k) != old.get(k)}
    written = _write_status(api, body, changes) if changes else None
    if changes and written is None:
        return None, None, created
    kube.after_status(api, d)
    for obj in created:
        if obj["kind"] == "Job":
            kopf.event(body, type="Normal", reason=Reason.Created, message=f"created Job {obj['metadata']['name']}")
    for type_, reason, message in d.events:
        kopf.event(body, type=type_, reason=reason, message=message[:1000])
    if d.phase != old.get("phase"):
        logger.info("phase %s -> %s: %s", old.get("phase"), d.phase, d.status.get("message"))
    metrics.attempts_ended(old.get("attempts"), d.status.get("attempts"))
    metrics.record(meta["uid"], old.get("phase"), d.phase, d.status.get("reason"), d.status.get("gpusInUse", 0),
                   job=(meta["namespace"], meta["name"]), result=d.status.get("result"),
                   quality=(d.status.get("dataset") or {}).get("quality"))
    return d, written, created


def other_outputs(api: kube.Kube, body: dict, logger: logging.Logger) -> list[reconcile.Output]:
    """The FineTuneJobs' outputs as of `body`'s version or later (every job created before it is in): from the
    operator's watch (outputs.py) once it has delivered `body`, with no request; else (it is late by
    outputs.WAIT_SECONDS, or not running) a LIST from the API server, shared by the jobs waiting for one."""
    cache = outputs.current()
    found = cache.others(body) if cache else None
    if found is None:
        if cache:
            logger.info("the output check's watch has not brought this job within %ss: listing FineTuneJobs",
                        cache.wait_seconds)
        namespace = body["metadata"]["namespace"]
        shared = FINETUNEJOBS.setdefault(namespace, SharedList())
        found = shared.get(lambda: [reconcile.output_of(o) for o in api.finetunejobs(namespace)])
    return found


def _write_status(api: kube.Kube, body: dict, changes: dict) -> dict | None:
    """Patch the status at the resourceVersion the decision was made from; the object as written. On a
    conflict, the decision still holds if only metadata moved (kopf's finalizer, an annotation): same
    generation, same status; then it is written at the new resourceVersion. Otherwise None: the next
    reconcile decides again."""
    try:
        return api.patch_status(body, changes)
    except kube.ApiError as e:
        if e.status != 409:
            raise
    fresh = api.get(kube.object_path(body))
    same = fresh and fresh.get("status") == body.get("status") and \
        fresh["metadata"].get("generation") == body["metadata"].get("generation")
    if not same:
        return None
    try:
        return api.patch_status(fresh, changes)
    except kube.ApiError as e:
        if e.status != 409:
            raise
        return None


def release_orphans(api: kube.Kube, jobs: list[dict], live_uids: set[str]) -> None:
    """Training Jobs being deleted whose FineTuneJob is gone: nothing is left to record, let them go."""
    for job in jobs:
        owners = {r.get("uid") for r in job["metadata"].get("ownerReferences") or []}
        if reconcile.deleting(job) and not owners & live_uids:
            api.release(job)

