"""Generate the CustomResourceDefinitions from the typed API: FineTuneJob (finetunejob.py, status.py) and
FineTuneSweep (sweep.py).

    python -m kubetune_api.crd > crds/kubetune.io_finetunejobs.yaml                     (make crds)
    python -m kubetune_api.crd finetunesweeps > crds/kubetune.io_finetunesweeps.yaml

Pydantic's JSON Schema is turned into a structural OpenAPI v3 schema: $refs inlined, `anyOf [X, null]`
collapsed to X (unset means omitted), exclusive bounds in OpenAPI 3.0 form, defaults kept (`{}` for
nested objects, so the API server fills their defaults), free-form maps marked
x-kubernetes-preserve-unknown-fields. Cross-field rules, value syntaxes (finetunejob.SYNTAX, with the messages pydantic
gives) and the immutability of the fields that determine what is trained are CEL (x-kubernetes-validations).
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema

from .finetunejob import (
    API_GROUP,
    API_VERSION,
    CLASSIFICATION_TASKS,
    DPO_PARAMS_NEED_DPO,
    DTYPE_NEEDS_MERGED,
    FSDP_FP16,
    GENERATION_NEEDS_CAUSAL_LM,
    KIND,
    LABEL_VALUE,
    LABELS_NEED_CLASSIFICATION,
    MERGED_NEEDS_ADAPTER,
    METRIC_NEEDS_CLASSIFICATION,
    NODE_SELECTOR_KEYS,
    NODE_SELECTOR_VALUES,
    OBJECTIVE_NEEDS_CAUSAL_LM,
    OBJECTIVE_NEEDS_PREFERENCE_FORMAT,
    PREFERENCE_FORMAT_NEEDS_OBJECTIVE,
    PREFERENCE_FORMATS,
    QLORA_FSDP,
    QUALIFIED_NAME,
    QUANTITY,
    SELECT_BEST_NEEDS_VALIDATION,
    SYNTAX,
    TASK_FORMATS,
    TOLERATION_EXISTS_VALUE,
    TRAIN_ON_VALIDATION_ALONE,
    DataFormat,
    FineTuneJobSpec,
    fields_problem,
    format_problem,
    mappable_fields,
)
from .status import FineTuneJobStatus
from .sweep import (
    DUPLICATE_PATH,
    GRID_NEEDS_VALUES,
    LOG_NEEDS_POSITIVE,
    MAX_SWEEP_NAME,
    METRICS,
    MIN_ABOVE_MAX,
    NAME_TOO_LONG,
    NEEDS_VALIDATION,
    PATH_NOT_TUNABLE,
    PRUNING_NEEDS_EVALUATIONS,
    RANGE_NOT_NUMERIC,
    RANGES,
    STEP_NEEDS_RANGE,
    SWEEP_KIND,
    TEMPLATE_TRAINS_ON_VALIDATION,
    TUNABLE,
    FineTuneSweepSpec,
    FineTuneSweepStatus,
    Kind,
    metric_problem,
)

PLURAL = "finetunejobs"
MAX_NAME = 50
MAX_URI = 2048  # <name>-train-<index> must stay a 63-character hostname

S3_OR_PVC = r"^(s3|pvc)://.+"


def _uri_rule(pattern: str, field: str, schemes: str) -> dict:
    return {"rule": f"self.matches('{pattern}')", "message": f"{field} must be an {schemes} URI"}


def _cel_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _syntax_rule(pattern: str, message: str) -> dict:
    """A SYNTAX entry of the typed API as CEL: the same check, the same message. Quantities must also parse
    (isQuantity); the pattern keeps out what isQuantity alone takes for zero, such as `Mi` or `.`."""
    rule = f"self.matches({_cel_string(pattern)})"
    return {"rule": f"{rule} && isQuantity(self)" if pattern == QUANTITY else rule, "message": message}


def immutable(field: str, kind: str = KIND) -> str:
    return (f"spec.{field} is immutable once the {kind} exists: create a new {kind} "
            "(or delete and re-create this one) to train with other values")


# What determines what is trained cannot change (transition rules: they run on updates only). runPolicy and
# validation stay mutable; `image` is optional, so its rule sits on spec to also see it added or removed.
IMMUTABLE = ("task", "objective", "objectiveParams", "baseModel", "dataset", "method", "hyperparameters",
             "evaluation", "checkpoint", "output", "storage", "tracking", "resources", "scheduling")
MUTABLE = ("runPolicy", "validation")
IMAGE_UNCHANGED = {"rule": "has(self.image) == has(oldSelf.image) && (!has(self.image) || self.image == oldSelf.image)",
                   "message": immutable("image"), "fieldPath": ".image"}


TASK = "(has(self.task) ? self.task : 'causal-lm')"
CLASSIFICATION = "[" + ", ".join(f"'{t.value}'" for t in CLASSIFICATION_TASKS) + "]"
OBJECTIVE = "(has(self.objective) ? self.objective : 'sft')"
PAIRS = "[" + ", ".join(f"'{f.value}'" for f in PREFERENCE_FORMATS) + "]"


def _task_rules() -> list[dict]:
    """The dataset, evaluation and output settings that must fit spec.task (finetunejob.task_problem)."""
    formats = [{"rule": f"!has(self.dataset.format) || {TASK} != '{task.value}' || self.dataset.format in ["
                        + ", ".join(f"'{f.value}'" for f in allowed) + "]",
                "message": format_problem(task), "fieldPath": ".dataset.format"}
               for task, allowed in TASK_FORMATS.items()]
    return formats + _fields_rules() + [
        {"rule": f"!has(self.evaluation) || !has(self.evaluation.metric) || self.evaluation.metric == 'loss' || "
                 f"{TASK} in {CLASSIFICATION}",
         "message": METRIC_NEEDS_CLASSIFICATION, "fieldPath": ".evaluation.metric"},
        {"rule": f"!has(self.evaluation) || !has(self.evaluation.generation) || {TASK} == 'causal-lm'",
         "message": GENERATION_NEEDS_CAUSAL_LM, "fieldPath": ".evaluation.generation"},
        {"rule": f"!has(self.dataset.labels) || {TASK} in {CLASSIFICATION}",
         "message": LABELS_NEED_CLASSIFICATION, "fieldPath": ".dataset.labels"},
        {"rule": "!has(self.output.select) || self.output.select != 'best' || (has(self.dataset.validation) && "
                 "has(self.evaluation) && has(self.evaluation.everySteps))",
         "message": SELECT_BEST_NEEDS_VALIDATION, "fieldPath": ".output.select"},
        {"rule": "!has(self.dataset.trainOnValidation) || !self.dataset.trainOnValidation || "
                 "(has(self.dataset.validation) && (!has(self.evaluation) || (!has(self.evaluation.everySteps) && "
                 "!has(self.evaluation.earlyStopping))) && (!has(self.output.select) || self.output.select != 'best'))",
         "message": TRAIN_ON_VALIDATION_ALONE, "fieldPath": ".dataset.trainOnValidation"},
        *_objective_rules(),
    ]


def _fields_rules() -> list[dict]:
    """dataset.fields keys: the fields of the task's declared format, or with format auto of all its formats."""
    rules = []
    for task, formats in TASK_FORMATS.items():
        for fmt in formats:
            declared = ("(!has(self.dataset.format) || self.dataset.format == 'auto')" if fmt == DataFormat.auto
                        else f"(has(self.dataset.format) && self.dataset.format == '{fmt.value}')")
            keys = "[" + ", ".join(f"'{f}'" for f in mappable_fields(task, fmt)) + "]"
            rules.append({"rule": f"!has(self.dataset.fields) || {TASK} != '{task.value}' || !{declared} || "
                                  f"self.dataset.fields.all(k, k in {keys})",
                          "message": fields_problem(task, fmt), "fieldPath": ".dataset.fields"})
    return rules


