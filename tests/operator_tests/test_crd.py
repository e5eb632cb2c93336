"""The CRD: generated from the typed API, committed, structural, with CEL rules and printer columns."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubetune_api import FineTuneJob, crd
from kubetune_api.finetunejob import (
    NODE_SELECTOR_KEYS,
    NODE_SELECTOR_VALUES,
    QLORA_FSDP,
    SYNTAX,
    TOLERATION_EXISTS_VALUE,
)
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[2]
VALID_EXAMPLES = ["finetunejob.yaml", "demo-finetunejob.yaml", "text-classification/finetunejob.yaml",
                  "image-classification/finetunejob.yaml"]
CRD_FILE = ROOT / "crds" / "kubetune.io_finetunejobs.yaml"
INVALID = sorted((ROOT / "examples" / "invalid").glob("*.yaml"))


def expected_message(path: Path) -> str:
    return path.read_text().splitlines()[0].removeprefix("# Refused by the API server: ")


# The rules the typed API (`kubetune run`) checks with the API server's message; the others are cluster-only
# (URIs, metadata.name) or carry the API server's own wording (bounds, enums), which pydantic words its way.
TYPED_MESSAGES = [m for _, m in SYNTAX.values()] + [NODE_SELECTOR_KEYS, NODE_SELECTOR_VALUES,
                                                     TOLERATION_EXISTS_VALUE, QLORA_FSDP]
SAME_MESSAGE = [p for p in INVALID if any(expected_message(p) in m for m in TYPED_MESSAGES)]


def walk(node: dict, path: str = ""):
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def version() -> dict:
    return crd.crd()["spec"]["versions"][0]


def test_committed_crd_matches_the_generator():
    assert CRD_FILE.read_text() == crd.render(), "crds/ is stale: run `make crds`"


def test_schema_is_structural():
    root = version()["schema"]["openAPIV3Schema"]
    for path, node in walk(root):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path}: no type"
        for banned in ("$ref", "anyOf", "oneOf", "allOf", "$defs", "title", "nullable", "propertyNames"):
            assert banned not in node, f"{path}: {banned}"
        assert not ("additionalProperties" in node and "properties" in node), path
        if "default" in node:
            assert node["default"] is not None, path
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(key, True), bool), f"{path}: {key} must be a boolean in OpenAPI v3.0"
        for rule in node.get("x-kubernetes-validations", []):
            assert rule["rule"] and rule["message"], path


def test_names_scope_subresources_and_columns():
    spec = crd.crd()["spec"]
    assert spec["group"] == "kubetune.io" and spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["ftj"] and spec["names"]["categories"]
    v = version()
    assert v["name"] == "v1alpha1" and v["storage"] and v["subresources"] == {"status": {}}
    names = [c["name"] for c in v["additionalPrinterColumns"] if not c.get("priority")]
    assert names == ["Phase", "Progress", "Loss", "Eval Loss", "ETA", "Result", "Age"]
    status = v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for column in v["additionalPrinterColumns"]:
        parts = column["jsonPath"].lstrip(".").split(".")
        if parts[0] == "status":  # every column points at a field the status schema declares
            node = {"properties": status}
            for part in parts[1:]:
                node = node["properties"][part]


def test_defaults_enums_bounds_and_descriptions():
    spec = version()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["method"]["default"] == {}
    assert spec["method"]["properties"]["type"]["enum"] == ["lora", "qlora", "full"]
    assert spec["method"]["properties"]["lora"]["properties"]["targetModules"]["default"] == ["all-linear"]
    keep = spec["checkpoint"]["properties"]["keep"]
    assert keep["minimum"] == 1 and keep["default"] == 2
    lr = spec["hyperparameters"]["properties"]["learningRate"]
    assert lr["minimum"] == 0 and lr["exclusiveMinimum"] is True and lr["maximum"] == 1
    assert spec["resources"]["properties"]["affinity"]["x-kubernetes-preserve-unknown-fields"] is True
    assert "description" in spec["dataset"]["properties"]["train"]
    assert "nvidia.com/gpu" == spec["resources"]["properties"]["gpuResourceName"]["default"]
    tolerations = spec["resources"]["properties"]["tolerations"]["items"]["properties"]
    assert tolerations["operator"]["enum"] == ["Exists", "Equal"]
    assert tolerations["effect"]["enum"] == ["NoSchedule", "PreferNoSchedule", "NoExecute"]
    assert spec["validation"]["default"] == {}
    assert spec["validation"]["properties"]["activeDeadlineSeconds"]["minimum"] == 60
    assert "sizeLimit" in spec["validation"]["properties"]["ephemeralStorage"]["description"]


def test_cel_rules_cover_the_cross_field_contract():
    rules = " ".join(
        r["message"]
        for _, node in walk(version()["schema"]["openAPIV3Schema"])
        for r in node.get("x-kubernetes-validations", [])
    )
    for needle in (
        "epochs or maxSteps",
        "qlora needs GPUs",
        "baseModel.uri must be an s3://, hf:// or pvc://",
        "dataset.train must be an s3:// or pvc://",
        "output.uri must be an s3:// or pvc://",
        "secretRef or serviceAccountName",
        "metadata.name",
        "resources.cpu must be a Kubernetes quantity",
        "scheduling.queueName must be a label value",
        "image must be an image reference",
        "spec.hyperparameters is immutable once the FineTuneJob exists",
    ):
        assert needle in rules


def test_every_spec_field_is_immutable_or_deliberately_mutable():
    spec = version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert set(spec["properties"]) == {*crd.IMMUTABLE, "image", *crd.MUTABLE}
    for field in crd.IMMUTABLE:
        assert {"rule": "self == oldSelf", "message": crd.immutable(field)} in \
            spec["properties"][field]["x-kubernetes-validations"]
    assert crd.IMAGE_UNCHANGED in spec["x-kubernetes-validations"]


def test_cel_cost_is_bounded():
    """The API server refuses a CRD whose rules' estimated cost is too high: bound the strings, lists and maps."""
    for path, node in walk(version()["schema"]["openAPIV3Schema"]["properties"]["spec"], "spec"):
        if node.get("type") == "array":
            assert "maxItems" in node, path
        if node.get("x-kubernetes-validations") and node.get("type") == "string":
            assert "maxLength" in node, path
        if isinstance(node.get("additionalProperties"), dict):
            assert "maxProperties" in node, path


