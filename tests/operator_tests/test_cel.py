"""The CRD's CEL rules, evaluated here with cel-python (the API server runs them in test_e2e.py and
test_admission.py).

Each examples/invalid/*.yaml must break exactly the rule or bound its first line names; the valid example
and the unit tests' typical spec break none. Defaults are applied first, as the API server does. Transition
rules (oldSelf) run only when an old object is given, as on an update.

cel-python lacks Kubernetes' CEL libraries; the one function the rules use, isQuantity, is a stand-in here:
the quantity syntax as a regular expression (the typed API's QUANTITY, with a sign). The real
resource.ParseQuantity is exercised by the API server tests.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from kubetune_api import crd
from kubetune_api.finetunejob import QUANTITY

celpy = pytest.importorskip("celpy")

ROOT = Path(__file__).resolve().parents[2]
VALID_EXAMPLES = ["finetunejob.yaml", "demo-finetunejob.yaml", "text-classification/finetunejob.yaml",
                  "image-classification/finetunejob.yaml"]
INVALID = sorted((ROOT / "examples" / "invalid").glob("*.yaml"))
SCHEMA = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
K8S_QUANTITY = "^[+-]?" + QUANTITY.removeprefix("^\\+?")
FUNCTIONS = {"isQuantity": lambda s: celpy.celtypes.BoolType(re.fullmatch(K8S_QUANTITY, s) is not None)}
ABSENT = object()


def defaulted(value, schema: dict):
    """Structural defaulting: fill `default`s of absent properties, recursively."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for name, prop in schema["properties"].items():
            if name not in out and "default" in prop:
                out[name] = prop["default"]
            if name in out:
                out[name] = defaulted(out[name], prop)
        return out
    if isinstance(value, list) and "items" in schema:
        return [defaulted(v, schema["items"]) for v in value]
    return value


def problems(value, schema: dict, path: str = "", old=ABSENT) -> list[str]:
    """Messages of the CEL rules and numeric/enum bounds the object breaks; paths as the API server writes them."""
    found = []
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if lo is not None and (value < lo or (schema.get("exclusiveMinimum") and value == lo)):
            found.append(f"{path}: should be greater than or equal to {lo}")
        if hi is not None and (value > hi or (schema.get("exclusiveMaximum") and value == hi)):
            found.append(f"{path}: should be less than or equal to {hi}")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{path}: Unsupported value: {json.dumps(value)}")
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        activation = {"self": celpy.json_to_cel(value)}
        if "oldSelf" in rule["rule"]:
            if old is ABSENT:
                continue
            activation["oldSelf"] = celpy.json_to_cel(old)
        if not env.program(env.compile(rule["rule"]), functions=FUNCTIONS).evaluate(activation):
            found.append(rule["message"])
    if isinstance(value, dict):
        for name, prop in (schema.get("properties") or {}).items():
            if name in value:
                old_value = old.get(name, ABSENT) if isinstance(old, dict) else ABSENT
                found += problems(value[name], prop, f"{path}.{name}" if path else name, old_value)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += problems(item, schema["items"], f"{path}[{i}]")
    return found


def check(doc: dict, old: dict | None = None) -> list[str]:
    return problems(defaulted(doc, SCHEMA), SCHEMA, old=ABSENT if old is None else defaulted(old, SCHEMA))


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_each_invalid_example_breaks_its_rule(path):
    expected = path.read_text().splitlines()[0].removeprefix("# Refused by the API server: ")
    found = check(yaml.safe_load(path.read_text()))
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize("example", VALID_EXAMPLES)
def test_valid_examples_break_nothing(example):
    assert check(yaml.safe_load((ROOT / "examples" / example).read_text())) == []


