"""The FineTuneJob spec (group kubetune.io, version v1alpha1): the single typed source of truth.

Field names are the user-facing contract. The CRD schema in crds/ is generated from these models (crd.py), and
the trainer reads the same models (TrainerConfig is this spec plus the cluster-side fields) so a manifest means
the same thing on a cluster and in `kubetune run`.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "kubetune.io"
API_VERSION = "v1alpha1"
KIND = "FineTuneJob"

# The trainer image a job without spec.image runs (the operator's KUBETUNE_TRAINER_IMAGE, the chart's
# trainer.image, replaces it); this version's.
DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"
URI_SCHEMES = ("s3://", "hf://", "pvc://", "file://", "/")

# Value syntaxes. pydantic checks them here (so `kubetune run` refuses what the cluster refuses) and the CRD's CEL
# rules (kubetune_api.crd) on the API server, with the same messages. The patterns mean the same in Python's
# re and in CEL's RE2. Quantities are non-negative, like a pod's; the API server also parses them (isQuantity).
QUANTITY = r"^\+?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUALIFIED_NAME = rf"^({DNS_SUBDOMAIN[1:-1]}/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
HTTP_URL = r"^https?://[^\s/?#]+([/?#]\S*)?$"
HTTP_URL_NO_USERINFO = r"^https?://[^\s/?#@]+([/?#]\S*)?$"  # no user:password@ in the URL: credentials go in Secrets
_COMPONENT = r"[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*"  # of a repository path: lowercase
IMAGE_REFERENCE = (rf"^([a-z0-9][-a-z0-9.]*(:[0-9]+)?/)?{_COMPONENT}(/{_COMPONENT})*"
                   r"(:[A-Za-z0-9_][-A-Za-z0-9_.]{0,127})?(@sha256:[a-f0-9]{64})?$")
LABEL_VALUE_IS = ("a label value (at most 63 characters: letters, digits, '-', '_' and '.', "
                  "beginning and ending with a letter or digit)")
DNS_SUBDOMAIN_IS = "a DNS subdomain (lowercase letters, digits, '-' and '.')"

SYNTAX: dict[str, tuple[str, str]] = {  # field path under spec -> (pattern, message)
    "image": (IMAGE_REFERENCE, "image must be an image reference such as ghcr.io/kubetune/trainer:0.1.0 "
                               "(a lowercase repository path, an optional :tag and @sha256:digest)"),
    "storage.endpoint": (HTTP_URL, "storage.endpoint must be an http:// or https:// URL "
                                   "such as http://minio.minio:9000"),
    "storage.secretRef.name": (DNS_SUBDOMAIN, f"storage.secretRef.name must be {DNS_SUBDOMAIN_IS}, "
                                              "such as s3-credentials"),
    "tracking.mlflow.uri": (HTTP_URL_NO_USERINFO, "tracking.mlflow.uri must be an http:// or https:// URL such "
                                                  "as http://mlflow.mlflow:5000, without credentials in it (put "
                                                  "them in the Secret of tracking.mlflow.secretRef)"),
    "tracking.mlflow.secretRef.name": (DNS_SUBDOMAIN, f"tracking.mlflow.secretRef.name must be {DNS_SUBDOMAIN_IS}, "
                                                      "such as mlflow-token"),
    "storage.serviceAccountName": (DNS_SUBDOMAIN, f"storage.serviceAccountName must be {DNS_SUBDOMAIN_IS}, "
                                                  "such as trainer"),
    "resources.gpuResourceName": (QUALIFIED_NAME, "resources.gpuResourceName must be a resource name such as "
                                                  "nvidia.com/gpu or amd.com/gpu"),
    "resources.cpu": (QUANTITY, "resources.cpu must be a Kubernetes quantity such as 500m or 4"),
    "resources.memory": (QUANTITY, "resources.memory must be a Kubernetes quantity such as 512Mi or 16Gi"),
    "validation.cpu": (QUANTITY, "validation.cpu must be a Kubernetes quantity such as 500m or 2"),
    "validation.memory": (QUANTITY, "validation.memory must be a Kubernetes quantity such as 512Mi or 4Gi"),
    "validation.ephemeralStorage": (QUANTITY, "validation.ephemeralStorage must be a Kubernetes quantity "
                                              "such as 10Gi"),
    "scheduling.priorityClassName": (DNS_SUBDOMAIN, f"scheduling.priorityClassName must be {DNS_SUBDOMAIN_IS}, "
                                                    "such as high-priority"),
    "scheduling.queueName": (LABEL_VALUE, f"scheduling.queueName must be {LABEL_VALUE_IS}, such as team-a"),
}
NODE_SELECTOR_KEYS = "resources.nodeSelector keys must be label keys such as gpu or kubernetes.io/arch"
NODE_SELECTOR_VALUES = f"resources.nodeSelector values must be {LABEL_VALUE_IS}"
TOLERATION_EXISTS_VALUE = ("resources.tolerations: a toleration with operator Exists matches every value: "
                           "leave value unset")
MAX_STRING = 2048
MAX_LIST = 64  # tolerations, target modules, node selector entries: bounds the CEL cost estimate
MAX_LABELS = 1024  # dataset.labels (no CEL rule reads them)


def _matching(pattern: str, message: str, max_length: int = MAX_STRING) -> Any:
    """A string type that must match `pattern` (and have at most max_length characters)."""
    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise ValueError(message)
        return value

    return Annotated[str, Field(max_length=max_length), AfterValidator(check)]


def _checked(field: str, max_length: int = MAX_STRING) -> Any:
    """The type of the field at `field` (a path under spec): its SYNTAX entry."""
    return _matching(*SYNTAX[field], max_length)


class Model(BaseModel):
    """Base for every API object: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def dump(self) -> dict[str, Any]:
        """The wire form: camelCase, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class TaskType(StrEnum):
    causal_lm = "causal-lm"  # generate text: chat, instruction, completion or plain text records
    sequence_classification = "sequence-classification"  # a label per text (or text pair)
    image_classification = "image-classification"  # a label per image


class DataFormat(StrEnum):
    auto = "auto"
    chat = "chat"  # {"messages": [{"role": "system|user|assistant", "content": "..."}]}
    sharegpt = "sharegpt"  # {"conversations": [{"from": "system|human|gpt", "value": "..."}]}
    instruction = "instruction"  # {"instruction": ..., "input": ..., "output": ...}
    completion = "completion"  # {"prompt": ..., "completion": ...}
    text = "text"  # {"text": ...}
    classification = "classification"  # {"text": ..., "label": ...} or {"image": ..., "label": ...}
    label_studio = "label-studio"  # a Label Studio JSON or JSON-MIN export
    imagefolder = "imagefolder"  # <prefix>/<label>/<image file>
    preference = "preference"  # {"prompt": ..., "chosen": ..., "rejected": ...}: strings or chat message lists
    openai_preference = "openai-preference"  # {"input": {"messages": [...]}, "preferred_output": [...],
    #                                            "non_preferred_output": [...]} (OpenAI's preference fine-tuning)


# The record formats each task reads; `auto` detects one of them from the data.
TASK_FORMATS: dict[TaskType, tuple[DataFormat, ...]] = {
    TaskType.causal_lm: (DataFormat.auto, DataFormat.chat, DataFormat.sharegpt, DataFormat.instruction,
                         DataFormat.completion, DataFormat.text, DataFormat.preference, DataFormat.openai_preference),
    TaskType.sequence_classification: (DataFormat.auto, DataFormat.classification, DataFormat.label_studio),
    TaskType.image_classification: (DataFormat.auto, DataFormat.classification, DataFormat.label_studio,
                                    DataFormat.imagefolder),
}
# The fields of each format's records, which dataset.fields can map the user's own column names onto.
FORMAT_FIELDS: dict[DataFormat, tuple[str, ...]] = {
    DataFormat.chat: ("messages",),
    DataFormat.sharegpt: ("conversations",),
    DataFormat.instruction: ("instruction", "input", "output"),
    DataFormat.completion: ("prompt", "completion"),
    DataFormat.text: ("text",),
    DataFormat.preference: ("prompt", "chosen", "rejected"),
    DataFormat.openai_preference: ("input", "preferred_output", "non_preferred_output"),
    DataFormat.classification: ("text", "text_pair", "image", "label"),
}
CLASSIFICATION_TASKS = (TaskType.sequence_classification, TaskType.image_classification)
PREFERENCE_FORMATS = (DataFormat.preference, DataFormat.openai_preference)  # pairs: what dpo and orpo train on


class Objective(StrEnum):
    """What the model is trained to do with its data (orthogonal to method.type lora, qlora or full)."""

    sft = "sft"  # supervised fine-tuning: next-token loss on the answers (classification: on the labels)
    dpo = "dpo"  # direct preference optimization on (prompt, chosen, rejected) pairs, against a reference model
    orpo = "orpo"  # odds-ratio preference optimization: SFT on the chosen answer plus an odds-ratio term, no reference


PREFERENCE_OBJECTIVES = (Objective.dpo, Objective.orpo)


class DpoLoss(StrEnum):
    sigmoid = "sigmoid"  # the DPO paper's loss: -log sigmoid(beta * (chosen margin - rejected margin))
    ipo = "ipo"  # IPO: (log-ratio difference - 1 / (2 beta))^2 on per-token mean log-probabilities


class EvalMetric(StrEnum):
    """What early stopping and output.select follow: loss is minimised, accuracy and f1 (macro) maximised."""

    loss = "loss"
    accuracy = "accuracy"
    f1 = "f1"


class Select(StrEnum):
    last = "last"  # the model at the last step
    best = "best"  # the evaluated step with the best evaluation.metric on the validation split


class ObjectiveParams(Model):
    beta: float = Field(0.1, gt=0, le=100, description="dpo: beta, how far the policy may move from the reference "
                        "model (higher: closer); orpo: lambda, the weight of the odds-ratio term beside the SFT loss")
    loss: DpoLoss = Field(DpoLoss.sigmoid, description="dpo: sigmoid (the DPO paper) or ipo")
    reference_free: bool = Field(False, description="dpo: compare with a uniform reference instead of the base "
                                 "model (no reference forward passes; orpo never has one)")


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
    trust_remote_code: bool = Field(
        False, description="Run the Python code a model folder ships (transformers' trust_remote_code); the "
        "platform's policy may forbid it")
    # Unset rather than false by default: a config without the opt-in stays readable by older trainer images.
    allow_pickle_weights: bool | None = Field(
        None, description="Also load weights in pickle-based formats (pytorch_model.bin, .pt, .pth, .pkl), which "
        "can run code when loaded; unset or false: only safetensors weights are downloaded and loaded, and a model "
        "folder without them is refused")


class QualityAction(StrEnum):
    fail = "fail"  # refuse the data before any GPU pod starts, naming the lines
    drop = "drop"  # train without the records (removed from the train split), named in the report and manifest
    warn = "warn"  # report them and train on them
    off = "off"  # do not look


class QualitySpec(Model):
    """What the validation does about each data-quality finding (docs/data-quality.md). The defaults keep a run's
    test metrics honest: an evaluation record that the train split also holds is removed from train, not from the
    evaluation split, so the test set stays the one the user chose and runs on it stay comparable."""

    duplicates: QualityAction = Field(QualityAction.drop, description="Train records that repeat an earlier one "
                                      "after normalization (Unicode NFKC, case, whitespace, punctuation); drop "
                                      "keeps the first. Repeats inside validation and test are reported only")
    leakage: QualityAction = Field(QualityAction.drop, description="Validation and test records that the train "
                                   "split holds, exactly or nearly (MinHash Jaccard >= nearThreshold; images: the "
                                   "same file or perceptual hash); drop removes the train copies")
    conflicts: QualityAction = Field(QualityAction.warn, description="Classification: one normalized text or image "
                                     "under two labels in train; drop removes every copy")
    label_errors: QualityAction = Field(QualityAction.warn, description="Classification: train records whose label "
                                        "cleanlab's confident learning suspects (out-of-fold predictions of a cheap "
                                        "CPU model)")
    personal_data: QualityAction = Field(QualityAction.warn, description="E-mail addresses, phone numbers, payment "
                                         "card numbers and credentials in the training text; reported by kind, "
                                         "count and line, never the value")
    near_threshold: float = Field(0.8, ge=0.5, le=1.0, description="Estimated Jaccard similarity of word "
                                  "shingles from which a validation or test record counts as a near copy of a "
                                  "train record")
    rare_class_ratio: float = Field(0.25, gt=0, le=1, description="Classification: a class with fewer train records "
                                    "than this times the mean per class is reported as rare")


class DatasetSpec(Model):
    train: str = Field(description="s3:// object or prefix, or a local path, of JSONL, JSON, CSV or Parquet records")
    validation: str | None = Field(None, description="Validation split, used for evaluation and early stopping")
    test: str | None = Field(None, description="Held-out test split, evaluated once at the end")
    train_on_validation: bool = Field(False, description="Train on the validation split too (train + validation; "
                                      "the test split stays held out), as a FineTuneSweep's promote retrain "
                                      "does with the best parameters. Nothing is left to evaluate on while "
                                      "training: evaluation.everySteps, evaluation.earlyStopping and output.select "
                                      "best must stay unset")
    format: DataFormat = Field(DataFormat.auto, description="Record format; auto detects it from the first record. "
                               "causal-lm: chat, sharegpt, instruction, completion, text; sequence-classification: "
                               "classification, label-studio; image-classification: classification, "
                               "label-studio, imagefolder")
    min_samples: int = Field(1, ge=1, description="Fewer valid training records than this is an error")
    labels: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None, min_length=2, max_length=MAX_LABELS, description="Classification: the class names, in the order of "
        "the model's outputs; by default the labels of the training split, sorted")
    fields: dict[Annotated[str, Field(min_length=1, max_length=64)],
                 Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None, max_length=MAX_LIST, description="Your column names for the format's fields, {field: column}: e.g. "
        "{input: context, output: response} reads Dolly's records as the instruction format, {label: "
        "airline_sentiment} a CSV's class column. The keys must be fields of the format (of the task's formats "
        "with format auto)")
    cache_uri: str | None = Field(
        None, max_length=1024, description="s3:// or pvc:// prefix (a local path with kubetune run) of the "
        "tokenized-data cache that validation "
        "writes and training memory-maps, keyed by the data, tokenizer and settings; defaults to "
        "<checkpoint uri>data-cache/. Point several jobs at one prefix to tokenize shared data once")
    quality: QualitySpec = Field(default_factory=QualitySpec, description="Data-quality checks of the validation "
                                 "and what each does: fail, drop, warn or off")


class LoraSpec(Model):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input; 0 (the default) lets the "
                           "adapter skip a copy of every LoRA input, and short fine-tunes rarely need it")
    target_modules: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=lambda: ["all-linear"], min_length=1, max_length=MAX_LIST)


class MethodSpec(Model):
    type: MethodType = MethodType.lora
    lora: LoraSpec = Field(default_factory=LoraSpec)


class LossKernel(StrEnum):
    auto = "auto"  # fused on a GPU with Liger-Kernel installed, else chunked
    chunked = "chunked"  # cross-entropy over chunks of the hidden states: full logits are never held
    fused = "fused"  # Liger-Kernel's fused linear cross-entropy (CUDA)
    full = "full"  # the model's logits in full, then cross-entropy (the plain path)


class AttentionKernel(StrEnum):
    auto = "auto"  # flash (varlen) where installed and usable, else flex on CUDA, else sdpa
    flash = "flash"  # FlashAttention 2 varlen over the packed samples (CUDA, bf16/fp16)
    flex = "flex"  # PyTorch flex_attention with a block mask of the packed samples
    sdpa = "sdpa"  # PyTorch scaled_dot_product_attention with a dense block-diagonal mask


class AdapterDtype(StrEnum):
    auto = "auto"  # bf16 where training computes in bf16, else fp32
    bf16 = "bf16"
    fp32 = "fp32"


class PerformanceSpec(Model):
    """How the trainer computes, not what: every choice gives the same training to float tolerance, and the
    defaults pick the fastest correct one for the machine. The trainer logs what it chose."""

    loss: LossKernel = Field(LossKernel.auto, description="Cross-entropy implementation: auto, chunked (never "
                             "materializes full logits), fused (Liger-Kernel, CUDA) or full (plain logits)")
    attention: AttentionKernel = Field(AttentionKernel.auto, description="Attention over packed samples: auto "
                                       "(flash, else flex on a GPU, else sdpa), flash (FlashAttention varlen), flex "
                                       "(flex_attention) or sdpa")
    adapter_dtype: AdapterDtype = Field(AdapterDtype.auto, description="dtype of the LoRA weights: auto (bf16 "
                                        "when computing in bf16), bf16 or fp32")
    checkpoint_layers: int | None = Field(
        None, ge=0, description="With gradientCheckpointing: how many decoder layers recompute their "
        "activations in the backward pass (spread evenly); by default all of them on CPU, and on a GPU as few "
        "as the free memory allows")
    liger: bool = Field(False, description="Liger-Kernel's fused RMSNorm, RoPE and SwiGLU in the decoder layers "
                        "(CUDA, liger-kernel installed)")
    compile: bool = Field(False, description="torch.compile each decoder layer (the first steps compile)")


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
    performance: PerformanceSpec = Field(default_factory=PerformanceSpec)
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
    patience: int = Field(3, ge=1, description="Evaluations without improvement of evaluation.metric before "
                          "stopping")
    min_delta: float = Field(0.0, ge=0)


class GenerationSpec(Model):
    """causal-lm: generate an answer for each test prompt and score it against the reference (exact match, BLEU,
    ROUGE-L)."""

    max_new_tokens: int = Field(64, ge=1, le=4096)
    max_samples: int = Field(100, ge=1, le=100000, description="Test records to generate for (the first ones)")


class EvaluationSpec(Model):
    every_steps: int | None = Field(None, ge=1, description="Evaluate on the validation split every N steps")
    early_stopping: EarlyStoppingSpec | None = None
    metric: EvalMetric = Field(EvalMetric.loss, description="What early stopping and output.select follow: loss "
                               "(lower is better), accuracy or f1 (macro; higher is better, classification only)")
    baseline: bool = Field(True, description="Also evaluate the test split on the base model (the model before "
                           "training), reported beside the fine-tuned one")
    generation: GenerationSpec | None = Field(None, description="causal-lm: score generated test answers; off "
                                              "when unset")


DEFAULT_CHECKPOINT_MINUTES = 30.0
FSDP_FP16 = ("hyperparameters.precision fp16 does not work with strategy fsdp (gradients would need a sharded "
             "scaler): use bf16 or auto (bf16 where the GPU has it, else fp32), or strategy ddp")


class CheckpointSpec(Model):
    every_steps: int | None = Field(None, ge=1)
    every_minutes: float | None = Field(
        DEFAULT_CHECKPOINT_MINUTES, gt=0,
        description="Checkpoint at least this often (on by default, so a preempted run never restarts from step 0)")
    keep: int = Field(2, ge=1, description="Checkpoints kept in object storage")
    uri: str | None = Field(None, description="Defaults to <output.uri>checkpoints/")


class OutputDtype(StrEnum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class OutputSpec(Model):
    uri: str = Field(description="s3:// prefix (or local path) where the adapter and manifest.json are published")
    overwrite: bool = Field(
        False, description="Publish even if the prefix holds another run's output: the old files are moved aside "
        "to <uri>.replaced-<time>/ first, never deleted")
    select: Select = Field(Select.last, description="Which model to publish: the last step's, or the best one on "
                           "the validation split by evaluation.metric (needs dataset.validation and "
                           "evaluation.everySteps)")
    merged: bool = Field(False, description="lora and qlora: also publish the base model with the adapter folded "
                         "in (safetensors, config, tokenizer) under <uri>merged/, for servers that load whole models")
    dtype: OutputDtype | None = Field(None, description="The merged model's weights: bf16, fp16 or fp32; the base "
                                      "model's dtype (its config.json) when unset")
    license: str | None = Field(None, max_length=64, pattern=r"^[a-z0-9][a-z0-9.+-]*$",
                                description="The published model's license, as the model card (README.md) names it: "
                                "a Hugging Face Hub license id such as apache-2.0, mit, llama3.1 or other; the base "
                                "model's terms still apply")


class SecretRef(Model):
    name: _checked("storage.secretRef.name", 253)


class StorageEndpoint(Model):
    """Where the object storage is: what the trainer's config holds of StorageSpec (the operator turns the
    credentials' Secret and ServiceAccount into the pods' env vars and service account)."""

    endpoint: str | None = None
    region: str = "us-east-1"
    addressing_style: Literal["auto", "path", "virtual"] = "auto"


class StorageSpec(StorageEndpoint):
    endpoint: _checked("storage.endpoint") | None = Field(
        None, description="S3-compatible endpoint URL (MinIO, Ceph, R2); AWS when unset")
    secret_ref: SecretRef | None = Field(
        None, description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optional AWS_SESSION_TOKEN)"
    )
    service_account_name: _checked("storage.serviceAccountName", 253) | None = Field(
        None, description="Workload identity (IRSA and the like) instead of a secret")


class MlflowSecretRef(Model):
    name: _checked("tracking.mlflow.secretRef.name", 253)


MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


class MlflowSpec(Model):
    """An MLflow tracking server that rank 0 logs the run to: parameters, metric history, model card and plots.
    The server being down or slow never fails or slows the training (docs/run-record.md)."""

    uri: _checked("tracking.mlflow.uri") = Field(
        description="The tracking server's URL (http:// or https://), such as http://mlflow.mlflow:5000")
    experiment: str = Field("kubetune", min_length=1, max_length=256,
                            description="The experiment the run is logged in; created when missing")
    secret_ref: MlflowSecretRef | None = Field(
        None, description="Secret with the server's credentials, as MLflow's client reads them: "
        "MLFLOW_TRACKING_TOKEN (a bearer token), or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (basic "
        "auth); each key optional. Its author must be allowed to read it (get secrets)")


class TrackingSpec(Model):
    mlflow: MlflowSpec | None = Field(None, description="Log the run to an MLflow tracking server")


class Toleration(Model):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")
    key: str | None = Field(None, max_length=317)
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Equal when unset")
    value: str | None = Field(None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Every effect when unset")
    toleration_seconds: int | None = None

    @model_validator(mode="after")
    def _exists_without_value(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError(TOLERATION_EXISTS_VALUE)
        return self


class ResourcesSpec(Model):
    workers: int = Field(1, ge=1, le=512)
    gpus_per_worker: int = Field(1, ge=0, le=16)
    gpu_resource_name: _checked("resources.gpuResourceName", 317) = "nvidia.com/gpu"
    cpu: _checked("resources.cpu", 64) | None = None
    memory: _checked("resources.memory", 64) | None = None
    node_selector: dict[_matching(QUALIFIED_NAME, NODE_SELECTOR_KEYS, 317),
                        _matching(LABEL_VALUE, NODE_SELECTOR_VALUES, 63)] | None = Field(None, max_length=MAX_LIST)
    tolerations: list[Toleration] | None = Field(None, max_length=MAX_LIST)
    affinity: dict[str, Any] | None = None


class RunPolicy(Model):
    backoff_limit: int = Field(3, ge=0, description="New attempts after the trainer failed (status.attempts."
                               "failures); preemptions and the infrastructure's incidents have budgets of their own")
    max_preemptions: int | None = Field(None, ge=0, description="New attempts after preemptions (status.attempts."
                                        "preemptions); unset: unlimited")
    max_infrastructure_retries: int = Field(
        5, ge=0, description="New attempts after the infrastructure failed (status.attempts.infrastructure: a node "
        "lost, an image pull failing, storage unreachable)")
    active_deadline_seconds: int | None = Field(None, ge=1)
    ttl_seconds_after_finished: int | None = Field(None, ge=0)
    suspend: bool = False
    hang_timeout_seconds: int | None = Field(None, ge=30, description="Restart workers after this long without a step")
    termination_grace_period_seconds: int = Field(
        300, ge=1, le=86400, description="How long a stopped worker has (SIGTERM: eviction, preemption, suspend) "
        "to write its checkpoint before it is killed; size it for the checkpoint upload (a full fine-tune writes "
        "the whole model and optimizer state)")


class SchedulingSpec(Model):
    priority_class_name: _checked("scheduling.priorityClassName", 253) | None = None
    queue_name: _checked("scheduling.queueName", 63) | None = Field(
        None, description="Kueue LocalQueue; set as the kueue.x-k8s.io/queue-name label")


class ValidationSpec(Model):
    """The CPU validation Job (`kubetune validate`) of this FineTuneJob; unset fields take the operator's defaults."""

    active_deadline_seconds: int | None = Field(
        None, ge=60, description="How long validation may run before it fails; the operator's default when unset")
    cpu: _checked("validation.cpu", 64) | None = Field(
        None, description="CPU request of the validation pod; the operator's default when unset")
    memory: _checked("validation.memory", 64) | None = Field(
        None, description="Memory request and limit of the validation pod; the operator's default when unset")
    ephemeral_storage: _checked("validation.ephemeralStorage", 64) | None = Field(
        None, description="Ephemeral storage of the validation pod, also the sizeLimit of its scratch emptyDir "
        "(where the dataset is downloaded); the operator's default when unset")


