"""The real Kueue on the local control plane (`make kueue` builds it): its manifests as installed, admission within
a quota, and a stop that leaves the cluster as it was (no webhook that Jobs would depend on, no process, no mount
point)."""

from __future__ import annotations

import json

import pytest
import yaml
from kubetune_dev.cluster import kueue as kueue_setup

from tests.kube import get_json, kubectl, wait_for

pytestmark = pytest.mark.cluster
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin"]

URL, CA = "https://127.0.0.1:9443", b"-----BEGIN CERTIFICATE-----\n"


def test_only_the_job_and_kueue_webhooks_are_installed_and_only_for_queued_jobs():
    home = kueue_setup.find_home()
    configs = kueue_setup.webhook_configurations((home / "config" / "webhook" / "manifests.yaml").read_text(),
                                                 URL, CA)
    assert sorted(c["metadata"]["name"] for c in configs) == ["kubetune-kueue-mutating", "kubetune-kueue-validating"]
    hooks = [h for c in configs for h in c["webhooks"]]
    paths = sorted(h["clientConfig"]["url"].removeprefix(URL) for h in hooks)
    assert "/mutate-batch-v1-job" in paths and "/validate-batch-v1-job" in paths
    assert "/mutate-kueue-x-k8s-io-v1beta2-workload" in paths
    assert not [p for p in paths if "pod" in p or "deployment" in p or "ray" in p], paths  # integrations left off
    for hook in hooks:
        assert "service" not in hook["clientConfig"] and hook["clientConfig"]["caBundle"]
        if "batch-v1-job" in hook["clientConfig"]["url"]:
            assert hook["objectSelector"] == {"matchExpressions": [
                {"key": "kueue.x-k8s.io/queue-name", "operator": "Exists"}]}


def test_the_crds_upstream_converts_go_through_kueues_conversion_webhook():
    crds = {c["spec"]["names"]["plural"]: c for c in kueue_setup.crds(kueue_setup.find_home() / "config" / "crd",
                                                                      URL, CA)}
    assert {"workloads", "clusterqueues", "localqueues", "resourceflavors"} <= set(crds)
    for plural in ("workloads", "clusterqueues", "localqueues", "cohorts"):
        assert crds[plural]["spec"]["conversion"]["webhook"]["clientConfig"]["url"] == f"{URL}/convert"
    assert "conversion" not in crds["resourceflavors"]["spec"]  # the upstream kustomization leaves it out


def test_configuration_is_local_and_manages_only_labelled_jobs(tmp_path):
    config = kueue_setup.configuration(8081, 9443, tmp_path)
    assert config["integrations"] == {"frameworks": ["batch/job"]} and config["manageJobsWithoutQueueName"] is False
    assert config["webhook"] == {"host": "127.0.0.1", "port": 9443, "certDir": str(tmp_path)}
    assert config["leaderElection"] == {"leaderElect": False} and config["internalCertManagement"]["enable"] is False
    yaml.safe_dump(config)


def job(name: str, namespace: str, queue: str | None) -> str:
    labels = {"kueue.x-k8s.io/queue-name": queue} if queue else {}
    return json.dumps({"apiVersion": "batch/v1", "kind": "Job",
                       "metadata": {"name": name, "namespace": namespace, "labels": labels},
                       "spec": {"suspend": bool(queue), "template": {"spec": {"restartPolicy": "Never", "containers": [
                           {"name": "c", "image": "x", "resources": {"requests": {"cpu": "1"}}}]}}}})


def test_kueue_admits_what_the_quota_holds_and_stops_without_a_trace(control_plane, namespace):
    found = kueue_setup.METRICS_CERTS.exists()  # a run killed before its Kueue stopped may have left it
    k = kueue_setup.Kueue(control_plane.kubeconfig).start()
    try:
        assert k.proc.poll() is None
        k.cluster_queue(f"cq-{namespace}", {"cpu": 1}, namespaces=[namespace])
        k.local_queue(namespace, "q", f"cq-{namespace}")
        for name in ("a", "b"):
            kubectl(control_plane, "create", "-f", "-", stdin=job(name, namespace, "q"))

        def admitted() -> dict | None:
            jobs = {j["metadata"]["name"]: j["spec"]["suspend"] for j in get_json(
                control_plane, "jobs", "-n", namespace)["items"]}
            return jobs if sorted(jobs.values()) == [False, True] else None

        wait_for("Kueue to admit one of the two Jobs", admitted, timeout=60)

        def waiting() -> list[dict]:  # the other Job's Workload, once Kueue has written why it waits
            return [c for w in get_json(control_plane, "workloads", "-n", namespace)["items"]
                    for c in (w.get("status") or {}).get("conditions") or []
                    if c["type"] == "QuotaReserved" and c["status"] == "False"]

        [reserved] = wait_for("the waiting Workload's QuotaReserved condition", waiting, timeout=60)
        assert "insufficient unused quota for cpu" in reserved["message"], reserved
    finally:
        k.stop()
    assert k.proc.poll() is not None and kueue_setup.METRICS_CERTS.exists() == found  # the host as it was
    hooks = [c["metadata"]["name"] for kind in ("mutatingwebhookconfigurations", "validatingwebhookconfigurations")
             for c in get_json(control_plane, kind)["items"]]
    assert not [name for name in hooks if name.startswith("kubetune-kueue")], hooks
    kubectl(control_plane, "create", "-f", "-", stdin=job("after", namespace, "q"))  # no webhook in the way
