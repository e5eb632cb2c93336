"""kopf handlers: thin. Watches feed indexes of each FineTuneJob's children; any change wakes the
FineTuneJob's supervisor (loop.py), a daemon that reconciles one object at a time. See docs/operator.md.
Every handler is async: it runs on the event loop (a sync one would hop to a thread for each watch event, and
could not wake an asyncio.Event safely). The operator's settings (settings.OperatorSettings, read once by
__main__) reach the handlers as kopf's `memo.settings`.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import kopf

from . import GROUP, PLURAL, VERSION, children, discovery, kube, kueue, loop, metrics, outputs

FTJ = (GROUP, VERSION, PLURAL)
CHILDREN = {"jobs": ("batch", "v1", "jobs"), "pods": ("", "v1", "pods"), "services": ("", "v1", "services"),
            "config_maps": ("", "v1", "configmaps"),
            "network_policies": ("networking.k8s.io", "v1", "networkpolicies")}
OURS = f"app.kubernetes.io/managed-by={children.MANAGED_BY}"
LABELS = {children.LABEL_JOB: kopf.PRESENT}
WORKLOADS = (kueue.GROUP, kueue.VERSION, kueue.PLURAL)  # Kueue's: watched when served at startup (serve_kueue)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = loop.KOPF_FINALIZER
    settings.posting.level = logging.WARNING  # our own Events tell the story; kopf adds only problems
    settings.watching.server_timeout = 300
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]
    for resource in CHILDREN.values():  # server-side: only our children are listed and watched
        settings.watching.label_selectors[resource[2]] = OURS


@kopf.index(*FTJ)
async def finetunejobs(namespace, name, uid, **_) -> dict:
    return {(namespace, name): uid}


@kopf.on.startup()
async def more_threads(**_) -> None:
    """Reconciles wait on the API server in worker threads: more of them than asyncio's default (CPUs + 4)."""
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(loop.THREADS, "reconcile"))


async def by_finetunejob(body, labels, namespace, **_) -> dict:
    return {(namespace, labels[children.LABEL_JOB]): loop.trim(body)}


for _index, _resource in CHILDREN.items():  # indexes `jobs`, `pods`, `services`, `config_maps`
    kopf.index(*_resource, id=_index, labels=LABELS)(by_finetunejob)


async def by_namespace(body, namespace, **_) -> dict:
    """Every Workload of the namespace (Kueue labels them with no FineTuneJob): the reconcile finds the training
    Job's own, and its place in the LocalQueue among the others."""
    return {namespace: loop.trim(body)}


async def workload_changed(body, namespace, **_) -> None:
    name = children.finetunejob_of(kueue.owner_job(body) or "")
    if name:
        loop.wake(namespace, name)


def serve_kueue() -> None:
    """Watch Kueue's Workloads (the index `workloads`, and wake a job when its Workload changes). Registered
    always: kopf watches them while the API server serves them, which discovery.follow keeps asking."""
    kopf.index(*WORKLOADS, id="workloads")(by_namespace)
    kopf.on.event(*WORKLOADS)(workload_changed)


@kopf.on.startup()
async def follow_kueue(memo: kopf.Memo, settings: kopf.OperatorSettings, **_) -> None:
    """Kueue installed or removed while the operator runs is noticed (discovery.py), in kopf's context."""
    if getattr(memo, "insights", None) is not None:
        memo.kueue_follower = asyncio.create_task(discovery.follow(memo.insights, settings))


@kopf.on.cleanup()
async def stop_following_kueue(memo: kopf.Memo, **_) -> None:
    follower = getattr(memo, "kueue_follower", None)
    if follower:
        follower.cancel()


@kopf.on.startup()
async def watch_outputs(**_) -> None:
    """The output check's own watch of the FineTuneJobs (outputs.py); kopf runs only on the Lease's holder."""
    outputs.start(kube.client())


@kopf.on.cleanup()
async def stop_watching_outputs(**_) -> None:
    await asyncio.to_thread(outputs.stop)


@kopf.on.event(*CHILDREN["pods"], labels=LABELS)
@kopf.on.event(*CHILDREN["services"], labels=LABELS)
@kopf.on.event(*CHILDREN["config_maps"], labels=LABELS)
@kopf.on.event(*CHILDREN["network_policies"], labels=LABELS)
async def child_changed(labels, namespace, **_) -> None:
    loop.wake(namespace, labels[children.LABEL_JOB])


@kopf.on.event(*CHILDREN["jobs"], labels=LABELS)
async def job_changed(body, labels, namespace, finetunejobs: kopf.Index, **_) -> None:
    name = labels[children.LABEL_JOB]
    loop.wake(namespace, name)
    if body["metadata"].get("deletionTimestamp"):
        live = set(finetunejobs.get((namespace, name), []))
        await asyncio.to_thread(loop.release_orphans, kube.client(), [loop.trim(body)], live)


@kopf.on.event(*FTJ)
async def finetunejob_changed(type, body, namespace, name, uid, jobs: kopf.Index, **_) -> None:
    loop.wake(namespace, name, body["metadata"].get("resourceVersion"))
    if type == "DELETED":
        metrics.forget(uid)
        await asyncio.to_thread(loop.release_orphans, kube.client(), list(jobs.get((namespace, name), [])), set())


@kopf.daemon(*FTJ, cancellation_timeout=10)
async def supervise(body: kopf.Body, stopped: kopf.DaemonStopped, logger: logging.Logger, memo: kopf.Memo,
                    jobs: kopf.Index, pods: kopf.Index, services: kopf.Index, config_maps: kopf.Index,
                    network_policies: kopf.Index, workloads: kopf.Index | None = None, **_) -> None:
    # None where serve_kueue was not called (tests); an empty Index is falsy, and is the live one all the same
    indexes = loop.Indexes(jobs, pods, services, config_maps, {} if workloads is None else workloads,
                           network_policies)
    await loop.Supervisor(body, logger, memo.settings).run(stopped, indexes)
