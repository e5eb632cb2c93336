"""`make dev-cluster` end to end: `python -m kubetune_dev.cluster up --dev` (in a temporary state directory, so a
developer's own dev cluster is left alone), then what it prints: `export KUBECONFIG=...` and
`kubectl apply -f <example>`; the example reaches Succeeded on CPU; `down` leaves no process behind.

Needs the control plane binaries (`make control-plane`).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from kubetune_api import StorageEndpoint
from kubetune_dev.s3server import FAKE_CREDENTIALS
from kubetune_trainer.storage import Storage

from tests.kube import KUBECTL, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def cluster_cli(state_dir: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBETUNE_STATE": str(state_dir)}
    return subprocess.run([sys.executable, "-m", "kubetune_dev.cluster", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process on the machine."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            found[int(proc.name)] = (ppid, (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError, IndexError):
            continue
    return found


def descendants(pid: int) -> set[int]:
    table, found, todo = processes(), set(), [pid]
    while todo:
        parent = todo.pop()
        children = {p for p, (ppid, _) in table.items() if ppid == parent}
        found |= children
        todo += children
    return found


def left_over(pids: set[int], state_dir: Path) -> dict[int, str]:
    """Which of pids, or any process naming the state directory, still runs."""
    return {p: cmd for p, (_, cmd) in processes().items() if p in pids or str(state_dir) in cmd}


def test_dev_cluster_runs_the_example_it_prints(tmp_path, monkeypatch):
    """With --kueue (make dev-cluster KUEUE=1), which adds the real Kueue and its queues beside the example."""
    state_dir = tmp_path / "dev-cluster"
    up = cluster_cli(state_dir, "up", "--dev", "--kueue", "--pretrain-steps", "20", "--train-records", "96",
                     timeout=900)  # a smaller demo: the example as printed, on fewer records
    try:
        daemon_log = (state_dir / "daemon.log").read_text() if (state_dir / "daemon.log").exists() else ""
        assert up.returncode == 0, f"{up.stdout}\n{up.stderr}\n{daemon_log[-3000:]}"
        typed = [line for line in up.stdout.splitlines() if not line.startswith("#")]
        assert typed[0].startswith("export KUBECONFIG=") and typed[1].startswith("kubectl apply -f ")
        assert typed[2:] == ["kubectl get ftj -w"], up.stdout
        assert "make dev-cluster-down" in up.stdout and "s3://adapters/support-bot-demo/" in up.stdout
        env = {**os.environ, "KUBECONFIG": typed[0].removeprefix("export KUBECONFIG=")}
        state = json.loads((state_dir / "state.json").read_text())
        started = descendants(state["pid"])

        def kubectl(*args: str) -> str:
            out = subprocess.run([KUBECTL, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
            return out.stdout

        kubectl(*shlex.split(typed[1])[1:])  # as printed, from the repository root
        assert "queueName: user-queue" in up.stdout, up.stdout
        queue = json.loads(kubectl("get", "localqueue", "user-queue", "-n", "default", "-o", "json"))
        assert queue["spec"]["clusterQueue"] == "cluster-queue"
        cq = json.loads(kubectl("get", "clusterqueue", "cluster-queue", "-o", "json"))
        quota = {r["name"]: r["nominalQuota"] for r in cq["spec"]["resourceGroups"][0]["flavors"][0]["resources"]}
        assert quota["nvidia.com/gpu"] == "2", quota  # the node's GPUs
        wait_for("the ClusterQueue to be active", lambda: any(
            c["type"] == "Active" and c["status"] == "True" for c in json.loads(kubectl(
                "get", "clusterqueue", "cluster-queue", "-o", "json")).get("status", {}).get("conditions") or []),
            timeout=60)

        def finished():
            status = json.loads(kubectl("get", "ftj", "support-bot-demo", "-o", "json")).get("status", {})
            return status if status.get("phase") in ("Succeeded", "Failed") else None

        status = wait_for("the example to finish", finished, timeout=600, every=2)
        assert status["phase"] == "Succeeded", status
        assert status["result"]["adapterUri"] == "s3://adapters/support-bot-demo/"
        for name, value in FAKE_CREDENTIALS.items():  # the server takes any
            monkeypatch.setenv(name, value)
        manifest = Storage(StorageEndpoint(endpoint=state["dev"]["s3"])).get_json(status["result"]["manifestUri"])
        assert manifest["steps"] == manifest["totalSteps"] > 0 and manifest["processes"] == 1
        assert status["progress"]["step"] == manifest["steps"], status["progress"]
        started |= descendants(state["pid"]) | {state["pid"]}
    finally:
        down = cluster_cli(state_dir, "down", timeout=120)
    assert down.returncode == 0, down.stderr
    wait_for("every process of the dev cluster to exit", lambda: not left_over(started, state_dir), timeout=30)
