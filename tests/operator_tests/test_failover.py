"""Two operator replicas electing a leader through a Lease on the local control plane (docs/operator.md, "Leader
election and high availability"; docs/install.md, "Several replicas").

With `--standalone`, a lone operator is active and takes no Lease. Two `python -m kubetune_operator` processes with
a Lease in their own namespace: the first holds it and is active, the other stands by (/readyz,
kubetune_operator_active, alive but not ready); only the active one handles a FineTuneJob and its deletion;
SIGKILL the active one mid-run and the standby takes over within 30 s and finishes the run; a restarted replica
stands by; a clean stop hands the Lease over at once; a leader that finds another holder in its Lease exits
(status 3) at once. A watcher polls both replicas' /readyz all along: never are both active.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from kubetune_operator.leader import LOST_EXIT_CODE

from tests.kube import free_port, get_json, http_get, kubectl, stop_process, wait_for
from tests.operator_tests import test_e2e as e2e
from tests.operator_tests.fake_trainer import release
from tests.operator_tests.test_e2e import credentials, submit, training_spec, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]

ROOT = Path(__file__).resolve().parents[2]
TAKEOVER_S = 30  # the Lease's duration (15 s) and a retry period (2 s), with room to spare
HANDOVER_S = 8  # after a clean stop: the standby's next attempt (2 s), with room to spare

# test_e2e.py's fixtures: the FineTuneJob CRD, S3 inputs, the stand-in trainer image
crd, s3_inputs, fake_trainer = e2e.crd, e2e.s3_inputs, e2e.fake_trainer


class Replica:
    """`python -m kubetune_operator --all-namespaces` with its own ports and log, electing through the Lease
    `lease` (namespace/name)."""

    def __init__(self, cp, log: Path, *args: str, lease: tuple[str, str] = ("default", "kubetune-operator"),
                 env: dict | None = None):
        self.log, self.args = log, args
        self.env = {**cp.env(), "KUBETUNE_HEALTH_PORT": str(free_port()), "KUBETUNE_READY_PORT": str(free_port()),
                    "KUBETUNE_METRICS_PORT": str(free_port()), "KUBETUNE_RESYNC_SECONDS": "1",
                    "KUBETUNE_TRAINER_IMAGE": e2e.IMAGE,
                    "KUBETUNE_LEASE_NAMESPACE": lease[0], "KUBETUNE_LEASE_NAME": lease[1], **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Replica:
        with self.log.open("a") as out:
            cmd = [sys.executable, "-m", "kubetune_operator", "--all-namespaces", "-v", *self.args]
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_for(f"{self.log.stem} to start", lambda: self.proc.poll() is not None or self.state() != "", 60)
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return self

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            stop_process(self.proc, kill)

    def state(self) -> str:
        """/readyz: (200) active, (503) standby or starting; "" when nothing answers."""
        url = f"http://127.0.0.1:{self.env['KUBETUNE_READY_PORT']}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                return f"{resp.status} {resp.read().decode()}"
        except urllib.error.HTTPError as err:
            return f"{err.code} {err.read().decode()}"
        except OSError:
            return ""

    def wait_state(self, expected: str, timeout: float = 60) -> None:
        wait_for(f"{self.log.stem} to report {expected!r}", lambda: self.state() == expected, timeout)

    def active_metric(self) -> str:
        lines = http_get(f"http://127.0.0.1:{self.env['KUBETUNE_METRICS_PORT']}/metrics")[1].splitlines()
        return next(line.split()[1] for line in lines if line.startswith("kubetune_operator_active "))

    def alive(self) -> bool:
        url = f"http://127.0.0.1:{self.env['KUBETUNE_HEALTH_PORT']}/healthz"
        return http_get(url)[0] == 200

    def handled(self, since: int = 0) -> bool:
        """Whether kopf ran a handler (its `kopf.objects` log lines), in the log from offset `since` on."""
        return "kopf.objects" in self.log.read_text()[since:]

    def log_size(self) -> int:
        return len(self.log.read_text())

    def identity(self) -> str:
        """The holder identity it logged on taking the Lease ("" before)."""
        marker = "This replica ("
        lines = [line for line in self.log.read_text().splitlines() if marker in line and "it is the leader" in line]
        return lines[-1].split(marker, 1)[1].split(")", 1)[0] if lines else ""


ACTIVE, STANDBY = "200 active", "503 standby"


@pytest.fixture
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("replicas")


def lease_of(cp, namespace: str, name: str) -> dict:
    return get_json(cp, "lease", "-n", namespace, name)


def test_a_lone_standalone_operator_is_active_and_takes_no_lease(control_plane, crd, logs):
    name = f"standalone-{uuid.uuid4().hex[:6]}"
    standalone = Replica(control_plane, logs / "standalone.log", "--standalone", lease=("default", name)).start()
    try:
        standalone.wait_state(ACTIVE)
        assert standalone.active_metric() == "1.0"
        assert kubectl(control_plane, "get", "lease", "-n", "default", name, check=False).returncode != 0
    finally:
        standalone.stop()


@pytest.fixture(scope="module")
def lease(control_plane):
    """(namespace, name): the replicas' Lease, in a namespace of their own (the chart: the release namespace)."""
    namespace = f"operator-{uuid.uuid4().hex[:6]}"
    kubectl(control_plane, "create", "namespace", namespace)
    try:
        yield namespace, "kubetune-operator"
    finally:
        kubectl(control_plane, "delete", "namespace", namespace, "--wait=false", check=False)