class FineTuneJobSpec(Model):
    task: TaskType = Field(TaskType.causal_lm, description="What the model learns: causal-lm (text generation), "
                           "sequence-classification or image-classification")
    objective: Objective = Field(Objective.sft, description="sft (supervised), or preference tuning on (prompt, "
                                 "chosen, rejected) pairs: dpo or orpo (task causal-lm)")
    objective_params: ObjectiveParams = Field(default_factory=ObjectiveParams, description="Settings of dpo and orpo")
    base_model: BaseModelSpec
    dataset: DatasetSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    output: OutputSpec
    storage: StorageSpec = Field(default_factory=StorageSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec,
                                   description="Experiment trackers the run also logs to (rank 0)")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    image: _checked("image", 512) | None = Field(None, description="Trainer image; the operator's default when unset")
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    validation: ValidationSpec = Field(
        default_factory=ValidationSpec,
        description="The CPU validation Job that checks the data and config before training; the operator's "
        "defaults for unset fields")

    def pvc_claims(self) -> list[str]:
        """The PersistentVolumeClaims its pvc://claim/path URIs name (the operator mounts each at /mnt/pvc/<claim>)."""
        uris = [self.base_model.uri, self.dataset.train, self.dataset.validation, self.dataset.test,
                self.output.uri, self.checkpoint.uri, self.dataset.cache_uri]
        return sorted({u.removeprefix("pvc://").split("/")[0] for u in uris if u and u.startswith("pvc://")})

    @model_validator(mode="after")
    def _qlora_needs_gpus(self) -> FineTuneJobSpec:
        if self.method.type == MethodType.qlora and self.resources.gpus_per_worker < 1:
            raise ValueError("method.type qlora needs GPUs: set resources.gpusPerWorker to 1 or more, or use lora")
        if self.method.type == MethodType.qlora and self.hyperparameters.strategy == Strategy.fsdp:
            raise ValueError(QLORA_FSDP)
        if self.hyperparameters.precision == Precision.fp16 and self.hyperparameters.strategy == Strategy.fsdp:
            raise ValueError(FSDP_FP16)
        task_problem(self)
        return self