def _objective_rules() -> list[dict]:
    """spec.objective against the task, the data format and objectiveParams; output.merged and dtype."""
    params = "self.objectiveParams"
    return [
        {"rule": f"{OBJECTIVE} == 'sft' || {TASK} == 'causal-lm'",
         "message": OBJECTIVE_NEEDS_CAUSAL_LM, "fieldPath": ".objective"},
        {"rule": f"!has(self.dataset.format) || !(self.dataset.format in {PAIRS}) || {OBJECTIVE} != 'sft'",
         "message": PREFERENCE_FORMAT_NEEDS_OBJECTIVE, "fieldPath": ".dataset.format"},
        {"rule": f"{OBJECTIVE} == 'sft' || !has(self.dataset.format) || self.dataset.format == 'auto' || "
                 f"self.dataset.format in {PAIRS}",
         "message": OBJECTIVE_NEEDS_PREFERENCE_FORMAT, "fieldPath": ".dataset.format"},
        {"rule": f"{OBJECTIVE} == 'dpo' || !has({params}) || ((!has({params}.loss) || {params}.loss == 'sigmoid') "
                 f"&& (!has({params}.referenceFree) || !{params}.referenceFree))",
         "message": DPO_PARAMS_NEED_DPO, "fieldPath": ".objectiveParams"},
        {"rule": "!has(self.output.merged) || !self.output.merged || !has(self.method) || !has(self.method.type) || "
                 "self.method.type != 'full'",
         "message": MERGED_NEEDS_ADAPTER, "fieldPath": ".output.merged"},
        {"rule": "!has(self.output.dtype) || (has(self.output.merged) && self.output.merged)",
         "message": DTYPE_NEEDS_MERGED, "fieldPath": ".output.dtype"},
    ]


