"""The FineTuneSweep API: the typed model's defaults and checks, and the generated CRD's CEL rules saying the same
(evaluated here with cel-python; test_sweep_e2e.py applies the same bad specs to the real API server)."""

from __future__ import annotations

import copy
import typing
from pathlib import Path

import pytest
from kubetune_api import TUNABLE, FineTuneJobSpec, FineTuneSweep, Kind, crd
from kubetune_api.sweep import (
    DUPLICATE_PATH,
    GRID_NEEDS_VALUES,
    LOG_NEEDS_POSITIVE,
    MIN_ABOVE_MAX,
    NEEDS_VALIDATION,
    PATH_NOT_TUNABLE,
    PRUNING_NEEDS_EVALUATIONS,
    RANGE_NOT_NUMERIC,
    RANGE_OR_VALUES,
    STEP_NEEDS_RANGE,
    TEMPLATE_TRAINS_ON_VALIDATION,
    metric_problem,
)
from pydantic import BaseModel, ValidationError

from tests.operator_tests.test_cel import ABSENT, defaulted, problems
from tests.operator_tests.test_crd import walk

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "kubetune.io_finetunesweeps.yaml"
SCHEMA = crd.sweep_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def sweep(**spec) -> dict:
    """A valid FineTuneSweep with `spec` merged over the spec's top level."""
    base = {
        "template": {"baseModel": {"uri": "s3://m/"},
                     "dataset": {"train": "s3://d/train.jsonl", "validation": "s3://d/validation.jsonl"},
                     "evaluation": {"everySteps": 2}, "hyperparameters": {"maxSteps": 8}},
        "parameters": [{"path": "hyperparameters.learningRate", "min": 1e-5, "max": 1e-2, "log": True},
                       {"path": "method.lora.r", "values": [4, 8, 16]}],
        "output": {"uri": "s3://o/sweep/"},
    }
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep", "metadata": {"name": "search"},
            "spec": {**base, **spec}}


def with_parameter(**parameter) -> dict:
    return sweep(parameters=[{"path": "hyperparameters.learningRate", **parameter}])


def template(**changes) -> dict:
    doc = sweep()
    doc["spec"]["template"].update(changes)
    return doc


ONE_VALUE = "should have at least 2 items"  # the schema's minItems (a choice's values are invisible to CEL)
ONE_OF = "must validate one and only one schema (oneOf)"  # the schema's oneOf: a range or a choice

# Each bad spec, the message the typed API and the CRD's CEL rules give (or the API server's own for a schema
# bound), and the field the API server names.
BAD = {
    "unknown-path": (sweep(parameters=[{"path": "hyperparameters.learningRat", "min": 0.1, "max": 0.2}]),
                     PATH_NOT_TUNABLE, "spec.parameters[0].path"),
    "untunable-path": (sweep(parameters=[{"path": "baseModel.uri", "values": ["s3://a/", "s3://b/"]}]),
                       PATH_NOT_TUNABLE, "spec.parameters[0].path"),
    "min-above-max": (with_parameter(min=0.1, max=0.01), MIN_ABOVE_MAX, "spec.parameters[0].min"),
    "log-from-zero": (with_parameter(min=0.0, max=0.1, log=True), LOG_NEEDS_POSITIVE, "spec.parameters[0].log"),
    "one-value": (with_parameter(values=[0.1]), ONE_VALUE, "spec.parameters[0].values"),
    "range-and-values": (with_parameter(min=0.1, max=0.2, values=[0.1, 0.2]), ONE_OF, "spec.parameters[0]"),
    "min-without-max": (with_parameter(min=0.1), ONE_OF, "spec.parameters[0]"),
    "step-of-a-choice": (with_parameter(values=[0.1, 0.2], step=0.1), STEP_NEEDS_RANGE, "spec.parameters[0].step"),
    "range-of-a-choice-field": (sweep(parameters=[{"path": "hyperparameters.scheduler", "min": 1, "max": 2}]),
                                RANGE_NOT_NUMERIC, "spec.parameters[0].min"),
    "same-path-twice": (sweep(parameters=[{"path": "method.lora.r", "values": [4, 8]},
                                          {"path": "method.lora.r", "min": 2, "max": 8}]),
                        DUPLICATE_PATH, "spec.parameters"),
    "metric-the-task-cannot-report": (sweep(objective={"metric": "accuracy"}), metric_problem("sft"),
                                      "spec.objective.metric"),
    "classification-metric": (
        sweep(template={**sweep()["spec"]["template"], "task": "sequence-classification"},
              objective={"metric": "perplexity"}), metric_problem("classification"), "spec.objective.metric"),
    "no-validation-split": (template(dataset={"train": "s3://d/train.jsonl"}), NEEDS_VALIDATION,
                            "spec.template.dataset"),
    "pruning-without-evaluations": (template(evaluation={}), PRUNING_NEEDS_EVALUATIONS, "spec.earlyStopping"),
    "grid-over-a-real-range": (sweep(algorithm="grid"), GRID_NEEDS_VALUES, "spec.algorithm"),
    "template-trains-on-validation": (
        sweep(earlyStopping="none", template={**sweep()["spec"]["template"], "evaluation": {}, "dataset": {
            **sweep()["spec"]["template"]["dataset"], "trainOnValidation": True}}),
        TEMPLATE_TRAINS_ON_VALIDATION, "spec.template.dataset.trainOnValidation"),
}


