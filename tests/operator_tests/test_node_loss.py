"""A node lost under a running worker (a second process node agent, stopped without a word and its Node deleted,
as a cloud's node controller does for a VM that is gone): the pod GC deletes its pods, the attempt ends with no
worker left to say why, and it counts as the infrastructure's (not a failure of the trainer); the next attempt
runs on the other node. Fixtures and helpers come from test_e2e.py."""

from __future__ import annotations

import time

import pytest
from kubetune_dev.cluster.agent import NodeAgent

from tests.kube import get_json, kubectl, wait_for
from tests.operator_tests import test_e2e as e2e
from tests.operator_tests.fake_trainer import release
from tests.operator_tests.test_e2e import credentials, events_of, submit, training_job_pods, wait_phase

crd, operator, fake_trainer, s3_inputs, author_policy = (e2e.crd, e2e.operator, e2e.fake_trainer, e2e.s3_inputs,
                                                         e2e.author_policy)  # fixtures

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]

LOST = "kubetune-node-lost"


@pytest.fixture
def doomed_node(control_plane, node_agent, fake_trainer, tmp_path):
    """A second node with the first one's images; the first is cordoned until the test uncordons it."""
    agent = NodeAgent(str(control_plane.kubeconfig), node_name=LOST, capacity={"cpu": "8", "memory": "32Gi"},
                      labels={"kubetune.io/node-agent": "process"}, state_dir=str(tmp_path / "lost"), backoff_s=1.0)
    agent.image_rules = list(node_agent.image_rules)
    agent.start(timeout=120)
    kubectl(control_plane, "cordon", node_agent.node_name)
    try:
        yield agent
    finally:
        kubectl(control_plane, "uncordon", node_agent.node_name)
        agent.stop(grace=1)
        kubectl(control_plane, "delete", "node", LOST, "--ignore-not-found", "--wait=false")


def test_a_lost_node_ends_the_attempt_as_the_infrastructures(control_plane, node_agent, namespace, operator,
                                                             s3_inputs, fake_trainer, doomed_node):
    credentials(control_plane, namespace)
    spec = e2e.training_spec(s3_inputs, fake_trainer, hyperparameters={"maxSteps": 4})
    spec["resources"] = {"workers": 1, "gpusPerWorker": 0}
    submit(control_plane, namespace, "node-held", spec)  # "held": it waits after step 2 until released
    [pod] = wait_for("the worker to run on the doomed node", lambda: [
        p for p in training_job_pods(control_plane, namespace, "node-held")
        if p["status"].get("phase") == "Running" and p["spec"].get("nodeName") == LOST], timeout=180)
    started = time.monotonic()
    doomed_node.stop(grace=0)  # the node is gone: nobody reports the pod's end
    kubectl(control_plane, "uncordon", node_agent.node_name)
    kubectl(control_plane, "delete", "node", LOST)

    def next_attempt():
        s = get_json(control_plane, "ftj", "-n", namespace, "node-held").get("status") or {}
        return s if (s.get("attempts") or {}).get("current") == 2 else None

    s = wait_for("the pod GC and the operator to end the attempt", next_attempt, timeout=180)
    ended = time.monotonic() - started
    assert (s["attempts"]["infrastructure"], s["attempts"].get("failures")) == (1, None), s["attempts"]
    [again] = wait_for("the next attempt's worker", lambda: [
        p for p in training_job_pods(control_plane, namespace, "node-held")
        if p["status"].get("phase") == "Running" and p["metadata"]["labels"]["kubetune.io/attempt"] == "2"],
        timeout=120)
    assert again["spec"]["nodeName"] == node_agent.node_name and again["metadata"]["name"] != pod["metadata"]["name"]
    release(get_json(control_plane, "ftj", "-n", namespace, "node-held")["metadata"]["uid"])
    done = wait_phase(control_plane, namespace, "node-held", ("Succeeded", "Failed"), timeout=120)["status"]
    print(f"\nthe lost node's attempt ended {ended:.0f} s after the node went (the pod GC's quarantine)")
    assert done["phase"] == "Succeeded", done
    assert done["attempts"]["current"] == 2 and done["attempts"]["infrastructure"] == 1, done["attempts"]
    assert "failures" not in done["attempts"] and done["attempts"]["lastIncident"].startswith("infrastructure: ")
    assert [e["type"] for e in events_of(control_plane, namespace, "node-held", {"InfrastructureFailed": 1})
            if e["reason"] == "InfrastructureFailed"] == ["Warning"]