# CEL rules, by path under spec ("" is spec itself). Scalar rules sit on the field they check.
RULES: dict[str, list[dict]] = {
    "": [
        *_task_rules(),
        {"rule": "!has(self.method) || !has(self.method.type) || self.method.type != 'qlora' || "
                 "!has(self.resources) || !has(self.resources.gpusPerWorker) || "
                 "self.resources.gpusPerWorker >= 1",
         "message": "method.type qlora needs GPUs: set resources.gpusPerWorker to 1 or more, or use lora",
         "fieldPath": ".method.type"},
        {"rule": "!has(self.method) || !has(self.method.type) || self.method.type != 'qlora' || "
                 "!has(self.hyperparameters) || !has(self.hyperparameters.strategy) || "
                 "self.hyperparameters.strategy != 'fsdp'",
         "message": QLORA_FSDP, "fieldPath": ".hyperparameters.strategy"},
        {"rule": "!has(self.hyperparameters) || !has(self.hyperparameters.precision) || "
                 "self.hyperparameters.precision != 'fp16' || !has(self.hyperparameters.strategy) || "
                 "self.hyperparameters.strategy != 'fsdp'",
         "message": FSDP_FP16, "fieldPath": ".hyperparameters.precision"},
        {"rule": "!has(self.evaluation) || !has(self.evaluation.earlyStopping) || "
                 "has(self.dataset.validation)",
         "message": "evaluation.earlyStopping needs a validation split: set dataset.validation",
         "fieldPath": ".evaluation.earlyStopping"},
    ],
    "baseModel": [{"rule": "!has(self.revision) || self.uri.startsWith('hf://')",
                   "message": "baseModel.revision applies to hf:// models only", "fieldPath": ".revision"}],
    "baseModel.uri": [_uri_rule(r"^(s3|hf|pvc)://.+", "baseModel.uri", "s3://, hf:// or pvc://")],
    "dataset.train": [_uri_rule(S3_OR_PVC, "dataset.train", "s3:// or pvc://")],
    "dataset.validation": [_uri_rule(S3_OR_PVC, "dataset.validation", "s3:// or pvc://")],
    "dataset.test": [_uri_rule(S3_OR_PVC, "dataset.test", "s3:// or pvc://")],
    "dataset.cacheUri": [_uri_rule(S3_OR_PVC, "dataset.cacheUri", "s3:// or pvc://")],
    "output.uri": [_uri_rule(S3_OR_PVC, "output.uri", "s3:// or pvc://")],
    "checkpoint.uri": [_uri_rule(S3_OR_PVC, "checkpoint.uri", "s3:// or pvc://")],
    "hyperparameters": [{"rule": "!(has(self.epochs) && has(self.maxSteps))",
                         "message": "hyperparameters: set either epochs or maxSteps, not both"}],
    "storage": [{"rule": "!(has(self.secretRef) && has(self.serviceAccountName))",
                 "message": "storage: set either secretRef or serviceAccountName, not both"}],
    "resources.nodeSelector": [
        {"rule": f"self.all(k, size(k) <= 317 && k.matches({_cel_string(QUALIFIED_NAME)}))",
         "message": NODE_SELECTOR_KEYS},
        {"rule": f"self.all(k, self[k].matches({_cel_string(LABEL_VALUE)}))", "message": NODE_SELECTOR_VALUES},
    ],
    "resources.tolerations[]": [{"rule": "!has(self.operator) || self.operator != 'Exists' || "
                                         "!has(self.value) || self.value == ''",
                                 "message": TOLERATION_EXISTS_VALUE, "fieldPath": ".value"}],
}

