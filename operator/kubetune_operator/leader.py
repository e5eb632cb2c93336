"""Several operator replicas, one active: leader election through a coordination.k8s.io/v1 Lease in the operator's
own namespace (controller-runtime's way; docs/operator.md, "Leader election and high availability").

Before kopf starts, a replica takes the Lease (`acquire`): it creates it when there is none, takes it when its
holder is gone (released, or not renewed for the Lease's `leaseDurationSeconds`), and otherwise stands by, asking
again every retry period: alive (/healthz), not ready (/readyz 503 `standby`). Once it holds the Lease, kopf runs
without peering (`standalone`) and a thread renews the Lease every retry period (`keep`). A leader that has not
renewed for the renew deadline (shorter than the Lease duration), or that finds another holder, exits non-zero at
once, before anyone else may take over; the Deployment restarts it as a standby. A leader that stops cleanly
releases the Lease, and a standby takes over within one retry period.

Time is measured on this replica's monotonic clock only, as client-go does, never compared with another
machine's: a standby counts a holder gone `leaseDurationSeconds` after it last *saw the Lease change*, and a
leader counts its renew deadline from when it *sent* its last successful renewal, which is before any standby can
see it. Each write carries the resourceVersion that was read, so of two replicas taking a free Lease one wins.

The Lease lives in the operator's namespace, where tenants have no rights: the KopfPeering objects this replaces
lived in every served namespace, where a tenant who could write `kopfpeerings` could pause the operator.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from . import metrics
from .kube import ApiError
from .settings import LEASE_DURATION_SECONDS, LEASE_RENEW_DEADLINE_SECONDS, LEASE_RETRY_PERIOD_SECONDS, OperatorSettings

LOST_EXIT_CODE = 3  # the exit status of a leader that lost its Lease (the Deployment restarts it)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    """client-go's three durations, in seconds (OperatorSettings.lease_*; the chart's leaderElection.*)."""

    lease_duration: float = LEASE_DURATION_SECONDS  # a holder not seen renewing for this long is gone
    renew_deadline: float = LEASE_RENEW_DEADLINE_SECONDS  # a leader that has not renewed for this long gives up
    retry_period: float = LEASE_RETRY_PERIOD_SECONDS  # between two attempts, to acquire or to renew

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                f"leader election: need 0 < retry period ({self.retry_period} s) < renew deadline "
                f"({self.renew_deadline} s) < lease duration ({self.lease_duration} s); set "
                "KUBETUNE_LEASE_{RETRY_PERIOD,RENEW_DEADLINE,DURATION}_SECONDS (the chart's leaderElection.*)")


    @classmethod
    def of(cls, settings: OperatorSettings) -> Timing:
        return cls(settings.lease_duration_seconds, settings.lease_renew_deadline_seconds,
                   settings.lease_retry_period_seconds)


class Conflict(Exception):
    """The Lease changed (409) or was created (409) since it was read: another replica wrote first."""


class Leases(Protocol):
    """One Lease's API: `get` returns None when there is none; `create`/`replace` raise Conflict on 409."""

    def get(self, timeout: float) -> dict | None: ...
    def create(self, body: dict, timeout: float) -> dict: ...
    def replace(self, body: dict, timeout: float) -> dict: ...


class KubeLeases:
    """The Lease `name` in `namespace`, through kube.Kube (get, create, update: the chart's Role)."""

    def __init__(self, kube, namespace: str, name: str):
        self.kube, self.name = kube, name
        self.collection = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"

    def get(self, timeout: float) -> dict | None:
        try:
            return self.kube.call("GET", f"{self.collection}/{self.name}", timeout=timeout)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def create(self, body: dict, timeout: float) -> dict:
        return self._write("POST", self.collection, body, timeout)

    def replace(self, body: dict, timeout: float) -> dict:
        return self._write("PUT", f"{self.collection}/{self.name}", body, timeout)

    def _write(self, method: str, path: str, body: dict, timeout: float) -> dict:
        try:
            return self.kube.call(method, path, body, timeout=timeout)
        except ApiError as e:
            if e.status == 409:
                raise Conflict(e.message) from e
            raise


