"""Restricted pods and no secret anywhere, end to end (docs/security.md), on the real API server and node agent.

* In a namespace whose Pod Security admission enforces the `restricted` standard (the API server refuses any pod
  that breaks it, which is shown first), a job validates and trains to Succeeded: the operator's pods pass.
  Their containers ask for a read-only root filesystem, which the node agent gives them (`/` remounted
  read-only in the container's mount namespace): the real trainer's runs below need nothing writable but their
  volumes.
* A canary credential (a Secret whose keys are unique random strings; the loopback S3 server accepts any) is
  used by a job that the real trainer runs to Succeeded and by one that fails in its training pod. Then every
  place a tenant or an attacker can read is searched: the operator's log, every pod log the node agent kept,
  Events, the FineTuneJobs, Jobs, pods and ConfigMaps, every object (and its metadata) in the bucket, the
  manifest included, the operator's /metrics and rank 0's /metrics scraped during the run. The canary is nowhere.

Fixtures and helpers come from test_e2e.py.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
from kubetune_api import StorageEndpoint
from kubetune_trainer.storage import Storage

from tests.datafixtures import tiny_tokenizer
from tests.kube import get_json, http_get, kubectl, wait_for
from tests.operator_tests import test_e2e as e2e
from tests.operator_tests.test_e2e import credentials, submit, training_job_pods, training_spec, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]

# test_e2e.py's fixtures: the CRD, the operator, S3 inputs, the tiny model, the stand-in trainer image
crd, operator, s3_inputs, tiny_model, fake_trainer = e2e.crd, e2e.operator, e2e.s3_inputs, e2e.tiny_model, \
    e2e.fake_trainer
author_policy = e2e.author_policy  # the operator's (it trusts the API server for authors)

CANARY_IMAGE = "ghcr.io/kubetune/trainer:canary"
CANARY_ID = f"CANARYID{uuid.uuid4().hex[:12].upper()}"  # not AKIA...: no pattern would hide it, only its absence
CANARY_SECRET = f"canary-{uuid.uuid4().hex}/{uuid.uuid4().hex[:8]}+key"
CANARIES = {CANARY_ID, CANARY_SECRET, quote(CANARY_SECRET, safe="")}


@pytest.fixture
def restricted_namespace(control_plane):
    """A fresh namespace where Pod Security admission enforces `restricted` (latest)."""
    name = f"restricted-{uuid.uuid4().hex[:8]}"
    kubectl(control_plane, "create", "namespace", name)
    kubectl(control_plane, "label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/enforce-version=latest")
    yield name
    kubectl(control_plane, "delete", "namespace", name, "--wait=false")


def test_the_operators_pods_pass_the_restricted_pod_security_standard(control_plane, node_agent, operator,
                                                                      restricted_namespace, s3_inputs,
                                                                      fake_trainer):
    ns = restricted_namespace
    plain = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "not-restricted"},
             "spec": {"containers": [{"name": "main", "image": e2e.IMAGE}]}}
    refused = kubectl(control_plane, "apply", "-n", ns, "-f", "-", stdin=json.dumps(plain), check=False)
    assert refused.returncode != 0 and 'violates PodSecurity "restricted:latest"' in refused.stderr, refused.stderr

    credentials(control_plane, ns)
    submit(control_plane, ns, "restricted", training_spec(s3_inputs, fake_trainer, hyperparameters={"maxSteps": 3}))
    status = wait_phase(control_plane, ns, "restricted", ("Succeeded", "Failed"), timeout=180)["status"]
    assert status["phase"] == "Succeeded", status
    validated = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert validated["status"] == "True", validated  # `kubetune validate` ran in a restricted pod too
    pods = training_job_pods(control_plane, ns, "restricted")
    assert len(pods) == 2
    for pod in pods:
        (c,) = pod["spec"]["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert not any("serviceAccountToken" in str(v) for v in pod["spec"]["volumes"])  # no token volume
    events = get_json(control_plane, "events", "-n", ns)["items"]
    assert not [e for e in events if e["reason"] == "FailedCreate"], "no pod of the operator's Jobs was refused"


# -- the canary --------------------------------------------------------------------------------------------------


@pytest.fixture
def canary_trainer(node_agent):
    """The real trainer (`kubetune launch`), whose rank 0 keeps serving /metrics 3 s after the run."""
    from kubetune_dev.cluster.agent_pod import ImageRule

    venv_bin = Path(sys.executable).parent
    rule = ImageRule(match=CANARY_IMAGE, path=[str(venv_bin)], working_dir=str(e2e.ROOT),
                     env={"KUBETUNE_METRICS_LINGER_SECONDS": "3"}, entrypoint=[str(venv_bin / "kubetune"), "launch"])
    node_agent.image_rules.insert(0, rule)
    yield CANARY_IMAGE
    node_agent.image_rules.remove(rule)


class MetricsScraper(threading.Thread):
    """Scrapes the /metrics of a job's rank 0 pod while it runs, as Prometheus would, keeping every body."""

    def __init__(self, cp, namespace: str, job: str, port: int):
        super().__init__(daemon=True)
        self.cp, self.namespace, self.job, self.port = cp, namespace, job, port
        self.bodies: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.3):
            pods = [p for p in training_job_pods(self.cp, self.namespace, self.job)
                    if p["spec"]["hostname"].endswith("-0") and p["status"].get("podIP")]
            for pod in pods:
                status, body = http_get(f"http://{pod['status']['podIP']}:{self.port}/metrics")
                if status == 200:
                    self.bodies.append(body)


