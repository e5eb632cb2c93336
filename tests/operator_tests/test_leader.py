"""leader.py, the Lease election, against a fake Lease API (optimistic concurrency on resourceVersion, like the
API server) and a fake clock: acquire a free Lease, refuse a held one until it expires, take over an expired or
released one, renew, and give up, before a standby may take over, when renewals fail or another replica holds it.
The same election on the real API server: test_failover.py and tests/security/test_leader.py."""

from __future__ import annotations

import copy
import threading
from datetime import UTC, datetime

import pytest
from kubetune_operator import leader
from kubetune_operator.settings import OperatorSettings

TIMING = leader.Timing(lease_duration=15, renew_deadline=10, retry_period=2)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeLeases:
    """One Lease, shared by the replicas: 409 on a stale resourceVersion or a second create; `down` makes every
    request fail as an unreachable API server does; `after_get` runs between a replica's read and its write."""

    def __init__(self):
        self.lease: dict | None = None
        self.rv, self.down, self.after_get, self.timeouts = 0, False, None, []

    def _check(self, timeout: float) -> None:
        self.timeouts.append(timeout)
        if self.down:
            raise ConnectionError("the API server does not answer")

    def get(self, timeout: float) -> dict | None:
        self._check(timeout)
        got = copy.deepcopy(self.lease)
        if self.after_get:
            hook, self.after_get = self.after_get, None
            hook()
        return got

    def create(self, body: dict, timeout: float) -> dict:
        self._check(timeout)
        if self.lease is not None:
            raise leader.Conflict("leases.coordination.k8s.io \"kubetune-operator\" already exists")
        return self._store(body)

    def replace(self, body: dict, timeout: float) -> dict:
        self._check(timeout)
        if self.lease is None or body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            raise leader.Conflict("the object has been modified")
        return self._store(body)

    def _store(self, body: dict) -> dict:
        self.rv += 1
        self.lease = copy.deepcopy({**body, "metadata": {**body["metadata"], "resourceVersion": str(self.rv)}})
        return copy.deepcopy(self.lease)

    def holder(self) -> str | None:
        return (self.lease or {}).get("spec", {}).get("holderIdentity")


class FakeStop:
    """Elector.stop for keep(): waiting advances the fake clock."""

    def __init__(self, clock: Clock):
        self.clock, self.waits, self.stopped = clock, [], False

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.clock.advance(seconds)
        return self.stopped or len(self.waits) > 100  # a runaway loop ends the test

    def set(self) -> None:
        self.stopped = True

    def is_set(self) -> bool:
        return self.stopped


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def api():
    return FakeLeases()


def replica(api, clock, me: str) -> leader.Elector:
    return leader.Elector(api, "kubetune-operator", me, TIMING, clock=clock,
                          wall=lambda: datetime(2026, 12, 6, 9, 0, tzinfo=UTC))


def test_a_free_lease_is_created_and_held():
    api, clock = FakeLeases(), Clock()
    a = replica(api, clock, "a")
    assert a.try_acquire_or_renew()
    spec = api.lease["spec"]
    assert api.lease["metadata"]["name"] == "kubetune-operator"
    assert (spec["holderIdentity"], spec["leaseDurationSeconds"], spec["leaseTransitions"]) == ("a", 15, 0)
    assert spec["renewTime"] == spec["acquireTime"] == "2026-12-06T09:00:00.000000Z"
    assert a.leading()


def test_a_held_lease_is_refused_until_its_holder_has_not_renewed_for_the_lease_duration(api, clock):
    a, b = replica(api, clock, "a"), replica(api, clock, "b")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew() and b.holder == "a"
    clock.advance(14.9)  # counted from when b first saw this version of the Lease, on b's own clock
    assert not b.try_acquire_or_renew()
    clock.advance(0.2)
    assert b.try_acquire_or_renew()
    assert (api.holder(), api.lease["spec"]["leaseTransitions"]) == ("b", 1)


def test_a_renewing_leader_keeps_the_lease(api, clock):
    a, b = replica(api, clock, "a"), replica(api, clock, "b")
    assert a.try_acquire_or_renew()
    acquired = api.lease["spec"]["acquireTime"]
    for _ in range(30):  # a minute
        clock.advance(2)
        assert a.try_acquire_or_renew()
        assert not b.try_acquire_or_renew()
    assert api.holder() == "a" and api.lease["spec"]["acquireTime"] == acquired
    assert api.lease["spec"]["leaseTransitions"] == 0


def test_a_standby_blocks_in_acquire_until_the_holder_is_gone(api, clock):
    a, b = replica(api, clock, "a"), replica(api, clock, "b")
    assert a.try_acquire_or_renew()
    b.acquire(sleep=clock.advance)  # a stops renewing at 0 s
    assert api.holder() == "b" and 15 <= clock.now <= 15 + TIMING.retry_period


def test_a_released_lease_is_taken_at_once(api, clock):
    a, b = replica(api, clock, "a"), replica(api, clock, "b")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    a.release()
    assert api.holder() is None and not a.leading()
    assert b.try_acquire_or_renew() and api.holder() == "b"


