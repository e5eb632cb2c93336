"""Several operator replicas: one active, the others on standby (kopf peering; docs/install.md, "Several replicas").

kopf pauses an operator while the peering object `kubetune` lists a live peer of higher priority, and pauses
*every* operator that sees a live peer of equal priority (with kopf's default, 0 for all, nobody works). So each
replica gets its own priority from its start time: the oldest live replica is active (a new one never takes over
from a working one, so a rollout does not flap), a random part breaks ties. A replica that exits cleanly removes
itself from the peering object and a standby resumes at once. A killed one stops its keep-alives (every 5-10 s):
kopf counts it dead LIFETIME seconds after the last one, and a paused kopf sleeps exactly until that deadline,
then touches the object, re-reads it and resumes. So the next oldest replica takes over within LIFETIME seconds.

Whether kopf paused this replica is its `operator_paused` toggle set (peering conflicts, or absent peering CRDs
when peering is mandatory), internal to kopf.operator(). prepare() wraps kopf's orchestrator, which receives it,
and follows it: kopf's own decision, not a second guess from the peering object. state() is "starting" until kopf
runs its orchestrator, then "active" or "standby"; /readyz (serve()) and kubetune_operator_active report it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kopf
import kubernetes
from kopf._core.reactor import orchestration

from . import metrics

NAME = "kubetune"
LIFETIME = 15  # seconds a peer stays alive after its last keep-alive (kopf's default: 60)
# Higher wins: the earliest start (ms), then a random 0-999. |priority| < 2**53: exact in any JSON reader.
PRIORITY = -(int(time.time() * 1000) * 1000 + random.randrange(1000))

logger = logging.getLogger(__name__)
_mandatory = False  # start paused until kopf has read the peering object (prepare() found one)
_active: bool | None = None  # None: kopf has not started yet


def configure(settings: kopf.OperatorSettings) -> None:
    # Peering "kubetune": used when kopf's peering CRDs exist, standalone otherwise (see docs/operator.md).
    settings.peering.name = NAME
    settings.peering.mandatory = _mandatory
    settings.peering.priority = PRIORITY
    settings.peering.lifetime = LIFETIME


def prepare(*, namespaces: list[str], standalone: bool) -> None:
    """Before kopf starts: follow its pause state, and start paused when the peering object exists already, so
    that a replica joining a working one never handles an event before it has seen its elder."""
    global _mandatory
    if not getattr(orchestration.orchestrator, "follows_pause", False):
        orchestration.orchestrator = _following(orchestration.orchestrator)
    _mandatory = not standalone and _peering_exists(namespaces)


def state() -> str:
    return "starting" if _active is None else "active" if _active else "standby"


def serve(port: int) -> None:
    """GET /readyz: 200 `active`, 503 `standby` or `starting`."""
    try:
        server = ThreadingHTTPServer(("0.0.0.0", port), _Readiness)
    except OSError as e:  # the operator still works; the readiness probe tells the port is wrong
        logger.error("No readiness endpoint on port %d: %s", port, e)
        return
    threading.Thread(target=server.serve_forever, name="readiness", daemon=True).start()


class _Readiness(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/readyz":
            self.send_error(404)
            return
        body = state().encode()
        self.send_response(200 if _active else 503)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # one probe every few seconds: not worth a log line
        pass


def _peering_exists(namespaces: list[str]) -> bool:
    """The ClusterKopfPeering `kubetune` (all namespaces), or a KopfPeering `kubetune` in each namespace."""
    try:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        with kubernetes.client.ApiClient() as api:
            crs, selector = kubernetes.client.CustomObjectsApi(api), f"metadata.name={NAME}"
            if not namespaces:
                found = [crs.list_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings",
                                                        field_selector=selector, _request_timeout=10)]
            else:
                found = [crs.list_namespaced_custom_object("kopf.dev", "v1", ns, "kopfpeerings",
                                                           field_selector=selector, _request_timeout=10)
                         for ns in namespaces]
        return all(f["items"] for f in found)
    except Exception as e:  # no CRDs (404), no cluster yet: kopf's own detection decides, from a running start
        logger.info("No peering object %r found before starting (%s: %s): peering is auto-detected",
                    NAME, type(e).__name__, getattr(e, "reason", None) or e)
        return False


def _following(orchestrator):
    @functools.wraps(orchestrator)
    async def wrapper(*, operator_paused, **kwargs):
        follower = asyncio.create_task(_follow(operator_paused), name="kubetune pause follower")
        try:
            return await orchestrator(operator_paused=operator_paused, **kwargs)
        finally:
            follower.cancel()

    wrapper.follows_pause = True
    return wrapper


async def _follow(paused) -> None:
    # Mandatory: kopf starts paused once it has made its toggle for the peering object (next to the one for
    # missing CRDs); an empty set, before that, would read as active.
    while _mandatory and paused.is_off() and len(paused) < 2:
        await asyncio.sleep(0.1)
    while True:
        _set_active(paused)
        await paused.wait_for(_active)  # until it flips: paused while active, resumed while on standby


def _set_active(paused) -> None:
    global _active
    active = paused.is_off()
    if active != _active:
        if active:
            logger.info("This replica is active: it reconciles FineTuneJobs (peering priority %d)", PRIORITY)
        else:
            why = ", ".join(sorted(str(t.name) for t in paused if t.is_on()))
            logger.info("This replica is on standby: kopf paused it (%s)", why)
    _active = active
    metrics.ACTIVE.set(1 if active else 0)