ROOT_RULES = [{
    "rule": "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && "
            f"size(self.metadata.name) <= {MAX_NAME}",
    "message": "metadata.name must start with a letter, be a DNS label and have at most "
               f"{MAX_NAME} characters (it names the worker Service and pods)",
}]

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.text"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.trainLoss"},
    {"name": "Eval Loss", "type": "number", "jsonPath": ".status.evalLoss"},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
    {"name": "Result", "type": "string", "jsonPath": ".status.result.summary",
     "description": "The headline test metric, fine-tuned (base model in parentheses)"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
    {"name": "Attempt", "type": "integer", "jsonPath": ".status.attempts.current", "priority": 1,
     "description": "The current training attempt (status.attempts counts what ended the others, by kind)"},
    {"name": "GPU-h", "type": "number", "jsonPath": ".status.dataset.estimatedGPUHours", "priority": 1,
     "description": "GPU-hours the validation estimated for the run (the ETA column refines it once it trains)"},
    {"name": "Quality", "type": "integer", "jsonPath": ".status.dataset.quality.findings", "priority": 1,
     "description": "Data-quality checks that found something (status.dataset.quality; 0: none)"},
]


class _Generator(GenerateJsonSchema):
    """Also emit defaults given by default_factory: `{}` for nested models, the value otherwise."""

    def default_schema(self, schema):
        json_schema = super().default_schema(schema)
        factory = schema.get("default_factory")
        if factory and "default" not in json_schema and not schema.get("default_factory_takes_data"):
            value = factory()
            json_schema["default"] = {} if isinstance(value, BaseModel) else self.encode_default(value)
        return json_schema


