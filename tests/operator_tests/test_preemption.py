"""Preemption-safe runs end to end: a worker evicted through the eviction API (as `kubectl drain` and the cluster
autoscaler do) gets SIGTERM and its grace period; the trainer's ranks agree to stop at the next step,
rank 0 writes a checkpoint, the evicted rank exits 75 and its peers 76 (PeerLost). That ends the attempt: its
training Job fails at once (FailJob on DisruptionTarget), the operator counts a preemption and creates the next
attempt's Job as soon as the old workers are gone; they resume from that checkpoint. The time to the new workers
does not grow with the incidents (no Job controller back-off). Fixtures and helpers come from test_e2e.py (the
real trainer on CPU workers, the node agent).
"""

from __future__ import annotations

import json
import time

import pytest
from kubetune_api import StorageEndpoint
from kubetune_trainer.storage import Storage

from tests.kube import get_json, kubectl, wait_for
from tests.operator_tests import test_e2e as e2e
from tests.operator_tests.test_e2e import (
    credentials,
    events_of,
    submit,
    trainer_events,
    training_job_pods,
    wait_phase,
)

crd, operator, tiny_model, real_trainer = e2e.crd, e2e.operator, e2e.tiny_model, e2e.real_trainer  # fixtures
author_policy = e2e.author_policy  # the operator's (it trusts the API server for authors)

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]

# Two workers (the evicted one and a peer that checkpoints), three evictions: the Job controller's back-off this
# replaces would wait 20 s after the first (10 s x 2^(failed pods - 1)), 80 s after the second and 5 min 20 s after
# the third.
WORKERS, STEPS, VICTIM, ROUNDS = 2, 60, "1", 3
GAP_LIMIT = 30  # seconds from the last old worker's end to all the new ones running, on a loaded 2-core machine


def evict(cp, namespace: str, name: str) -> None:
    """POST pods/<name>/eviction (policy/v1): the API server sets DisruptionTarget, then deletes the pod with
    its terminationGracePeriodSeconds."""
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": namespace}}
    kubectl(cp, "create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{name}/eviction", "-f", "-",
            stdin=json.dumps(body))


def workers(cp, namespace: str, attempt: int) -> list[dict]:
    return [p for p in training_job_pods(cp, namespace, "preempted")
            if p["metadata"]["labels"].get("kubetune.io/attempt") == str(attempt)]


