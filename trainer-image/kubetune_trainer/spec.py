"""The FineTuneJob API (group kubetune.io, version v1alpha1): the single typed source of truth.

Field names are the user-facing contract. The operator generates the CRD schema in crds/ from these
models, and the trainer reads the same models (through TrainerConfig) so a manifest means the same
thing on a cluster and in `kubetune run`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "kubetune.io"
API_VERSION = "v1alpha1"
KIND = "FineTuneJob"

URI_SCHEMES = ("s3://", "hf://", "pvc://", "file://", "/")


class Model(BaseModel):
    """Base for every API object: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def dump(self) -> dict[str, Any]:
        """The wire form: camelCase, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class DataFormat(StrEnum):
    auto = "auto"
    chat = "chat"  # {"messages": [{"role": "system|user|assistant", "content": "..."}]}
    instruction = "instruction"  # {"instruction": ..., "input": ..., "output": ...}
    completion = "completion"  # {"prompt": ..., "completion": ...}
    text = "text"  # {"text": ...}


class MethodType(StrEnum):
    lora = "lora"
    qlora = "qlora"
    full = "full"


class Precision(StrEnum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Scheduler(StrEnum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"


QLORA_FSDP = "hyperparameters.strategy fsdp does not support method.type qlora: use lora with fsdp, or qlora with ddp"


class Strategy(StrEnum):
    ddp = "ddp"  # every process holds the whole model; gradients are averaged (DistributedDataParallel)
    fsdp = "fsdp"  # parameters, gradients and optimizer state sharded over the processes (FSDP2)


class BaseModelSpec(Model):
    uri: str = Field(description="Hugging Face model folder: s3://bucket/prefix/, hf://org/name, "
                                 "pvc://claim/path or a local path")
    revision: str | None = Field(None, description="Hub revision, for hf:// only")


class DatasetSpec(Model):
    train: str = Field(description="s3:// object or prefix, or a local path, of JSONL, JSON or Parquet records")
    validation: str | None = Field(None, description="Validation split, used for evaluation and early stopping")
    test: str | None = Field(None, description="Held-out test split, evaluated once at the end")
    format: DataFormat = Field(DataFormat.auto, description="Record format; auto detects it from the first record")
    min_samples: int = Field(1, ge=1, description="Fewer valid training records than this is an error")


class LoraSpec(Model):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], min_length=1)


class MethodSpec(Model):
    type: MethodType = MethodType.lora
    lora: LoraSpec = Field(default_factory=LoraSpec)


class Hyperparameters(Model):
    epochs: float | None = Field(None, gt=0, description="Passes over the training data; exclusive with maxSteps")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; exclusive with epochs")
    learning_rate: float = Field(2e-4, gt=0, le=1)
    batch_size: int = Field(8, ge=1, description="Per-device batch size (sequences)")
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_seq_length: int = Field(2048, ge=8)
    packing: bool = Field(True, description="Pack short samples into full sequences")
    scheduler: Scheduler = Scheduler.cosine
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    precision: Precision = Precision.auto
    gradient_checkpointing: bool = False
    logging_steps: int = Field(10, ge=1)
    strategy: Strategy = Field(
        Strategy.ddp, description="Across several processes: ddp replicates the model in each; fsdp shards it "
        "(parameters, gradients, optimizer state) for models too large for one GPU")

    @model_validator(mode="after")
    def _epochs_xor_max_steps(self) -> Hyperparameters:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("hyperparameters: set either epochs or maxSteps, not both")
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1
        return self


class EarlyStoppingSpec(Model):
    patience: int = Field(3, ge=1, description="Evaluations without validation-loss improvement before stopping")
    min_delta: float = Field(0.0, ge=0)


class EvaluationSpec(Model):
    every_steps: int | None = Field(None, ge=1, description="Evaluate on the validation split every N steps")
    early_stopping: EarlyStoppingSpec | None = None


class CheckpointSpec(Model):
    every_steps: int | None = Field(None, ge=1)
    every_minutes: float | None = Field(None, gt=0)
    keep: int = Field(2, ge=1, description="Checkpoints kept in object storage")
    uri: str | None = Field(None, description="Defaults to <output.uri>checkpoints/")


class OutputSpec(Model):
    uri: str = Field(description="s3:// prefix (or local path) where the adapter and manifest.json are published")


class SecretRef(Model):
    name: str


class StorageSpec(Model):
    endpoint: str | None = Field(None, description="S3-compatible endpoint URL (MinIO, Ceph, R2); AWS when unset")
    region: str = "us-east-1"
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    secret_ref: SecretRef | None = Field(
        None, description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optional AWS_SESSION_TOKEN)"
    )
    service_account_name: str | None = Field(
        None, description="Workload identity (IRSA and the like) instead of a secret")


class Toleration(Model):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")
    key: str | None = None
    operator: str | None = None
    value: str | None = None
    effect: str | None = None
    toleration_seconds: int | None = None


class ResourcesSpec(Model):
    workers: int = Field(1, ge=1, le=512)
    gpus_per_worker: int = Field(1, ge=0, le=16)
    gpu_resource_name: str = "nvidia.com/gpu"
    cpu: str | None = None
    memory: str | None = None
    node_selector: dict[str, str] | None = None
    tolerations: list[Toleration] | None = None
    affinity: dict[str, Any] | None = None


class RunPolicy(Model):
    backoff_limit: int = Field(3, ge=0, description="Retries of failed workers; preemptions are not counted")
    active_deadline_seconds: int | None = Field(None, ge=1)
    ttl_seconds_after_finished: int | None = Field(None, ge=0)
    suspend: bool = False
    hang_timeout_seconds: int | None = Field(None, ge=30, description="Restart workers after this long without a step")


class SchedulingSpec(Model):
    priority_class_name: str | None = None
    queue_name: str | None = Field(None, description="Kueue LocalQueue; set as the kueue.x-k8s.io/queue-name label")


class FineTuneJobSpec(Model):
    base_model: BaseModelSpec
    dataset: DatasetSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    output: OutputSpec
    storage: StorageSpec = Field(default_factory=StorageSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    image: str | None = Field(None, description="Trainer image; the operator's default when unset")
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)

    @model_validator(mode="after")
    def _qlora_needs_gpus(self) -> FineTuneJobSpec:
        if self.method.type == MethodType.qlora and self.resources.gpus_per_worker < 1:
            raise ValueError("method.type qlora needs GPUs: set resources.gpusPerWorker to 1 or more, or use lora")
        if self.method.type == MethodType.qlora and self.hyperparameters.strategy == Strategy.fsdp:
            raise ValueError(QLORA_FSDP)
        return self


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str | None = None


class FineTuneJob(Model):
    """A whole manifest, as `kubectl apply -f` and `kubetune run` read it."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    api_version: Literal["kubetune.io/v1alpha1"]
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta
    spec: FineTuneJobSpec