def openapi(node: dict, defs: dict) -> dict:
    """One pydantic JSON Schema node -> a structural OpenAPI v3 node."""
    node = dict(node)
    if "$ref" in node:
        node = {**openapi(defs[node.pop("$ref").split("/")[-1]], defs), **node}
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {options} structurally")
        node = {**openapi(options[0], defs), **node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs", "propertyNames") or (key == "default" and value is None):
            continue  # propertyNames: not in structural schemas; map keys are checked by CEL
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "properties":
            out[key] = {name: openapi(prop, defs) for name, prop in value.items()}
        elif key == "items":  # Any (a choice's values): any JSON value
            out[key] = openapi(value, defs) if value else {"x-kubernetes-preserve-unknown-fields": True}
        elif key == "additionalProperties":
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                out[key] = openapi(value, defs)
            # False: the API server prunes unknown fields and `kubectl apply` (strict validation) rejects them
        else:
            out[key] = value
    first = [k for k in ("type", "description") if k in out]
    return {k: out[k] for k in [*first, *(k for k in out if k not in first)]}


def model_schema(model: type[BaseModel]) -> dict:
    schema = model.model_json_schema(by_alias=True, schema_generator=_Generator)
    return openapi(schema, schema.get("$defs", {}))


def job_rules() -> dict[str, list[dict]]:
    """RULES and the SYNTAX rules, by path under spec ("name[]": the list's items)."""
    rules = {path: list(path_rules) for path, path_rules in RULES.items()}
    for path, (pattern, message) in SYNTAX.items():
        rules.setdefault(path, []).append(_syntax_rule(pattern, message))
    return rules


def all_rules() -> dict[str, list[dict]]:
    """job_rules and the immutability rules."""
    rules = job_rules()
    for field in IMMUTABLE:
        rules.setdefault(field, []).append({"rule": "self == oldSelf", "message": immutable(field)})
    rules[""].append(IMAGE_UNCHANGED)
    return rules


def _add_rules(schema: dict, rules: dict[str, list[dict]]) -> dict:
    for path, path_rules in rules.items():
        node = schema
        for part in filter(None, path.split(".")):
            node = node["properties"][part.removesuffix("[]")]
            node = node["items"] if part.endswith("[]") else node
        node["x-kubernetes-validations"] = path_rules
        if node.get("type") == "string":
            node.setdefault("maxLength", MAX_URI)  # bounds the CEL cost estimate
    return schema


def spec_schema() -> dict:
    schema = _add_rules(model_schema(FineTuneJobSpec), all_rules())
    schema["description"] = "What to fine-tune, on what data, how, and where to publish the result"
    return schema


def status_schema(model: type[BaseModel] = FineTuneJobStatus) -> dict:
    schema = model_schema(model)
    schema["description"] = "Written by the operator"
    conditions = schema["properties"]["conditions"]
    conditions.update({"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    return schema


def _crd(kind: str, plural: str, short: str, description: str, spec: dict, status: dict, root_rules: list[dict],
         columns: list[dict]) -> dict:
    root = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                       "metadata": {"type": "object"}, "spec": spec, "status": status},
        "x-kubernetes-validations": root_rules,
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{API_GROUP}", "labels": {"app.kubernetes.io/name": "kubetune"}},
        "spec": {
            "group": API_GROUP,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                      "shortNames": [short], "categories": ["kubetune", "ml"]},
            "scope": "Namespaced",
            "versions": [{"name": API_VERSION, "served": True, "storage": True,
                          "subresources": {"status": {}}, "additionalPrinterColumns": columns,
                          "schema": {"openAPIV3Schema": root}}],
        },
    }


def crd() -> dict:
    return _crd(KIND, PLURAL, "ftj", "A fine-tuning run: a base model, datasets and hyperparameters in; an adapter "
                "out", spec_schema(), status_schema(), ROOT_RULES, PRINTER_COLUMNS)


# -- FineTuneSweep --------------------------------------------------------------------------------------------

SWEEP_PLURAL = "finetunesweeps"
SWEEP_IMMUTABLE = ("template", "parameters", "objective", "algorithm", "seed", "earlyStopping", "output")


def _in(values) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _sweep_metric_rules() -> list[dict]:
    """objective.metric (or the template's evaluation.metric) against what the template's task reports."""
    task = "(has(self.template.task) ? self.template.task : 'causal-lm')"
    objective = "(has(self.template.objective) ? self.template.objective : 'sft')"
    metric = ("(has(self.objective.metric) ? self.objective.metric : has(self.template.evaluation.metric) ? "
              "self.template.evaluation.metric : 'loss')")
    applies = {"classification": f"{task} in {CLASSIFICATION}",
               "sft": f"!({task} in {CLASSIFICATION}) && {objective} == 'sft'",
               "preference": f"!({task} in {CLASSIFICATION}) && {objective} != 'sft'"}
    return [{"rule": f"!({applies[group]}) || {metric} in {_in(metrics)}", "message": metric_problem(group),
             "fieldPath": ".objective.metric"} for group, (metrics, _) in METRICS.items()]


