"""Two operator replicas through kopf peering on the local control plane (docs/install.md, "Several replicas").

Without peering CRDs, and with `--standalone`, a lone operator is active. With the chart's peering CRDs and the
ClusterKopfPeering `kubetune`: two `python -m kubetune_operator` processes, the older active and the other on
standby (/readyz, kubetune_operator_active, distinct priorities); only the active one handles a FineTuneJob and
its deletion; SIGKILL the active one mid-run and the standby takes over within 30 s and finishes the run; a
restarted replica is younger and stands by.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.kube import free_port, get_json, http_get, kubectl, stop_process, wait_for
from tests.operator_tests import test_e2e as e2e
from tests.operator_tests.test_e2e import credentials, submit, training_spec, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]

ROOT = Path(__file__).resolve().parents[2]
PEERING_CRDS = ROOT / "charts" / "kubetune" / "crds" / "kopf.dev_peerings.yaml"
TAKEOVER_S = 30

# test_e2e.py's fixtures: the FineTuneJob CRD, S3 inputs, the stand-in trainer image
crd, s3_inputs, fake_trainer = e2e.crd, e2e.s3_inputs, e2e.fake_trainer


class Replica:
    """`python -m kubetune_operator --all-namespaces` with its own ports and log."""

    def __init__(self, cp, log: Path, *args: str):
        self.log, self.args = log, args
        self.env = {**cp.env(), "KUBETUNE_HEALTH_PORT": str(free_port()), "KUBETUNE_READY_PORT": str(free_port()),
                    "KUBETUNE_METRICS_PORT": str(free_port()), "KUBETUNE_RESYNC_SECONDS": "1",
                    "KUBETUNE_TRAINER_IMAGE": e2e.IMAGE}
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


ACTIVE, STANDBY = "200 active", "503 standby"


@pytest.fixture
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("replicas")


def crd_names(cp) -> set[str]:
    return {c["metadata"]["name"] for c in get_json(cp, "crds")["items"]}


def test_a_lone_operator_is_active_without_peering_crds_and_with_standalone(control_plane, crd, logs):
    if not {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} & crd_names(control_plane):
        auto = Replica(control_plane, logs / "auto.log").start()
        try:
            auto.wait_state(ACTIVE)
            assert auto.active_metric() == "1.0"
        finally:
            auto.stop()
    standalone = Replica(control_plane, logs / "standalone.log", "--standalone").start()
    try:
        standalone.wait_state(ACTIVE)
    finally:
        standalone.stop()


@pytest.fixture(scope="module")
def peering(control_plane):
    """The chart's peering CRDs and the ClusterKopfPeering `kubetune`; both removed afterwards."""
    before = crd_names(control_plane)
    kubectl(control_plane, "apply", "--server-side", "-f", str(PEERING_CRDS))
    for name in ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"):
        kubectl(control_plane, "wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    obj = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "kubetune"}}
    kubectl(control_plane, "apply", "-f", "-", stdin=json.dumps(obj))
    try:
        yield
    finally:
        kubectl(control_plane, "delete", "clusterkopfpeering", "kubetune", "--ignore-not-found", check=False)
        if added := crd_names(control_plane) - before:
            kubectl(control_plane, "delete", "crd", *sorted(added), check=False)


@pytest.fixture(scope="module")
def replicas(control_plane, crd, peering, tmp_path_factory):
    """[older, younger]: started one after the other, each once it is up."""
    logs = tmp_path_factory.mktemp("peers")
    older = Replica(control_plane, logs / "older.log").start()
    started = []
    try:
        older.wait_state(ACTIVE)
        started.append(older)
        younger = Replica(control_plane, logs / "younger.log").start()
        started.append(younger)
        younger.wait_state(STANDBY)
        yield started
    finally:
        for replica in started:
            replica.stop()
        print(f"replica logs: {logs}")


def peers(cp) -> dict[str, dict]:
    return get_json(cp, "clusterkopfpeering", "kubetune").get("status") or {}


def test_one_replica_is_active_and_the_other_stands_by(control_plane, replicas):
    older, younger = replicas
    assert (older.state(), younger.state()) == (ACTIVE, STANDBY)
    assert (older.active_metric(), younger.active_metric()) == ("1.0", "0.0")
    assert older.alive() and younger.alive(), "the standby is alive (liveness), only not ready"
    status = peers(control_plane)
    priorities = sorted((p["priority"] for p in status.values()), reverse=True)
    assert len(status) == 2 and len(set(priorities)) == 2, status
    assert all(p["lifetime"] <= 20 for p in status.values()), status
    assert "This replica is on standby" in younger.log.read_text()


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
        control_plane, node_agent, replicas, namespace, s3_inputs, fake_trainer):
    older, younger = replicas
    credentials(control_plane, namespace)
    spec = training_spec(s3_inputs, fake_trainer, hyperparameters={"maxSteps": 40})
    spec["resources"] = {"workers": 1, "gpusPerWorker": 1}
    submit(control_plane, namespace, "failover", spec)
    running = wait_phase(control_plane, namespace, "failover", ("Running", "Failed"))
    assert running["status"]["phase"] == "Running", running["status"]
    train_uid = get_json(control_plane, "job", "-n", namespace, "failover-train")["metadata"]["uid"]
    assert not younger.handled(), "the standby ran a handler"

    older.stop(kill=True)  # SIGKILL: no goodbye in the peering object
    killed = time.monotonic()
    younger.wait_state(ACTIVE, timeout=TAKEOVER_S)
    took = time.monotonic() - killed
    print(f"takeover after SIGKILL: {took:.1f} s")
    assert younger.active_metric() == "1.0"

    status = wait_phase(control_plane, namespace, "failover", ("Succeeded", "Failed"), timeout=120)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["result"]["adapterUri"] == s3_inputs["output"]
    assert younger.handled()
    train = get_json(control_plane, "job", "-n", namespace, "failover-train")
    assert train["metadata"]["uid"] == train_uid, "the standby took over the training Job, no new one"
    assert len(peers(control_plane)) == 1, "the dead replica is cleaned from the peering object"

    # A new replica is younger than the one now working: it stands by, no flapping.
    since = older.log_size()
    older.start()
    older.wait_state(STANDBY)
    time.sleep(3)
    assert (older.state(), younger.state()) == (STANDBY, ACTIVE)
    assert not older.handled(since), "the restarted replica ran a handler"