METRIC_NEEDS_CLASSIFICATION = ("evaluation.metric accuracy and f1 apply to classification tasks: use loss with "
                               "task causal-lm")
GENERATION_NEEDS_CAUSAL_LM = "evaluation.generation applies to task causal-lm only"
SELECT_BEST_NEEDS_VALIDATION = ("output.select best needs validation results: set dataset.validation and "
                                "evaluation.everySteps")
TRAIN_ON_VALIDATION_ALONE = ("dataset.trainOnValidation trains on the validation split, leaving none to evaluate "
                             "on while training: set dataset.validation, and leave evaluation.everySteps, "
                             "evaluation.earlyStopping and output.select best unset")
LABELS_NEED_CLASSIFICATION = "dataset.labels applies to classification tasks only"
OBJECTIVE_NEEDS_CAUSAL_LM = "objective dpo and orpo apply to task causal-lm: use objective sft for classification"
PREFERENCE_FORMAT_NEEDS_OBJECTIVE = ("dataset.format preference and openai-preference hold (chosen, rejected) pairs: "
                                     "set objective dpo or orpo, or use a supervised format")
OBJECTIVE_NEEDS_PREFERENCE_FORMAT = ("objective dpo and orpo train on (prompt, chosen, rejected) pairs: set "
                                     "dataset.format to auto, preference or openai-preference")