def identity() -> str:
    """This process: the host (the pod's name in a cluster) and a random part, unique across restarts."""
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _micro_time(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # the API server's MicroTime


class Elector:
    def __init__(self, leases: Leases, name: str, me: str, timing: Timing = Timing(),
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.leases, self.name, self.me, self.timing, self.clock, self.wall = leases, name, me, timing, clock, wall
        self.holder: str | None = None  # as last read
        self.renewed_at: float | None = None  # when the last successful acquire or renewal was sent
        self._seen: str | None = None  # the resourceVersion last read ...
        self._seen_at = 0.0  # ... and when this replica first saw it
        self.stop = threading.Event()  # ends keep()
        self._keeper: threading.Thread | None = None

    def leading(self) -> bool:
        return self.renewed_at is not None and self.clock() - self.renewed_at < self.timing.renew_deadline

    def try_acquire_or_renew(self) -> bool:
        """One attempt: True when this replica holds the Lease now (created, taken over or renewed)."""
        sent = self.clock()
        timeout = self.timing.renew_deadline
        if self.renewed_at is not None:  # a leader's request never outlasts its deadline
            timeout = max(0.1, self.renewed_at + self.timing.renew_deadline - sent)
        lease = self.leases.get(timeout)
        now = _micro_time(self.wall())
        duration = math.ceil(self.timing.lease_duration)
        mine = {"holderIdentity": self.me, "leaseDurationSeconds": duration, "acquireTime": now, "renewTime": now}
        try:
            if lease is None:
                self.leases.create({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                    "metadata": {"name": self.name}, "spec": {**mine, "leaseTransitions": 0}},
                                   timeout)
                return self._won(sent)
            meta, spec = lease["metadata"], lease.get("spec") or {}
            if meta["resourceVersion"] != self._seen:
                self._seen, self._seen_at = meta["resourceVersion"], self.clock()
            self.holder = spec.get("holderIdentity") or None
            if self.holder == self.me:
                mine["acquireTime"] = spec.get("acquireTime") or now
            elif self.holder and self.clock() < self._seen_at + (spec.get("leaseDurationSeconds") or duration):
                return False  # held, and renewed within its duration
            else:  # free or expired: taking it over is a transition
                mine["leaseTransitions"] = (spec.get("leaseTransitions") or 0) + (1 if self.holder else 0)
            self.leases.replace({**lease, "spec": {**spec, **mine}}, timeout)  # metadata keeps resourceVersion
            return self._won(sent)
        except Conflict:
            return False

    def _won(self, sent: float) -> bool:
        if self.renewed_at is None:
            logger.info("This replica (%s) holds the Lease %s: it is the leader", self.me, self.name)
        self.holder, self.renewed_at = self.me, sent
        return True

    def _attempt(self) -> bool:
        try:
            return self.try_acquire_or_renew()
        except Exception as e:  # noqa: BLE001 -- the API server does not answer: try again next period
            logger.warning("Lease %s: %s: %s", self.name, type(e).__name__, e)
            return False

    def acquire(self, sleep: Callable[[float], None] = time.sleep) -> None:
        """Block until this replica holds the Lease."""
        told = None
        while not self._attempt():
            if self.holder != told and self.holder:
                logger.info("This replica (%s) stands by: %s holds the Lease %s", self.me, self.holder, self.name)
                told = self.holder
            sleep(self.timing.retry_period)

    def keep(self, on_lost: Callable[[str], None]) -> None:
        """The leader's renewals, every retry period until `self.stop` is set; `on_lost(why)` when the Lease is lost
        (then it returns): another holder, or no renewal within the renew deadline."""
        wait = self.timing.retry_period
        while not self.stop.wait(wait):
            wait = self.timing.retry_period
            if self._attempt() or self.stop.is_set():  # stopping: release() has the last word
                continue
            if self.holder not in (None, self.me):
                return on_lost(f"{self.holder} holds the Lease {self.name}")
            if not self.leading():
                return on_lost(f"the Lease {self.name} was not renewed for {self.timing.renew_deadline:g} s")
            wait = min(wait, self.renewed_at + self.timing.renew_deadline - self.clock())  # no later than that

    def keep_in_background(self, on_lost: Callable[[str], None]) -> None:
        self._keeper = threading.Thread(target=self.keep, args=(on_lost,), name="lease", daemon=True)
        self._keeper.start()

    def release(self) -> None:
        """On a clean exit: stop renewing, then leave the Lease free, so that a standby takes over at its next
        attempt (a renewal after this would take it again, for a process about to exit)."""
        self.stop.set()
        if self._keeper:
            self._keeper.join(self.timing.renew_deadline)
        try:
            lease = self.leases.get(self.timing.retry_period)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.me:
                now = _micro_time(self.wall())
                spec = {**lease["spec"], "holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": now}
                self.leases.replace({**lease, "spec": spec}, self.timing.retry_period)
                logger.info("This replica (%s) released the Lease %s", self.me, self.name)
        except Exception as e:  # noqa: BLE001 -- then it expires after its duration
            logger.warning("Could not release the Lease %s (%s: %s): it expires by itself", self.name,
                           type(e).__name__, e)
        self.renewed_at = None


# -- this replica's state: /readyz, /healthz while standing by, kubetune_operator_active ---------------------

_active = False


def set_active(active: bool) -> None:
    global _active
    _active = active
    metrics.ACTIVE.set(1 if active else 0)


def state() -> str:
    return "active" if _active else "standby"


class _Probes(BaseHTTPRequestHandler):
    """GET /readyz: 200 `active`, 503 `standby`. GET /healthz (only while standing by, on the liveness port
    that kopf serves once this replica leads): 200."""

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path not in ("/readyz", "/healthz"):
            self.send_error(404)
            return
        body = state().encode()
        self.send_response(200 if _active or path == "/healthz" else 503)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # one probe every few seconds: not worth a log line
        pass


def serve(port: int) -> ThreadingHTTPServer | None:
    """The probes on `port`, in a thread; None (and an error logged) when the port is taken."""
    try:
        server = ThreadingHTTPServer(("0.0.0.0", port), _Probes)
    except OSError as e:  # the operator still works; the probe tells the port is wrong
        logger.error("No probe endpoint on port %d: %s", port, e)
        return None
    threading.Thread(target=server.serve_forever, name=f"probes:{port}", daemon=True).start()
    return server


def stop_serving(server: ThreadingHTTPServer | None) -> None:
    if server:
        server.shutdown()
        server.server_close()