def readable_places(cp, node_agent, operator, namespace: str, endpoint: str, bucket: str,
                    scraped: list[str]) -> dict[str, str]:
    """Everything a user of the cluster (or of the bucket) can read after the runs, by where it is."""
    places = {
        "operator log": operator.log.read_text(),
        "operator /metrics": operator.metrics_text(),
        "trainer /metrics": "\n".join(scraped),
        "events": kubectl(cp, "get", "events", "-A", "-o", "json").stdout,
    }
    for kind in ("finetunejobs", "configmaps", "jobs", "pods"):
        places[kind] = kubectl(cp, "get", kind, "-n", namespace, "-o", "json").stdout
    for path in sorted((node_agent.state_dir / "logs" / namespace).rglob("*.log")):  # deleted pods' logs too
        places[f"pod log {path.parent.name}/{path.name}"] = path.read_text(errors="replace")
    for pod in get_json(cp, "pods", "-n", namespace)["items"]:  # through the API server, as a user reads them
        name = pod["metadata"]["name"]
        places[f"kubectl logs {name}"] = kubectl(cp, "logs", "-n", namespace, name, check=False).stdout
    client = Storage(StorageEndpoint(endpoint=endpoint)).client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            got = client.get_object(Bucket=bucket, Key=obj["Key"])
            body = got["Body"].read().decode("latin-1")  # bytes as text: safetensors and pickles included
            places[f"s3://{bucket}/{obj['Key']}"] = json.dumps(got.get("Metadata", {})) + body
    return places


@pytest.mark.slow
def test_a_canary_credential_appears_nowhere(control_plane, node_agent, operator, restricted_namespace, s3_server,
                                            bucket, tiny_model, canary_trainer, tmp_path):
    ns, endpoint = restricted_namespace, tiny_model["endpoint"]
    kubectl(control_plane, "create", "secret", "generic", "canary", "-n", ns,
            f"--from-literal=AWS_ACCESS_KEY_ID={CANARY_ID}", f"--from-literal=AWS_SECRET_ACCESS_KEY={CANARY_SECRET}")
    tiny_tokenizer().save_pretrained(tmp_path / "no-weights")  # validates (it needs the tokenizer), cannot train
    Storage(StorageEndpoint(endpoint=endpoint)).upload_dir(tmp_path / "no-weights", f"s3://{bucket}/no-weights/")
    d = tiny_model["data"]

    def spec(model: str, output: str) -> dict:
        return {"baseModel": {"uri": model}, "image": canary_trainer,
                "dataset": {"train": f"{d}train.jsonl", "validation": f"{d}validation.jsonl",
                            "test": f"{d}test.jsonl"},
                "hyperparameters": {"maxSteps": 2, "batchSize": 2, "maxSeqLength": 128, "loggingSteps": 1},
                "checkpoint": {"everySteps": 1}, "output": {"uri": output},
                "storage": {"endpoint": endpoint, "secretRef": {"name": "canary"}},
                "resources": {"workers": 1, "gpusPerWorker": 0}}

    # One after the other: the node agent's pods share the host's ports, rank 0's metrics port included.
    submit(control_plane, ns, "canary-fails", spec(f"s3://{bucket}/no-weights/", f"s3://{bucket}/out-fails/"))
    failed = wait_phase(control_plane, ns, "canary-fails", ("Succeeded", "Failed"), timeout=180)["status"]
    assert (failed["phase"], failed["reason"]) == ("Failed", "ConfigInvalid"), failed  # in the training pod
    assert "cannot load the model" in failed["message"], failed  # its termination message
    submit(control_plane, ns, "canary-ok", spec(tiny_model["model"], f"s3://{bucket}/out-ok/"))
    scraper = MetricsScraper(control_plane, ns, "canary-ok", port=int(operator.env["KUBETUNE_TRAINER_METRICS_PORT"]))
    scraper.start()
    try:
        ok = wait_phase(control_plane, ns, "canary-ok", ("Succeeded", "Failed"), timeout=240)["status"]
    finally:
        scraper.done.set()
        scraper.join()
    assert ok["phase"] == "Succeeded" and ok["attempts"]["current"] == 1, ok
    wait_for("the validation Jobs to be cleaned up", lambda: sorted(
        j["metadata"]["name"] for j in get_json(control_plane, "jobs", "-n", ns)["items"]) == [
        "canary-fails-train-1", "canary-ok-train-1"], timeout=30)

    places = readable_places(control_plane, node_agent, operator, ns, endpoint, bucket, scraper.bodies)
    # Not vacuous: each place holds what the runs wrote there.
    assert "kubetune_trainer_step" in places["trainer /metrics"], "rank 0's /metrics was scraped during the run"
    assert f"s3://{bucket}/out-ok/manifest.json" in places and any("checkpoints/" in p for p in places)
    assert any(p.startswith("pod log canary-ok-validate") for p in places)
    assert any('"event": "train"' in text for p, text in places.items() if p.startswith("pod log canary-ok-train-1"))
    assert "canary-fails" in places["operator log"] and "canary-ok" in places["events"]
    leaks = [(place, canary) for place, text in places.items() for canary in CANARIES if canary in text]
    assert leaks == [], f"the canary credential is readable in {leaks}"