DPO_PARAMS_NEED_DPO = "objectiveParams.loss and objectiveParams.referenceFree apply to objective dpo only"
MERGED_NEEDS_ADAPTER = ("output.merged applies to method.type lora and qlora: a full fine-tune publishes a whole "
                        "model already")
DTYPE_NEEDS_MERGED = "output.dtype is the merged model's dtype: set output.merged true, or leave dtype unset"


def mappable_fields(task: TaskType, fmt: DataFormat = DataFormat.auto) -> tuple[str, ...]:
    """The fields dataset.fields may map: the format's, or with format auto those of every format of the task (a
    classification record's input is text for one task, an image for the other)."""
    formats = TASK_FORMATS[task] if fmt == DataFormat.auto else (fmt,)
    other = {TaskType.sequence_classification: {"image"}, TaskType.image_classification: {"text", "text_pair"}}
    return tuple(dict.fromkeys(f for each in formats for f in FORMAT_FIELDS.get(each, ())
                               if f not in other.get(task, ())))


def fields_problem(task: TaskType, fmt: DataFormat = DataFormat.auto) -> str:
    """The message for a dataset.fields key that is not a field of the format (the same in the CRD's CEL rule)."""
    of = f"format {fmt.value} of task {task.value}" if fmt != DataFormat.auto else f"the formats of task {task.value}"
    fields = mappable_fields(task, fmt)
    if not fields:
        return f"dataset.fields does not apply to {of}: its records have no fields to map"
    return f"dataset.fields keys must be fields of {of}: {', '.join(fields)}"


