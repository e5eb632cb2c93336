"""Preemption-safe runs end to end: a worker evicted through the eviction API (as `kubectl drain` and the cluster
autoscaler do) gets SIGTERM and its grace period; the trainer's ranks agree to stop at the next step,
rank 0 writes a checkpoint, the evicted rank exits 75 and its peers 76 (PeerLost). The training Job's
podFailurePolicy charges none of them to backoffLimit, the Job replaces the workers and they resume from that
checkpoint. Fixtures and helpers come from test_e2e.py (the real trainer on CPU workers, the node agent).
"""

from __future__ import annotations

import json

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

# Two workers: the victim and rank 0, which stops for its lost peer. Each extra worker doubles the Job controller's
# pod-failure backoff before the last round (see below): three workers waited 320 s, two wait 80 s.
WORKERS, STEPS, VICTIM = 2, 120, "1"


def evict(cp, namespace: str, name: str) -> None:
    """POST pods/<name>/eviction (policy/v1): the API server sets DisruptionTarget, then deletes the pod with
    its terminationGracePeriodSeconds."""
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": namespace}}
    kubectl(cp, "create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{name}/eviction", "-f", "-",
            stdin=json.dumps(body))


def running_worker(cp, namespace: str, index: str, not_in: set[str]) -> str | None:
    """The running pod of worker `index` that is none of `not_in` (earlier ones), if there is one."""
    return next((p["metadata"]["name"] for p in training_job_pods(cp, namespace, "preempted")
                 if p["metadata"]["name"] not in not_in and p.get("status", {}).get("phase") == "Running"
                 and not p["metadata"].get("deletionTimestamp")
                 and p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == index), None)


def events(agent, namespace: str, pod: str, kind: str) -> list[dict]:
    """rank 0 reports the trainer's events (the other ranks print none)."""
    try:
        return [e for e in trainer_events(agent.logs(namespace, pod)) if e["event"] == kind]
    except FileNotFoundError:
        return []


def evict_while_training(cp, agent, namespace: str, rank0: str, resumed: int) -> int:
    """Once rank 0 has trained a step past `resumed`, evict worker VICTIM; the step the workers stopped at."""
    wait_for(f"{rank0} to train a step after {resumed}", lambda: [
        e for e in events(agent, namespace, rank0, "train") if e["step"] > resumed], timeout=300, every=0.2)
    evict(cp, namespace, running_worker(cp, namespace, VICTIM, set()))
    [stop] = wait_for(f"{rank0} to stop for its peer", lambda: events(agent, namespace, rank0, "stopped"),
                      timeout=120, every=0.2)
    assert stop["reason"] == "peer" and stop["step"] > resumed, stop
    assert [e["step"] for e in events(agent, namespace, rank0, "checkpoint")] == [stop["step"]]
    return stop["step"]


def test_a_worker_evicted_twice_resumes_from_its_sigterm_checkpoints(control_plane, node_agent, namespace,
                                                                     operator, tiny_model, real_trainer):
    credentials(control_plane, namespace)
    d = tiny_model["data"]
    submit(control_plane, namespace, "preempted", {
        "baseModel": {"uri": tiny_model["model"]}, "image": real_trainer,
        "dataset": {"train": f"{d}train.jsonl"},
        "hyperparameters": {"maxSteps": STEPS, "batchSize": 2, "maxSeqLength": 256, "loggingSteps": 1},
        "checkpoint": {"everySteps": 10 * STEPS},  # no periodic checkpoint: a resume can only be from a SIGTERM's
        "output": {"uri": tiny_model["output"]},
        "storage": {"endpoint": tiny_model["endpoint"], "secretRef": {"name": "s3-credentials"}},
        "resources": {"workers": WORKERS, "gpusPerWorker": 0},
        "runPolicy": {"backoffLimit": 1, "terminationGracePeriodSeconds": 60},
    })
    ranks0: list[str] = []  # rank 0's pod of each round of workers (rank 0 reports the trainer's events)
    stopped_at: list[int] = []  # where each round stopped: its SIGTERM checkpoint
    for _ in range(2):
        rank0 = wait_for("rank 0 of a new round", lambda: running_worker(
            control_plane, namespace, "0", set(ranks0)), timeout=300)
        ranks0.append(rank0)
        stopped_at.append(evict_while_training(control_plane, node_agent, namespace, rank0,
                                               stopped_at[-1] if stopped_at else 0))

    # The Job controller delays a replacement pod by 10 s x 2^(failed pods - 1), podFailurePolicy's ignored ones
    # included: after the second round's 2 x WORKERS failed workers that is 80 s, then the last round trains.
    status = wait_phase(control_plane, namespace, "preempted", ("Succeeded", "Failed"), timeout=600)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["preemptions"] == 2 and status["peerLost"] == 2 * (WORKERS - 1), status
    assert status.get("restarts") == 0, "neither the evicted worker nor its peers are charged to backoffLimit"
    assert not get_json(control_plane, "job", "-n", namespace, "preempted-train")["status"].get("failed")

    [last] = [p["metadata"]["name"] for p in training_job_pods(control_plane, namespace, "preempted")
              if p["metadata"]["name"] not in ranks0 and p["spec"]["hostname"].endswith("-train-0")]
    for rank0, step in zip([*ranks0[1:], last], stopped_at, strict=True):
        [resumed] = events(node_agent, namespace, rank0, "resumed")
        assert resumed["step"] == step and f"step-{step:08d}" in resumed["checkpoint"], resumed
        assert events(node_agent, namespace, rank0, "train")[0]["step"] == step + 1
    manifest = Storage(StorageEndpoint(endpoint=tiny_model["endpoint"])).get_json(status["result"]["manifestUri"])
    assert [e["step"] for e in manifest["history"]] == list(range(1, STEPS + 1)), "one loss curve, no step twice"
    reasons = [e["reason"] for e in events_of(control_plane, namespace, "preempted")]
    assert reasons.count("WorkerPreempted") >= 2 and "PeerLost" in reasons and "WorkerFailed" not in reasons
