"""The trainer config file: one versioned YAML/JSON document, read by every trainer process.

    apiVersion: kubetune.io/v1alpha1
    kind: TrainerConfig
    jobName: support-bot
    baseModel: {uri: s3://models/tiny/}
    dataset: {train: s3://data/train.jsonl, format: auto}
    ...                      # the same sections as a FineTuneJob spec (see spec.py)
    metrics: {port: 9400}
    workDir: /tmp/kubetune

The operator writes it into a ConfigMap from the FineTuneJob spec (TrainerConfig.from_job); `kubetune run`
does the same locally. Credentials never appear here: boto3 reads them from the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from .errors import ConfigError
from .spec import (
    BaseModelSpec,
    CheckpointSpec,
    DatasetSpec,
    EvaluationSpec,
    FineTuneJob,
    FineTuneJobSpec,
    Hyperparameters,
    MethodSpec,
    Model,
    Objective,
    ObjectiveParams,
    OutputSpec,
    StorageSpec,
    TaskType,
    task_problem,
)

CONFIG_VERSION = "kubetune.io/v1alpha1"
# An H100 SXM sustains about 400 of its 989 dense bf16 TFLOPS in LoRA fine-tuning (40% model FLOPs
# utilization); the chart's estimate.gpuTflops sets the figure of the cluster's GPUs.
DEFAULT_GPU_TFLOPS = 400.0


class MetricsSpec(Model):
    enabled: bool = True
    port: int = Field(9400, ge=0, le=65535, description="Prometheus endpoint on rank 0; 0 picks a free port")


class StorageEndpoint(Model):
    """StorageSpec less the Kubernetes-only fields (the operator turns those into env vars)."""

    endpoint: str | None = None
    region: str = "us-east-1"
    addressing_style: Literal["auto", "path", "virtual"] = "auto"


class Hardware(Model):
    """What the run trains on, for the data report's cost estimate (data/report.py). The operator fills it from
    spec.resources and the chart's estimate.gpuTflops; `kubetune run` leaves the defaults."""

    processes: int = Field(1, ge=1, description="Training processes: workers x gpusPerWorker (workers on CPU)")
    gpus: int = Field(0, ge=0, description="GPUs over all workers")
    gpu_tflops: float = Field(DEFAULT_GPU_TFLOPS, gt=0, description="Sustained dense bf16 TFLOPS per GPU")


class TrainerConfig(Model):
    api_version: Literal["kubetune.io/v1alpha1"] = CONFIG_VERSION
    kind: Literal["TrainerConfig"] = "TrainerConfig"
    job_name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    run_id: str | None = Field(None, max_length=128, description="Which run this is: the FineTuneJob's uid (the "
                               "operator sets it); `kubetune run`: a hash of the manifest")
    task: TaskType = TaskType.causal_lm
    objective: Objective = Objective.sft
    objective_params: ObjectiveParams = Field(default_factory=ObjectiveParams)
    base_model: BaseModelSpec
    dataset: DatasetSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    output: OutputSpec
    storage: StorageEndpoint = Field(default_factory=StorageEndpoint)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    hardware: Hardware = Field(default_factory=Hardware)
    work_dir: str = "/tmp/kubetune"

    @property
    def checkpoint_uri(self) -> str:
        return self.checkpoint.uri or join_uri(self.output.uri, "checkpoints/")

    @property
    def cache_uri(self) -> str:
        return self.dataset.cache_uri or join_uri(self.checkpoint_uri, "data-cache/")

    @classmethod
    def from_job(cls, name: str, spec: FineTuneJobSpec, **overrides) -> TrainerConfig:
        storage: StorageSpec = spec.storage
        return cls(
            job_name=name,
            task=spec.task,
            objective=spec.objective,
            objective_params=spec.objective_params,
            base_model=spec.base_model,
            dataset=spec.dataset,
            method=spec.method,
            hyperparameters=spec.hyperparameters,
            evaluation=spec.evaluation,
            checkpoint=spec.checkpoint,
            output=spec.output,
            storage=StorageEndpoint(
                endpoint=storage.endpoint, region=storage.region, addressing_style=storage.addressing_style
            ),
            **overrides,
        )

    @model_validator(mode="after")
    def _fits_the_task(self) -> TrainerConfig:
        task_problem(self)
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.dump(), sort_keys=False)


def join_uri(prefix: str, name: str) -> str:
    return prefix.rstrip("/") + "/" + name.lstrip("/")


def _describe(err: ValidationError, source: str) -> str:
    problems = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(document)"
        problems.append(f"{field}: {e['msg']}")
    return f"{source}: invalid config: " + "; ".join(problems)


def _read_document(path: Path) -> dict:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML/JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return doc


def load_config(path: str | Path) -> TrainerConfig:
    """Read a TrainerConfig file, or a FineTuneJob manifest (turned into a TrainerConfig)."""
    path = Path(path)
    doc = _read_document(path)
    try:
        if doc.get("kind") == "FineTuneJob":
            job = FineTuneJob.model_validate(doc)
            return TrainerConfig.from_job(job.metadata.name, job.spec)
        return TrainerConfig.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(_describe(e, str(path))) from e


def load_job(path: str | Path) -> FineTuneJob:
    path = Path(path)
    try:
        return FineTuneJob.model_validate(_read_document(path))
    except ValidationError as e:
        raise ConfigError(_describe(e, str(path))) from e