def format_problem(task: TaskType) -> str:
    formats = ", ".join(f.value for f in TASK_FORMATS[task])
    return f"dataset.format does not fit task {task.value}: use one of {formats}"


def task_problem(spec: FineTuneJobSpec) -> None:
    """Raise ValueError when the objective, dataset, evaluation or output settings do not fit the task, or each
    other (the CRD's CEL rules say the same)."""
    task, dataset, evaluation, output = spec.task, spec.dataset, spec.evaluation, spec.output
    if dataset.format not in TASK_FORMATS[task]:
        raise ValueError(format_problem(task))
    classification = task in CLASSIFICATION_TASKS
    if evaluation.metric != EvalMetric.loss and not classification:
        raise ValueError(METRIC_NEEDS_CLASSIFICATION)
    if evaluation.generation is not None and task != TaskType.causal_lm:
        raise ValueError(GENERATION_NEEDS_CAUSAL_LM)
    if dataset.labels is not None and not classification:
        raise ValueError(LABELS_NEED_CLASSIFICATION)
    if dataset.fields and not set(dataset.fields) <= set(mappable_fields(task, dataset.format)):
        raise ValueError(fields_problem(task, dataset.format))
    if output.select == Select.best and (dataset.validation is None or evaluation.every_steps is None):
        raise ValueError(SELECT_BEST_NEEDS_VALIDATION)
    if dataset.train_on_validation and (dataset.validation is None or evaluation.every_steps is not None
                                        or evaluation.early_stopping is not None or output.select == Select.best):
        raise ValueError(TRAIN_ON_VALIDATION_ALONE)
    preference = spec.objective in PREFERENCE_OBJECTIVES
    if preference and task != TaskType.causal_lm:
        raise ValueError(OBJECTIVE_NEEDS_CAUSAL_LM)
    if dataset.format in PREFERENCE_FORMATS and not preference:
        raise ValueError(PREFERENCE_FORMAT_NEEDS_OBJECTIVE)
    if preference and dataset.format not in (DataFormat.auto, *PREFERENCE_FORMATS):
        raise ValueError(OBJECTIVE_NEEDS_PREFERENCE_FORMAT)
    params = spec.objective_params
    if spec.objective != Objective.dpo and (params.loss != DpoLoss.sigmoid or params.reference_free):
        raise ValueError(DPO_PARAMS_NEED_DPO)
    if output.merged and spec.method.type == MethodType.full:
        raise ValueError(MERGED_NEEDS_ADAPTER)
    if output.dtype is not None and not output.merged:
        raise ValueError(DTYPE_NEEDS_MERGED)


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