def check(doc: dict, old: dict | None = None) -> list[str]:
    return problems(defaulted(doc, SCHEMA), SCHEMA, old=ABSENT if old is None else defaulted(old, SCHEMA))


def test_committed_crd_matches_the_generator():
    assert CRD_FILE.read_text() == crd.render("finetunesweeps"), "crds/ is stale: run `make crds`"
    assert (ROOT / "charts" / "kubetune" / "crds" / CRD_FILE.name).read_text() == CRD_FILE.read_text()


def test_names_short_name_and_columns():
    spec = crd.sweep_crd()["spec"]
    assert spec["names"]["kind"] == "FineTuneSweep" and spec["names"]["shortNames"] == ["fts"]
    columns = spec["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in columns if not c.get("priority")] == ["Phase", "Trials", "Best", "Metric", "Age"]


def test_schema_is_structural_and_bounded():
    for path, node in walk(SCHEMA):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path}: no type"
        assert not {"$ref", "anyOf", "allOf", "title"} & node.keys(), path
        assert all(option.keys() == {"required"} for option in node.get("oneOf", [])), path  # value validation
        if node.get("type") == "array" and path.startswith(".spec"):
            assert "maxItems" in node, path
        if node.get("x-kubernetes-validations") and node.get("type") == "string":
            assert "maxLength" in node, path


def test_a_valid_sweep_is_accepted_and_defaulted():
    assert check(sweep()) == []
    spec = FineTuneSweep.model_validate(sweep()).spec
    assert (spec.algorithm, spec.early_stopping, spec.promote, spec.seed) == ("tpe", "asha", "none", 0)
    assert (spec.metric(), spec.goal(), spec.max_trials, spec.parallel_trials, spec.max_failed_trials) == (
        "loss", "minimize", 10, 2, 3)
    assert spec.template.output.uri is None  # each trial's is under the sweep's output.uri
    assert spec.parameters[1].kind == Kind.int


def test_the_goal_follows_the_metric():
    classification = sweep(template={**sweep()["spec"]["template"], "task": "sequence-classification",
                                     "evaluation": {"everySteps": 2, "metric": "f1"}})
    spec = FineTuneSweep.model_validate(classification).spec
    assert (spec.metric(), spec.goal()) == ("f1", "maximize")
    assert check(classification) == []


TYPED = {ONE_VALUE: "List should have at least 2 items", ONE_OF: RANGE_OR_VALUES}  # pydantic's wording


@pytest.mark.parametrize("name", BAD)
def test_each_bad_spec_is_refused_with_the_same_message(name):
    doc, message, _ = BAD[name]
    found = check(doc)
    if message in TYPED:  # a schema bound, not a CEL rule: the API server's test checks it
        assert found == []
    else:
        assert found and all(message in f for f in found), found
    with pytest.raises(ValidationError) as refused:
        FineTuneSweep.model_validate(doc)
    assert TYPED.get(message, message) in str(refused.value)


def test_the_templates_own_rules_apply():
    doc = template(dataset={"train": "http://d/train.jsonl", "validation": "s3://d/v.jsonl"})
    assert check(doc) == ["dataset.train must be an s3:// or pvc:// URI"]


def test_the_search_is_immutable_but_its_limits_are_not():
    old = sweep()
    grown = copy.deepcopy(old)
    grown["spec"].update(maxTrials=20, parallelTrials=4, budget={"gpuHours": 2})
    assert check(grown, old) == []
    changed = copy.deepcopy(old)
    changed["spec"]["parameters"][1]["values"] = [4, 8]
    assert check(changed, old) == [crd.immutable("parameters", "FineTuneSweep")]


def test_long_names_are_refused():
    doc = sweep()
    doc["metadata"]["name"] = "a" * 47
    assert any("<sweep>-<n>" in p for p in check(doc))


def _field(path: str):
    """The annotation of a template field, by its wire path."""
    model: type[BaseModel] = FineTuneJobSpec
    annotation = None
    for part in path.split("."):
        info = next(f for name, f in model.model_fields.items() if f.alias == part or name == part)
        annotation = info.annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
        model = args[0]
    return model


@pytest.mark.parametrize("path", TUNABLE)
def test_every_tunable_path_is_a_template_field_of_its_kind(path):
    kind = {int: Kind.int, float: Kind.float}.get(_field(path), Kind.choice)
    assert TUNABLE[path] == kind


@pytest.mark.parametrize(("metric", "key"), [("loss", "loss"), ("f1", "f1"), ("bleu", "bleu"),
                                             ("tokenAccuracy", "token_accuracy"),
                                             ("rewardsAccuracy", "rewards_accuracy")])
def test_an_objective_metric_is_named_as_the_trainer_names_it(metric, key):
    """The trainer's events, manifest and metrics say f1, not pydantic's to_snake f_1."""
    from kubetune_api import metric_key

    assert metric_key(metric) == key
