"""A NetworkPolicy per FineTuneJob (issue 27, item 7, "Network").

The workers' rendezvous (torch's TCPStore) has no authentication, and rank 0's `/metrics` tells about the run. A
pod anywhere in the cluster (another tenant's, or one a tenant labels to look like Prometheus) tries to reach
them: to join or disturb the rendezvous, or to read the metrics.

The answer: with each training Job the operator creates the NetworkPolicy `<job>-ingress`, owned by the
FineTuneJob. It selects the job's pods; they take ingress from the job's own pods (every port: NCCL and gloo open
ports of their own), and on the metrics port only from the operator's pods (its namespace by name, its pod labels)
and Prometheus (a namespace selected by name, `monitoring` by default, and Prometheus's pod labels). Egress is
not restricted. The local cluster's node agent runs pods as host processes and enforces no NetworkPolicy, so the
test checks the object the API server stores and what its selectors select there, not packets: a CNI that
enforces NetworkPolicies is required (docs/security.md, "Network").
"""

from __future__ import annotations

import uuid

import pytest

from tests.kube import get_json, kubectl, wait_for
from tests.operator_tests import test_e2e as e2e

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]

crd, s3_inputs, fake_trainer = e2e.crd, e2e.s3_inputs, e2e.fake_trainer  # the e2e fixtures
SUFFIX = uuid.uuid4().hex[:6]
OPERATOR_NS, MONITORING_NS = f"netpol-operator-{SUFFIX}", f"netpol-monitoring-{SUFFIX}"
OPERATOR_LABELS = {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/component": "operator"}


@pytest.fixture(scope="module")
def operator(control_plane, crd, s3_server, tmp_path_factory):
    """The operator, told (as the chart tells it) where its own pods run and where Prometheus runs."""
    labels = ",".join(f"{k}={v}" for k, v in OPERATOR_LABELS.items())
    env = e2e.operator_env(control_plane, KUBETUNE_NETWORK_OPERATOR_NAMESPACE=OPERATOR_NS,
                           KUBETUNE_NETWORK_OPERATOR_POD_LABELS=labels,
                           KUBETUNE_NETWORK_PROMETHEUS_NAMESPACE_SELECTOR=f"kubernetes.io/metadata.name={MONITORING_NS}",
                           **e2e.platform_credentials(s3_server.endpoint))
    for ns in (OPERATOR_NS, MONITORING_NS):
        kubectl(control_plane, "create", "namespace", ns)
    try:
        yield from e2e.run_operator(tmp_path_factory, env)
    finally:
        kubectl(control_plane, "delete", "namespace", OPERATOR_NS, MONITORING_NS, "--wait=false", check=False)


def selected(cp, kind: str, selector: dict, *args: str) -> set[str]:
    """The names of the objects a label selector's matchLabels select, as the API server answers."""
    labels = ",".join(f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items())
    return {o["metadata"]["name"] for o in get_json(cp, kind, "-l", labels, *args)["items"]}


def test_a_pod_outside_the_job_cannot_reach_its_rendezvous_or_metrics(control_plane, node_agent, namespace, operator,
                                                                      s3_inputs, fake_trainer):
    """A tenant's pod labelled like Prometheus, in the job's namespace, and a pod of another job try the workers'
    rendezvous and /metrics: the job's NetworkPolicy, stored before its workers run, lets in only the job's own
    pods on every port, and the operator's and Prometheus's pods on the metrics port alone."""
    cp = control_plane
    e2e.credentials(cp, namespace)
    e2e.submit(cp, namespace, "guarded", e2e.training_spec(s3_inputs, fake_trainer, hyperparameters={"maxSteps": 400}))
    running = e2e.wait_phase(cp, namespace, "guarded", ("Running", "Failed"))
    assert running["status"]["phase"] == "Running", running["status"]

    policy = get_json(cp, "networkpolicy", "-n", namespace, "guarded-ingress")
    owner = policy["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("FineTuneJob", running["metadata"]["uid"], True)
    train = get_json(cp, "job", "-n", namespace, "guarded-train-1")
    assert policy["metadata"]["creationTimestamp"] <= train["metadata"]["creationTimestamp"], "before the workers"
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"], "egress is not restricted: storage endpoints are arbitrary"

    # The pods it guards: every worker of this job, as the API server selects them.
    workers = {p["metadata"]["name"] for p in e2e.training_job_pods(cp, namespace, "guarded")}
    assert len(workers) == 2 and workers <= selected(cp, "pods", spec["podSelector"], "-n", namespace)

    # The attacker's pods: one labelled as Prometheus is in the job's namespace, one belongs to another job.
    metrics_port = int(operator.env["KUBETUNE_TRAINER_METRICS_PORT"])
    for name, labels in (("fake-prometheus", "app.kubernetes.io/name=prometheus"),
                         ("other-job", "kubetune.io/finetunejob=other")):
        kubectl(cp, "run", name, "-n", namespace, "--image=busybox", f"--labels={labels}", "--restart=Never",
                '--overrides={"spec": {"nodeName": "nowhere"}}')  # stored, never run: only their labels matter
    own, scrapers = spec["ingress"]
    assert "ports" not in own, "the job's own pods: every port (rendezvous, NCCL, gloo)"
    (peer,) = own["from"]
    assert set(peer) == {"podSelector"}, "in the job's namespace only"
    # One selector, so the same pods at any instant: two lists could differ as the validation pod goes.
    assert peer["podSelector"] == spec["podSelector"], "the same pods as the policy guards"
    admitted = selected(cp, "pods", peer["podSelector"], "-n", namespace)
    assert workers <= admitted and not {"fake-prometheus", "other-job"} & admitted

    assert scrapers["ports"] == [{"protocol": "TCP", "port": metrics_port}], "the scrapers: /metrics alone"
    operator_peer, prometheus_peer = scrapers["from"]
    assert selected(cp, "namespaces", operator_peer["namespaceSelector"]) == {OPERATOR_NS}
    assert operator_peer["podSelector"]["matchLabels"] == OPERATOR_LABELS
    assert selected(cp, "namespaces", prometheus_peer["namespaceSelector"]) == {MONITORING_NS}, \
        "not the tenant's namespace, whatever its pods' labels"
    assert prometheus_peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}

    kubectl(cp, "delete", "ftj", "-n", namespace, "guarded", "--wait=true")
    wait_for("the NetworkPolicy to go with its FineTuneJob", lambda: kubectl(
        cp, "get", "networkpolicy", "-n", namespace, "guarded-ingress", check=False).returncode != 0, timeout=60)
