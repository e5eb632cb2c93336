"""The CRD's CEL rules, evaluated here with cel-python (the API server runs them in test_e2e.py).

Each examples/invalid/*.yaml must break exactly the rule or bound its first line names; the valid example
and the unit tests' typical spec break none. Defaults are applied first, as the API server does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubetune_operator import crd

celpy = pytest.importorskip("celpy")

ROOT = Path(__file__).resolve().parents[2]
INVALID = sorted((ROOT / "examples" / "invalid").glob("*.yaml"))
SCHEMA = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


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


def problems(value, schema: dict, path: str = "") -> list[str]:
    """Messages of the CEL rules and numeric/enum bounds the object breaks."""
    found = []
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if lo is not None and (value < lo or (schema.get("exclusiveMinimum") and value == lo)):
            found.append(f"{path}: should be greater than or equal to {lo}")
        if hi is not None and (value > hi or (schema.get("exclusiveMaximum") and value == hi)):
            found.append(f"{path}: should be less than or equal to {hi}")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{path}: Unsupported value")
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            found.append(rule["message"])
    if isinstance(value, dict):
        for name, prop in (schema.get("properties") or {}).items():
            if name in value:
                found += problems(value[name], prop, f"{path}.{name}")
    return found


def check(doc: dict) -> list[str]:
    return problems(defaulted(doc, SCHEMA), SCHEMA)


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_each_invalid_example_breaks_its_rule(path):
    expected = path.read_text().splitlines()[0].removeprefix("# Refused by the API server: ")
    found = check(yaml.safe_load(path.read_text()))
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize("example", ["finetunejob.yaml", "demo-finetunejob.yaml"])
def test_valid_examples_break_nothing(example):
    assert check(yaml.safe_load((ROOT / "examples" / example).read_text())) == []


@pytest.mark.parametrize("spec", [
    {"baseModel": {"uri": "hf://org/model", "revision": "main"}},
    {"baseModel": {"uri": "pvc://models/llama/"}, "dataset": {"train": "pvc://data/train.jsonl"}},
    {"hyperparameters": {"maxSteps": 10}},
    {"method": {"type": "qlora"}},  # gpusPerWorker defaults to 1
    {"storage": {"serviceAccountName": "trainer"}},
])
def test_allowed_variants(spec):
    base = {"baseModel": {"uri": "s3://m/"}, "dataset": {"train": "s3://d/t.jsonl"}, "output": {"uri": "s3://o/"}}
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "ok"},
           "spec": {**base, **spec}}
    assert check(doc) == []


def test_long_names_are_refused():
    doc = {"metadata": {"name": "a" * 51}, "spec": {"baseModel": {"uri": "s3://m/"},
                                                     "dataset": {"train": "s3://d"}, "output": {"uri": "s3://o/"}}}
    assert any("metadata.name" in p for p in check(doc))
