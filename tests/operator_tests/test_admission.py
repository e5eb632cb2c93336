"""Admission against the real API server: once a FineTuneJob exists, the fields that determine what is trained
are immutable (CEL transition rules), and runPolicy and validation stay mutable; the value syntaxes accept and
refuse what the typed API (pydantic, `kubetune run`, the operator) does. No operator runs here.

Needs the control plane binaries (`make control-plane`). One example per create-time rule is tested against the
API server by test_e2e.py's examples/invalid/ test and with cel-python by test_cel.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from kubetune_api import FineTuneJob
from kubetune_api import crd as generator
from pydantic import ValidationError

from tests.kube import get_json, kubectl
from tests.operator_tests import test_e2e as e2e

pytestmark = pytest.mark.cluster
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin"]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "finetunejob.yaml"

CHANGES = {  # one change to each field that determines what is trained, merged into the example's spec
    "task": "sequence-classification",
    "objective": "dpo",
    "objectiveParams": {"beta": 0.5},
    "baseModel": {"uri": "s3://models/llama-3.1-70b/"},
    "dataset": {"train": "s3://data/support/train-v2.jsonl"},
    "method": {"lora": {"r": 32}},
    "hyperparameters": {"learningRate": 0.0001},
    "evaluation": {"everySteps": 50},
    "checkpoint": {"keep": 3},
    "output": {"uri": "s3://adapters/support-bot-v2/"},
    "storage": {"secretRef": {"name": "other-credentials"}},
    "tracking": {"mlflow": {"uri": "http://mlflow.mlflow:5000", "secretRef": {"name": "mlflow-token"}}},
    "resources": {"workers": 2},
    "scheduling": {"queueName": "team-a"},
    "image": "ghcr.io/kubetune/trainer:0.2.0",
}

SAMPLES = {  # values at the edges of each syntax: the API server and pydantic must agree on every one
    "resources.cpu": ["500m", "4", "1.", ".5", "+1", "1e3", "0.1m", "Mi", ".", "+", "1K", "-1", "-0", "4 cores"],
    "validation.memory": ["512Mi", "4G", "1Ei", "16GB", "1e", ""],
    "scheduling.queueName": ["team-a", "Team_A.gpus", "", "-team", "team/a", "a" * 63, "a" * 64],
    "scheduling.priorityClassName": ["high", "system.high-1", "High", "a_b", "-a", "a" * 254],
    "storage.secretRef.name": ["s3-credentials", "s3.creds", "S3", "creds/x"],
    "resources.nodeSelector": [{"gpu": "h100", "zone": ""}, {"kubernetes.io/arch": "amd64"}, {"gpu type": "a"},
                               {"gpu": "a b"}, {"A/b": "x"}, {"a" * 318: "x"}],
    "resources.tolerations": [[{"operator": "Exists"}], [{"key": "gpu", "operator": "Exists", "value": ""}],
                              [{"key": "gpu", "value": "h100", "effect": "NoExecute", "tolerationSeconds": 60}],
                              [{"operator": "Exists", "value": "h100"}], [{"operator": "In"}], [{"effect": "Never"}]],
    "resources.gpuResourceName": ["nvidia.com/gpu", "gpu", "amd.com/GPU_1", "Nvidia.com/gpu", "nvidia.com/", "a/b/c"],
    "storage.endpoint": ["http://minio:9000", "https://s3.example.com/base?x=1", "minio:9000", "ftp://x", "http://",
                         "http://a b"],
    "tracking.mlflow.uri": ["http://mlflow:5000", "https://mlflow.example.com/base?x=1", "mlflow:5000",
                            "https://alice:pw@mlflow.example.com", "http://token@mlflow", "ftp://x"],
    "image": ["trainer", "ghcr.io/kubetune/trainer:0.1.0", "localhost:5000/a/b__c:T_1", "x@sha256:" + "a" * 64,
              "ghcr.io/Kubetune/trainer", "Ghcr.io/x", "x:", "x@sha256:abc", "a//b", "a b"],
}


def with_value(path: str, value) -> dict:
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "syntax"},
           "spec": {"baseModel": {"uri": "s3://m/"}, "dataset": {"train": "s3://d/t.jsonl"},
                    "output": {"uri": "s3://o/"}}}
    *parents, name = path.split(".")
    node = doc["spec"]
    for parent in parents:
        node = node.setdefault(parent, {})
    node[name] = value
    return doc


crd = e2e.crd  # the fixture that applies the CRD and waits until it is established


def apply(cp, namespace: str, doc: dict, check: bool = False):
    return kubectl(cp, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(doc), check=check)


def changed(doc: dict, field: str, change) -> dict:
    new = copy.deepcopy(doc)
    if isinstance(change, dict):
        new["spec"][field] = {**new["spec"].get(field, {}), **change}
    else:
        new["spec"][field] = change
    return new


@pytest.fixture
def job(control_plane, crd, namespace) -> dict:
    """The example FineTuneJob with an image, created."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["image"] = "ghcr.io/kubetune/trainer:0.1.0"
    apply(control_plane, namespace, doc, check=True)
    return doc


def typed_api_accepts(doc: dict) -> bool:
    try:
        FineTuneJob.model_validate(doc)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("path", sorted(SAMPLES))
def test_the_api_server_and_the_typed_api_agree_on_value_syntaxes(control_plane, crd, namespace, path):
    verdicts = {}
    for value in SAMPLES[path]:
        doc = with_value(path, value)
        out = kubectl(control_plane, "apply", "-n", namespace, "--dry-run=server", "-f", "-", stdin=json.dumps(doc),
                      check=False)
        verdicts[json.dumps(value)] = (out.returncode == 0, typed_api_accepts(doc))
    assert {v: verdict for v, verdict in verdicts.items() if verdict[0] != verdict[1]} == {}, \
        "(API server, pydantic) accepted"
    assert {True, False} <= {server for server, _ in verdicts.values()}, "samples on both sides of the syntax"


def test_the_changes_cover_every_immutable_field():
    assert set(CHANGES) == {*generator.IMMUTABLE, "image"}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_changing_a_field_that_determines_training_is_refused(control_plane, namespace, job, field):
    out = apply(control_plane, namespace, changed(job, field, CHANGES[field]))
    assert out.returncode != 0, f"a change to spec.{field} was accepted"
    assert generator.immutable(field) in out.stderr, out.stderr


def test_removing_the_image_is_refused(control_plane, namespace, job):
    without = copy.deepcopy(job)
    del without["spec"]["image"]
    out = apply(control_plane, namespace, without)
    assert out.returncode != 0 and generator.immutable("image") in out.stderr, out.stderr


def test_run_policy_and_validation_stay_mutable(control_plane, namespace, job):
    apply(control_plane, namespace, changed(job, "runPolicy", {"suspend": True}), check=True)
    spec = get_json(control_plane, "ftj", "-n", namespace, job["metadata"]["name"])["spec"]
    assert spec["runPolicy"]["suspend"] is True

    new = changed(job, "runPolicy", {"suspend": False, "activeDeadlineSeconds": 7200, "backoffLimit": 1})
    apply(control_plane, namespace, changed(new, "validation", {"cpu": "2", "activeDeadlineSeconds": 300}),
          check=True)
    spec = get_json(control_plane, "ftj", "-n", namespace, job["metadata"]["name"])["spec"]
    assert spec["runPolicy"]["activeDeadlineSeconds"] == 7200 and spec["validation"]["cpu"] == "2"
    assert spec["image"] == job["spec"]["image"]