SWEEP_RULES: dict[str, list[dict]] = {
    "": [
        *_sweep_metric_rules(),
        {"rule": "self.parameters.all(p, self.parameters.exists_one(q, q.path == p.path))",
         "message": DUPLICATE_PATH, "fieldPath": ".parameters"},
        {"rule": "has(self.template.dataset.validation)", "message": NEEDS_VALIDATION,
         "fieldPath": ".template.dataset"},
        {"rule": "!has(self.template.dataset.trainOnValidation) || !self.template.dataset.trainOnValidation",
         "message": TEMPLATE_TRAINS_ON_VALIDATION, "fieldPath": ".template.dataset.trainOnValidation"},
        {"rule": "self.earlyStopping == 'none' || has(self.template.evaluation.everySteps)",
         "message": PRUNING_NEEDS_EVALUATIONS, "fieldPath": ".earlyStopping"},
        {"rule": "self.algorithm != 'grid' || self.parameters.all(p, !has(p.min) || has(p.step) || p.path in "
                 f"{_in(p for p, k in TUNABLE.items() if k == Kind.int)})",
         "message": GRID_NEEDS_VALUES, "fieldPath": ".algorithm"},
    ],
    "parameters[]": [
        {"rule": "!has(self.step) || has(self.min)", "message": STEP_NEEDS_RANGE, "fieldPath": ".step"},
        {"rule": f"!has(self.min) || !(self.path in {_in(TUNABLE)}) || self.path in {_in(RANGES)}",
         "message": RANGE_NOT_NUMERIC, "fieldPath": ".min"},
        {"rule": "!has(self.min) || !has(self.max) || self.min <= self.max", "message": MIN_ABOVE_MAX,
         "fieldPath": ".min"},
        {"rule": "!self.log || !has(self.min) || self.min > 0.0", "message": LOG_NEEDS_POSITIVE, "fieldPath": ".log"},
    ],
    "parameters[].path": [{"rule": f"self in {_in(TUNABLE)}", "message": PATH_NOT_TUNABLE}],
    "output.uri": [_uri_rule(S3_OR_PVC, "output.uri", "s3:// or pvc://")],
}

SWEEP_ROOT_RULES = [{
    "rule": "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && "
            f"size(self.metadata.name) <= {MAX_SWEEP_NAME}",
    "message": NAME_TOO_LONG,
}]

SWEEP_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Trials", "type": "string", "jsonPath": ".status.progress",
     "description": "Trials done (succeeded, pruned or failed) / spec.maxTrials"},
    {"name": "Best", "type": "number", "jsonPath": ".status.best.metric",
     "description": "The best trial's objective metric"},
    {"name": "Metric", "type": "string", "jsonPath": ".status.objective",
     "description": "The objective metric and its goal"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Best Trial", "type": "string", "jsonPath": ".status.best.trial", "priority": 1},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
]


def sweep_rules() -> dict[str, list[dict]]:
    """SWEEP_RULES, the template's FineTuneJob rules under `template`, and the immutability rules."""
    rules = {path: list(path_rules) for path, path_rules in SWEEP_RULES.items()}
    for path, path_rules in job_rules().items():
        rules.setdefault(f"template.{path}" if path else "template", []).extend(path_rules)
    for field in SWEEP_IMMUTABLE:
        rules.setdefault(field, []).append({"rule": "self == oldSelf", "message": immutable(field, SWEEP_KIND)})
    return rules


# A choice's values may be of any JSON type, which CEL cannot see: the schema itself says a parameter is either a
# range or a choice (the API server: "must validate one and only one schema (oneOf)"), and a choice has 2+ values.
RANGE_OR_CHOICE = [{"required": ["min", "max"]}, {"required": ["values"]}]


def sweep_crd() -> dict:
    spec = _add_rules(model_schema(FineTuneSweepSpec), sweep_rules())
    spec["properties"]["parameters"]["items"]["oneOf"] = RANGE_OR_CHOICE
    spec["description"] = "A hyperparameter search: FineTuneJob trials from a template, sampled and pruned by Optuna"
    return _crd(SWEEP_KIND, SWEEP_PLURAL, "fts", "A hyperparameter sweep over FineTuneJobs, with early stopping, "
                "a GPU-hour budget and the winner promoted", spec, status_schema(FineTuneSweepStatus),
                SWEEP_ROOT_RULES, SWEEP_COLUMNS)


CRDS = {PLURAL: crd, SWEEP_PLURAL: sweep_crd}


HEADER = "# Generated by `python -m kubetune_api.crd` (make crds) from api/kubetune_api. Do not edit.\n"


class _PlainDumper(yaml.SafeDumper):
    """Writes a value that the schema shares between fields (one enum's values) in full each time: no &id001."""

    def ignore_aliases(self, data) -> bool:
        return True


def render(plural: str = PLURAL) -> str:
    return HEADER + yaml.dump(CRDS[plural](), Dumper=_PlainDumper, sort_keys=False, width=120)


if __name__ == "__main__":
    sys.stdout.write(render(*sys.argv[1:2]))