def running(pods: list[dict]) -> list[dict]:
    return [p for p in pods if p.get("status", {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")]


def running_worker(cp, namespace: str, index: str, attempt: int) -> str | None:
    """The running pod of worker `index` of attempt `attempt`, if there is one."""
    return next((p["metadata"]["name"] for p in running(workers(cp, namespace, attempt))
                 if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == index), None)


def events(agent, namespace: str, pod: str, kind: str) -> list[dict]:
    """rank 0 reports the trainer's events (the other ranks print none)."""
    try:
        return [e for e in trainer_events(agent.logs(namespace, pod)) if e["event"] == kind]
    except FileNotFoundError:
        return []


def evict_while_training(cp, agent, namespace: str, attempt: int, rank0: str, resumed: int) -> int:
    """Once rank 0 has trained a step past `resumed`, evict worker VICTIM; the step the workers stopped at."""
    wait_for(f"{rank0} to train a step after {resumed}", lambda: [
        e for e in events(agent, namespace, rank0, "train") if e["step"] > resumed], timeout=300, every=0.2)
    evict(cp, namespace, running_worker(cp, namespace, VICTIM, attempt))
    [stop] = wait_for(f"{rank0} to stop for its peer", lambda: events(agent, namespace, rank0, "stopped"),
                      timeout=120, every=0.2)
    assert stop["reason"] == "peer" and stop["step"] > resumed, stop
    assert [e["step"] for e in events(agent, namespace, rank0, "checkpoint")] == [stop["step"]]
    return stop["step"]


def replacement_time(cp, namespace: str, attempt: int) -> float:
    """Seconds from the moment no worker of `attempt` runs to the moment every worker of the next one does."""
    wait_for(f"the workers of attempt {attempt} to stop", lambda: not running(workers(cp, namespace, attempt)),
             timeout=120, every=0.1)
    gone = time.monotonic()
    try:
        wait_for(f"the workers of attempt {attempt + 1} to run", lambda: len(running(workers(
            cp, namespace, attempt + 1))) == WORKERS, timeout=120, every=0.1)
    except AssertionError as e:
        pods = {p["metadata"]["name"]: p["status"].get("phase") for p in training_job_pods(cp, namespace, "preempted")}
        raise AssertionError(f"{e}; status {get_json(cp, 'ftj', '-n', namespace, 'preempted')['status']}; "
                             f"workers {pods}") from None
    return time.monotonic() - gone


def test_three_preemptions_each_end_an_attempt_and_the_next_starts_at_once(control_plane, node_agent, namespace,
                                                                           operator, tiny_model, real_trainer):
    credentials(control_plane, namespace)
    d = tiny_model["data"]
    started = time.monotonic()
    submit(control_plane, namespace, "preempted", {
        "baseModel": {"uri": tiny_model["model"]}, "image": real_trainer,
        "dataset": {"train": f"{d}train.jsonl"},
        "hyperparameters": {"maxSteps": STEPS, "batchSize": 2, "maxSeqLength": 256, "loggingSteps": 1},
        "checkpoint": {"everySteps": 10 * STEPS},  # no periodic checkpoint: a resume can only be from a SIGTERM's
        "output": {"uri": tiny_model["output"]},
        "storage": {"endpoint": tiny_model["endpoint"], "secretRef": {"name": "s3-credentials"}},
        "resources": {"workers": WORKERS, "gpusPerWorker": 0},
        "runPolicy": {"backoffLimit": 0, "maxPreemptions": ROUNDS, "terminationGracePeriodSeconds": 60},
    })
    ranks0: list[str] = []  # rank 0's pod of each attempt (rank 0 reports the trainer's events)
    stopped_at: list[int] = []  # where each attempt stopped: its SIGTERM checkpoint
    gaps: list[float] = []
    for attempt in range(1, ROUNDS + 1):
        rank0 = wait_for(f"rank 0 of attempt {attempt}", lambda a=attempt: running_worker(
            control_plane, namespace, "0", a), timeout=300)
        ranks0.append(rank0)
        stopped_at.append(evict_while_training(control_plane, node_agent, namespace, attempt, rank0,
                                               stopped_at[-1] if stopped_at else 0))
        gaps.append(replacement_time(control_plane, namespace, attempt))
    ranks0.append(wait_for("rank 0 of the last attempt", lambda: running_worker(
        control_plane, namespace, "0", ROUNDS + 1), timeout=60))

    status = wait_phase(control_plane, namespace, "preempted", ("Succeeded", "Failed"), timeout=600)["status"]
    print(f"\nreplacement workers running {', '.join(f'{g:.1f}' for g in gaps)} s after the old ones stopped; "
          f"the run took {time.monotonic() - started:.0f} s")
    assert status["phase"] == "Succeeded", status
    attempts = status["attempts"]
    assert (attempts["current"], attempts["preemptions"]) == (ROUNDS + 1, ROUNDS), attempts
    assert "failures" not in attempts and "infrastructure" not in attempts, attempts
    assert max(gaps) < GAP_LIMIT and max(gaps) < 3 * min(gaps) + 5, f"not flat: {gaps}"
    # the recreate path: one Job per attempt, the earlier ones deleted once counted
    assert [j["metadata"]["name"] for j in get_json(control_plane, "jobs", "-n", namespace, "-l",
                                                     "app.kubernetes.io/component=workers")["items"]] == [
        f"preempted-train-{ROUNDS + 1}"]
    assert not get_json(control_plane, "job", "-n", namespace, f"preempted-train-{ROUNDS + 1}")["status"].get(
        "failed")

    for rank0, step in zip(ranks0[1:], stopped_at, strict=True):
        [resumed] = events(node_agent, namespace, rank0, "resumed")
        assert resumed["step"] == step and f"step-{step:08d}" in resumed["checkpoint"], resumed
        assert events(node_agent, namespace, rank0, "train")[0]["step"] == step + 1
    manifest = Storage(StorageEndpoint(endpoint=tiny_model["endpoint"])).get_json(status["result"]["manifestUri"])
    assert [e["step"] for e in manifest["history"]] == list(range(1, STEPS + 1)), "one loss curve, no step twice"
    reasons = [e["reason"] for e in events_of(control_plane, namespace, "preempted", {"WorkerPreempted": ROUNDS})]
    assert reasons.count("WorkerPreempted") >= ROUNDS and "WorkerFailed" not in reasons, reasons