@pytest.mark.parametrize("spec", [
    {"baseModel": {"uri": "hf://org/model", "revision": "main"}},
    {"baseModel": {"uri": "pvc://models/llama/"}, "dataset": {"train": "pvc://data/train.jsonl"}},
    {"hyperparameters": {"maxSteps": 10}},
    {"method": {"type": "qlora"}},  # gpusPerWorker defaults to 1
    {"storage": {"serviceAccountName": "trainer"}},
    {"storage": {"endpoint": "https://s3.eu-central-1.amazonaws.com", "secretRef": {"name": "s3.creds-1"}}},
    {"image": "registry.local:5000/team/kubetune_trainer:1.2.3-rc1@sha256:" + "0" * 64},
    {"image": "trainer"},
    {"resources": {"cpu": "1.5", "memory": "64Gi", "gpuResourceName": "amd.com/gpu",
                   "nodeSelector": {"example.com/gpu": "H100_80GB", "zone": ""},
                   "tolerations": [{"operator": "Exists"}, {"key": "gpu", "value": "a", "effect": "NoExecute",
                                                            "tolerationSeconds": 60}]}},
    {"scheduling": {"queueName": "Team_A.gpus", "priorityClassName": "system.high"}},
    {"validation": {"activeDeadlineSeconds": 600, "cpu": "500m", "memory": "2Gi", "ephemeralStorage": "20G"}},
    {"objective": "dpo", "objectiveParams": {"beta": 0.2, "loss": "ipo", "referenceFree": True}},
    {"objective": "orpo", "dataset": {"train": "s3://d/t.jsonl", "format": "openai-preference"}},
    {"output": {"uri": "s3://o/", "merged": True, "dtype": "fp16"}},
    {"dataset": {"train": "s3://d/t.jsonl", "validation": "s3://d/v.jsonl", "trainOnValidation": True},
     "evaluation": {"baseline": False}},
    {"tracking": {"mlflow": {"uri": "https://mlflow.example.com:5000/base", "experiment": "support bots",
                             "secretRef": {"name": "mlflow-token"}}}},
])
def test_allowed_variants(spec):
    assert check(job(spec)) == []


def job(spec: dict | None = None) -> dict:
    base = {"baseModel": {"uri": "s3://m/"}, "dataset": {"train": "s3://d/t.jsonl"}, "output": {"uri": "s3://o/"}}
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "ok"},
            "spec": {**base, **(spec or {})}}


CHANGES = {  # one change to each field that determines what is trained
    "task": {"task": "sequence-classification"},
    "objective": {"objective": "dpo"},
    "objectiveParams": {"objectiveParams": {"beta": 0.5}},
    "baseModel": {"baseModel": {"uri": "s3://other/"}},
    "dataset": {"dataset": {"train": "s3://d/t.jsonl", "validation": "s3://d/v.jsonl"}},
    "method": {"method": {"lora": {"r": 8}}},
    "hyperparameters": {"hyperparameters": {"learningRate": 0.001}},
    "evaluation": {"evaluation": {"everySteps": 5}},
    "checkpoint": {"checkpoint": {"keep": 5}},
    "output": {"output": {"uri": "s3://o/elsewhere/"}},
    "storage": {"storage": {"region": "eu-west-1"}},
    "tracking": {"tracking": {"mlflow": {"uri": "http://mlflow.mlflow:5000"}}},  # added: its Secret was not checked
    "resources": {"resources": {"workers": 2}},
    "scheduling": {"scheduling": {"queueName": "team-b"}},
    "image": {"image": "ghcr.io/kubetune/trainer:0.2.0"},
}


@pytest.mark.parametrize("field", [*crd.IMMUTABLE, "image"])
def test_fields_that_determine_training_are_immutable(field):
    old = job({"image": "ghcr.io/kubetune/trainer:0.1.0"})
    new = copy.deepcopy(old)
    new["spec"].update(CHANGES[field])
    assert check(new, old) == [crd.immutable(field)]
    assert check(new) == []  # creating it is fine


def test_adding_or_removing_the_image_is_a_change():
    with_image, without = job({"image": "ghcr.io/kubetune/trainer:0.1.0"}), job()
    assert check(with_image, without) == [crd.immutable("image")]
    assert check(without, with_image) == [crd.immutable("image")]
    assert check(without, without) == []


def test_run_policy_and_validation_stay_mutable():
    old = job({"image": "ghcr.io/kubetune/trainer:0.1.0"})
    new = copy.deepcopy(old)
    new["spec"]["runPolicy"] = {"suspend": True, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 60,
                                "hangTimeoutSeconds": 600, "backoffLimit": 1}
    new["spec"]["validation"] = {"cpu": "2", "activeDeadlineSeconds": 120}
    assert check(new, old) == []


def test_long_names_are_refused():
    doc = {"metadata": {"name": "a" * 51}, "spec": {"baseModel": {"uri": "s3://m/"},
                                                     "dataset": {"train": "s3://d"}, "output": {"uri": "s3://o/"}}}
    assert any("metadata.name" in p for p in check(doc))
