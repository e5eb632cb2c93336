"""Kueue installed while the operator runs (discovery.py): a queued job waits for it, then goes through Kueue's
Workload without an operator restart. The operator serves one namespace (`--namespace`), where kopf reads
discovery only once and never watches CRDs: only the operator's own discovery check can notice Kueue."""

from __future__ import annotations

import uuid

import pytest
from kubetune_dev.cluster.kueue import Kueue
from kubetune_operator.kueue import GROUP

from tests.kube import drop_finalizers, get_json, kubectl, wait_for
from tests.operator_tests import test_e2e as e2e
from tests.operator_tests.test_e2e import credentials, submit, wait_phase
from tests.operator_tests.test_kueue import GPU, fake_job

crd, fake_trainer, s3_inputs, author_policy = e2e.crd, e2e.fake_trainer, e2e.s3_inputs, e2e.author_policy  # fixtures

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]


@pytest.fixture(scope="module")
def served_namespace(control_plane):
    name = f"kueue-live-{uuid.uuid4().hex[:6]}"
    kubectl(control_plane, "create", "namespace", name)
    yield name
    kubectl(control_plane, "delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="module")
def without_kueue(control_plane):
    """No Kueue CRDs (a module that ran Kueue earlier leaves them): the operator starts without Kueue. That Kueue
    is gone, so the finalizers it put on its objects (ClusterQueues, LocalQueues, Workloads, ...) are taken off
    first: a CRD is deleted only once its objects are."""
    names = [c["metadata"]["name"] for c in get_json(control_plane, "crd")["items"] if c["spec"]["group"] == GROUP]
    for resource in names:
        drop_finalizers(control_plane, resource, "-A")
    if names:
        kubectl(control_plane, "delete", "crd", *names, "--wait=true", "--timeout=120s")


@pytest.fixture(scope="module")
def operator(control_plane, crd, author_policy, without_kueue, served_namespace, tmp_path_factory):
    env = e2e.operator_env(control_plane, KUBETUNE_POLICY_BINDING=author_policy)
    yield from e2e.run_operator(tmp_path_factory, env, ("--namespace", served_namespace))


def test_kueue_installed_later_admits_a_waiting_job_without_a_restart(control_plane, node_agent, served_namespace,
                                                                     operator, s3_inputs, fake_trainer):
    ns = served_namespace
    credentials(control_plane, ns)
    submit(control_plane, ns, "later", fake_job(s3_inputs, fake_trainer, "queue", steps=3))

    def waiting():
        s = get_json(control_plane, "ftj", "-n", ns, "later").get("status") or {}
        return s if s.get("reason") == "WaitingForAdmission" else None

    s = wait_for("the job to wait for Kueue", waiting, timeout=120)
    assert "Kueue has not made a Workload for the training Job yet" in s["message"], s
    assert get_json(control_plane, "job", "-n", ns, "later-train-1")["spec"]["suspend"] is True
    pid = operator.proc.pid

    with Kueue(control_plane.kubeconfig) as kueue:
        kueue.cluster_queue(f"cq-{ns}", {GPU: 1}, namespaces=[ns])
        kueue.local_queue(ns, "queue", f"cq-{ns}")
        done = wait_phase(control_plane, ns, "later", ("Succeeded", "Failed"), timeout=240)["status"]
        assert done["phase"] == "Succeeded", done
        assert done["queue"]["admitted"] is True and done["queue"]["workload"], done["queue"]
        assert operator.proc.pid == pid and operator.proc.poll() is None, "the operator was not restarted"
        assert "Kueue is installed now" in operator.log.read_text()