class Watcher:
    """Polls every replica's /readyz every 0.2 s in a thread; `both` lists the instants two said `active`."""

    def __init__(self, replicas: list[Replica]):
        self.replicas, self.both, self.samples = replicas, [], 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            states = [r.state() for r in self.replicas if r.proc and r.proc.poll() is None]
            self.samples += 1
            if states.count(ACTIVE) > 1:
                self.both.append(time.monotonic())


@pytest.fixture(scope="module")
def replicas(control_plane, crd, lease, s3_server, tmp_path_factory):
    """[older, younger]: started one after the other, each once it is up; a Watcher runs all along."""
    logs = tmp_path_factory.mktemp("peers")
    credentials = e2e.platform_credentials(s3_server.endpoint)
    older = Replica(control_plane, logs / "older.log", lease=lease, env=credentials).start()
    started = []
    watcher = Watcher(started)
    try:
        older.wait_state(ACTIVE)
        started.append(older)
        younger = Replica(control_plane, logs / "younger.log", lease=lease, env=credentials).start()
        started.append(younger)
        younger.wait_state(STANDBY)
        yield started
    finally:
        watcher.stop.set()
        for replica in started:
            replica.stop()
        print(f"replica logs: {logs}; /readyz sampled {watcher.samples} times")
    assert not watcher.both, f"both replicas active at {len(watcher.both)} samples"


def test_one_replica_is_active_and_the_other_stands_by(control_plane, replicas, lease):
    older, younger = replicas
    assert (older.state(), younger.state()) == (ACTIVE, STANDBY)
    assert (older.active_metric(), younger.active_metric()) == ("1.0", "0.0")
    assert older.alive() and younger.alive(), "the standby is alive (liveness), only not ready"
    spec = lease_of(control_plane, *lease)["spec"]
    assert spec["holderIdentity"] == older.identity() != "" and spec["leaseDurationSeconds"] == 15
    assert not younger.identity()
    assert f"stands by: {older.identity()} holds the Lease" in younger.log.read_text()


def test_the_leader_renews_its_lease(control_plane, replicas, lease):
    before = lease_of(control_plane, *lease)["spec"]["renewTime"]
    wait_for("a renewal", lambda: lease_of(control_plane, *lease)["spec"]["renewTime"] != before, 10)


def test_only_the_active_replica_handles_a_job_and_its_deletion(control_plane, replicas, namespace):
    older, younger = replicas
    submit(control_plane, namespace, "short-lived", {
        "baseModel": {"uri": "s3://nowhere/model/"}, "dataset": {"train": "s3://nowhere/train.jsonl"},
        "output": {"uri": "s3://nowhere/out/"}, "runPolicy": {"suspend": True}})
    wait_for("its ConfigMap", lambda: kubectl(control_plane, "get", "configmap", "-n", namespace,
                                              "short-lived-config", check=False).returncode == 0, 60)
    kubectl(control_plane, "delete", "ftj", "-n", namespace, "short-lived", "--wait=true", "--timeout=60s")
    assert older.handled()
    assert not younger.handled(), "the standby ran a handler"