@pytest.mark.parametrize("path", SAME_MESSAGE, ids=[p.stem for p in SAME_MESSAGE])
def test_the_typed_api_refuses_with_the_api_servers_message(path):
    with pytest.raises(ValidationError) as refused:
        FineTuneJob.model_validate(yaml.safe_load(path.read_text()))
    assert expected_message(path) in str(refused.value)


def test_status_conditions_are_a_map_list():
    status = version()["schema"]["openAPIV3Schema"]["properties"]["status"]
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == [
        "type"
    ]
    assert status["properties"]["phase"]["enum"][0] == "Pending"


def test_status_dataset_quality_is_typed_and_has_a_wide_column():
    dataset = version()["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["dataset"]
    quality = dataset["properties"]["quality"]
    assert set(quality["properties"]) == {"duplicates", "leakage", "pii", "labels", "dropped", "findings", "summary"}
    props = quality["properties"]
    assert props["duplicates"]["additionalProperties"] == {"type": "integer", "minimum": 0}  # split -> count
    assert set(props["leakage"]["additionalProperties"]["properties"]) == {"exact", "near"}
    assert set(props["pii"]["additionalProperties"]["properties"]) == {"email", "phone", "card", "secret"}
    assert props["labels"]["properties"]["rare"]["maxItems"] == 20
    assert all("description" in p for p in props.values())
    (column,) = [c for c in version()["additionalPrinterColumns"] if c["name"] == "Quality"]
    assert column == {**column, "type": "integer", "jsonPath": ".status.dataset.quality.findings", "priority": 1}


@pytest.mark.parametrize("example", VALID_EXAMPLES)
def test_valid_examples_parse_with_the_typed_api(example):
    FineTuneJob.model_validate(yaml.safe_load((ROOT / "examples" / example).read_text()))


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_examples_say_what_the_api_server_answers(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Refused by the API server: "), "first line names the expected message"
    assert yaml.safe_load(path.read_text())["kind"] == "FineTuneJob"


def test_openapi_collapses_optional_and_refs():
    defs = {"Thing": {"type": "object", "title": "Thing", "properties": {"a": {"type": "integer"}}}}
    node = {"anyOf": [{"$ref": "#/$defs/Thing"}, {"type": "null"}], "default": None, "description": "d"}
    assert crd.openapi(node, defs) == {
        "type": "object",
        "description": "d",
        "properties": {"a": {"type": "integer"}},
    }
    with pytest.raises(ValueError):
        crd.openapi({"anyOf": [{"type": "string"}, {"type": "integer"}]}, {})