def test_release_leaves_another_holders_lease_alone(api, clock):
    a, b = replica(api, clock, "a"), replica(api, clock, "b")
    assert a.try_acquire_or_renew()
    b.release()
    assert api.holder() == "a"


def test_of_two_replicas_taking_a_free_lease_at_once_one_wins(api, clock):
    a, b = replica(api, clock, "a"), replica(api, clock, "b")
    api.after_get = lambda: a.try_acquire_or_renew()  # a creates it between b's read and b's create
    assert not b.try_acquire_or_renew()
    assert api.holder() == "a"
    # the same race on an expired Lease: a takes it over between b's read and b's write (resourceVersion)
    clock.advance(20)
    c = replica(api, clock, "c")
    assert not c.try_acquire_or_renew() and not b.try_acquire_or_renew()  # both see a's Lease from now on
    clock.advance(16)
    api.after_get = lambda: b.try_acquire_or_renew()
    assert not c.try_acquire_or_renew()
    assert api.holder() == "b"


def test_a_leader_that_cannot_renew_gives_up_before_a_standby_may_take_over(api, clock):
    a, b = replica(api, clock, "a"), replica(api, clock, "b")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()  # b sees the Lease at 0 s: it may take it over at 15 s
    api.down, api.timeouts, lost = True, [], []
    a.stop = FakeStop(clock)
    a.keep(lambda why: lost.append((clock.now, why)))
    (when, why), = lost
    assert TIMING.renew_deadline <= when <= TIMING.renew_deadline + 0.2 < TIMING.lease_duration
    assert "not renewed for 10 s" in why
    assert all(t <= TIMING.renew_deadline for t in api.timeouts), "no request outlasts the renew deadline"
    api.down = False
    clock.advance(TIMING.lease_duration - clock.now)
    assert b.try_acquire_or_renew()


def test_a_leader_that_finds_another_holder_gives_up_at_once(api, clock):
    a = replica(api, clock, "a")
    assert a.try_acquire_or_renew()
    api.lease["spec"]["holderIdentity"] = "intruder"
    api.lease["metadata"]["resourceVersion"] = "99"
    lost = []
    a.stop = FakeStop(clock)
    a.keep(lambda why: lost.append((clock.now, why)))
    assert lost == [(TIMING.retry_period, "intruder holds the Lease kubetune-operator")]


def test_a_leader_rides_out_a_short_outage(api, clock):
    a = replica(api, clock, "a")
    assert a.try_acquire_or_renew()
    stop, lost = FakeStop(clock), []

    def wait(seconds: float) -> bool:
        api.down = 3 <= clock.now < 8  # down for five seconds, then back
        return FakeStop.wait(stop, seconds) or clock.now > 60

    stop.wait = wait
    a.stop = stop
    a.keep(lost.append)
    assert lost == [] and api.holder() == "a" and a.leading()


def test_release_stops_the_renewals_first_so_the_lease_stays_free(api):
    """Real time, a 0.05 s retry period: release() ends keep()'s thread before it frees the Lease, so no renewal
    after it takes the Lease again for a process about to exit."""
    a = leader.Elector(api, "kubetune-operator", "a", leader.Timing(1, 0.5, 0.05))
    assert a.try_acquire_or_renew()
    a.keep_in_background(pytest.fail)
    threading.Event().wait(0.3)  # a few renewals
    renewed = api.rv
    a.release()
    assert renewed > 1 and not a._keeper.is_alive()
    released = api.rv
    threading.Event().wait(0.2)
    assert api.holder() is None and api.rv == released


def test_a_stopping_leader_does_not_report_a_loss(api, clock):
    a = replica(api, clock, "a")
    assert a.try_acquire_or_renew()
    api.down, stop = True, FakeStop(clock)

    def get(timeout: float):  # the process is told to stop while a renewal hangs past the deadline
        clock.advance(20)
        stop.set()
        raise TimeoutError("read timed out")

    api.get = get
    a.stop = stop
    a.keep(pytest.fail)


@pytest.mark.parametrize("timing", [(15, 15, 2), (15, 10, 10), (15, 10, 0), (10, 15, 2)])
def test_out_of_order_durations_are_refused_naming_the_settings(timing):
    with pytest.raises(ValueError, match=r"KUBETUNE_LEASE_.*leaderElection"):
        leader.Timing(*timing)


def test_the_settings_give_the_timing_and_the_lease():
    settings = OperatorSettings.from_env({
        "KUBETUNE_LEASE_NAME": "ops", "KUBETUNE_LEASE_NAMESPACE": "kubetune-system",
        "KUBETUNE_LEASE_DURATION_SECONDS": "6", "KUBETUNE_LEASE_RENEW_DEADLINE_SECONDS": "4",
        "KUBETUNE_LEASE_RETRY_PERIOD_SECONDS": "0.5"})
    assert (settings.lease_name, settings.lease_namespace) == ("ops", "kubetune-system")
    assert leader.Timing.of(settings) == leader.Timing(6, 4, 0.5)
    defaults = OperatorSettings.from_env({})
    assert (defaults.lease_name, defaults.lease_namespace) == ("kubetune-operator", "default")
    assert leader.Timing.of(defaults) == leader.Timing() == TIMING


def test_identities_are_unique_per_process_start():
    assert leader.identity() != leader.identity()
