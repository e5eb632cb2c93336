"""Kueue found live: whether the API server serves Kueue's Workloads, asked again while the operator runs.

The Workload handlers (handlers.serve_kueue) are always registered; kopf watches a resource only while discovery
shows it. kopf notices CRDs coming and going itself only with `--all-namespaces` (it watches CRDs, which needs a
cluster-wide permission); with `--namespace` it reads discovery once. So `follow` asks discovery every
CHECK_SECONDS (longer after errors, up to MAX_DELAY_SECONDS) and, when Kueue appears or disappears, revises
kopf's view of Kueue's API group as kopf's own CRD watch would: from then on a queued job's suspension goes
through its Workload (reconcile._stop_workers), and no operator restart is needed. `served()` is the last
answer (the API server's, never a guess); the loop reads no Workload while it is False.
"""

from __future__ import annotations

import asyncio
import logging

import kopf
from kopf._cogs.clients import scanning
from kopf._cogs.structs import references
from kopf._core.reactor import observation

from . import kube, kueue

CHECK_SECONDS = 10
MAX_DELAY_SECONDS = 300
log = logging.getLogger(__name__)
_served: list[bool] = [False]  # discovery's last answer, from the API server


def served() -> bool:
    """Whether the API server served Kueue's Workloads at the last check."""
    return _served[0]


def found(answer: bool) -> None:
    """Discovery's answer at startup (__main__.kueue_served)."""
    _served[0] = answer


def new_view() -> references.Insights:
    """kopf's view of the API server's resources: given to kopf.operator(insights=...) and to `follow` (through
    kopf's memo)."""
    return references.Insights()


async def _revise(view: references.Insights, settings: kopf.OperatorSettings) -> None:
    """Re-read discovery for Kueue's group into kopf's view: kopf starts or stops the Workload watch."""
    resources = await scanning.scan_resources(groups={kueue.GROUP}, settings=settings, logger=log)
    async with view.revised:
        observation.revise_resources(resources=resources, insights=view, registry=kopf.get_default_registry(),
                                     group=kueue.GROUP)
        await view.backbone.fill(resources=resources)
        view.revised.notify_all()


async def follow(view: references.Insights, settings: kopf.OperatorSettings) -> None:
    """Ask discovery until cancelled; revise kopf's view when Kueue's Workloads appear or disappear. Started by
    a kopf startup handler, so that its API calls run in kopf's authenticated context."""
    delay = CHECK_SECONDS
    while True:
        await asyncio.sleep(delay)
        try:
            now = await asyncio.to_thread(kube.client().serves, kueue.API_VERSION, kueue.PLURAL)
            if now != _served[0]:
                await _revise(view, settings)
        except Exception as e:  # noqa: BLE001 -- the API server may be away for a while: ask again, later
            delay = min(delay * 2, MAX_DELAY_SECONDS)
            log.warning("could not ask the API server whether Kueue is installed (again in %ss): %s", delay, e)
            continue
        delay = CHECK_SECONDS
        if now != _served[0]:
            log.info("Kueue %s: jobs with spec.scheduling.queueName %s", "is installed now" if now else "is gone",
                     "go through its Workloads from now on" if now else "wait until it is back")
            _served[0] = now