def test_the_standby_takes_over_from_a_killed_replica_and_finishes_its_job(
        control_plane, node_agent, replicas, lease, namespace, s3_inputs, fake_trainer):
    older, younger = replicas
    credentials(control_plane, namespace)
    # held after its second step until released: it runs through the takeover however slow the machine
    spec = training_spec(s3_inputs, fake_trainer, hyperparameters={"maxSteps": 6})
    spec["resources"] = {"workers": 1, "gpusPerWorker": 1}
    submit(control_plane, namespace, "failover-held", spec)
    running = wait_phase(control_plane, namespace, "failover-held", ("Running", "Failed"))
    assert running["status"]["phase"] == "Running", running["status"]
    train_uid = get_json(control_plane, "job", "-n", namespace, "failover-held-train-1")["metadata"]["uid"]
    assert not younger.handled(), "the standby ran a handler"

    older.stop(kill=True)  # SIGKILL: the Lease is not released
    killed = time.monotonic()
    younger.wait_state(ACTIVE, timeout=TAKEOVER_S)
    took = time.monotonic() - killed
    print(f"takeover after SIGKILL: {took:.1f} s")
    assert younger.active_metric() == "1.0"
    spec = lease_of(control_plane, *lease)["spec"]
    assert spec["holderIdentity"] == younger.identity() and spec["leaseTransitions"] == 1

    release(get_json(control_plane, "ftj", "-n", namespace, "failover-held")["metadata"]["uid"])
    status = wait_phase(control_plane, namespace, "failover-held", ("Succeeded", "Failed"), timeout=120)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["result"]["adapterUri"] == s3_inputs["output"]
    assert younger.handled()
    train = get_json(control_plane, "job", "-n", namespace, "failover-held-train-1")
    assert train["metadata"]["uid"] == train_uid, "the standby took over the training Job, no new one"

    # A restarted replica finds the Lease held and renewed: it stands by, no flapping.
    since = older.log_size()
    older.start()
    older.wait_state(STANDBY)
    time.sleep(3)
    assert (older.state(), younger.state()) == (STANDBY, ACTIVE)
    assert not older.handled(since), "the restarted replica ran a handler"


def test_a_clean_stop_releases_the_lease_and_the_standby_takes_over_at_once(control_plane, replicas, lease):
    older, younger = replicas  # after the takeover: younger leads, older stands by
    younger.wait_state(ACTIVE)
    older.wait_state(STANDBY)
    younger.stop()  # SIGTERM: kopf stops, then the Lease is released
    stopped = time.monotonic()
    assert younger.proc.returncode == 0, younger.log.read_text()[-3000:]
    assert "released the Lease" in younger.log.read_text()
    older.wait_state(ACTIVE, timeout=HANDOVER_S)
    print(f"handover after a clean stop: {time.monotonic() - stopped:.1f} s")
    assert lease_of(control_plane, *lease)["spec"]["holderIdentity"] == older.identity()
    younger.start()
    younger.wait_state(STANDBY)


def test_a_leader_that_finds_another_holder_exits_at_once(control_plane, replicas, lease):
    """Were the Lease ever written by someone else (a clock jump, an intruder with rights in the operator's
    namespace), the leader stops reconciling within a retry period: it exits with LOST_EXIT_CODE."""
    older, younger = replicas  # older leads
    older.wait_state(ACTIVE)
    patch = {"spec": {"holderIdentity": "intruder"}}
    kubectl(control_plane, "patch", "lease", "-n", lease[0], lease[1], "--type=merge", "-p", json.dumps(patch))
    patched = time.monotonic()
    wait_for("the leader to exit", lambda: older.proc.poll() is not None, 10)
    print(f"the leader exited {time.monotonic() - patched:.1f} s after the Lease named another holder")
    assert older.proc.returncode == LOST_EXIT_CODE
    assert "Lost the leadership: intruder holds the Lease" in older.log.read_text()
    # nobody renews for the intruder: the standby takes over after the Lease's duration
    younger.wait_state(ACTIVE, timeout=TAKEOVER_S)
    assert lease_of(control_plane, *lease)["spec"]["holderIdentity"] == younger.identity()
