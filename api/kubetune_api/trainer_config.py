"""The trainer config file: the FineTuneJob spec plus the cluster-side fields, one versioned YAML/JSON document
read by every trainer process.

    apiVersion: kubetune.io/v1alpha1
    kind: TrainerConfig
    jobName: support-bot
    runId: 3f1c...               # the FineTuneJob's uid
    baseModel: {uri: s3://models/tiny/}
    dataset: {train: s3://data/train.jsonl, format: auto}
    ...                          # the rest of the FineTuneJob spec (finetunejob.py) less OPERATOR_ONLY
    metrics: {port: 9400}
    hardware: {processes: 2, gpus: 2, gpuTflops: 400.0}
    workDir: /tmp/kubetune

The operator writes it into a ConfigMap, `TrainerConfig(**dict(spec), job_name=..., ...)`; `kubetune run` does
the same locally. Credentials never appear here: the spec's storage is narrowed to its StorageEndpoint (boto3
reads the credentials from the environment).
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import Field, field_validator

from .finetunejob import FineTuneJobSpec, Model, StorageEndpoint, StorageSpec

CONFIG_VERSION = "kubetune.io/v1alpha1"
# An H100 SXM sustains about 400 of its 989 dense bf16 TFLOPS in LoRA fine-tuning (40% model FLOPs
# utilization); the chart's estimate.gpuTflops sets the figure of the cluster's GPUs.
DEFAULT_GPU_TFLOPS = 400.0
WORK_DIR = "/tmp/kubetune"  # model, data and checkpoints; the operator mounts an emptyDir here
_HEAD = ("apiVersion", "kind", "jobName", "runId")  # first in the file, for whoever reads it
# The spec's sections only the operator reads: not in the file, so that it keeps the shape every trainer reads.
OPERATOR_ONLY = {"image", "resources", "run_policy", "scheduling", "validation"}


# The User-Agent of the operator's scrapes of rank 0's /metrics (its progress): the trainer's linger after the run
# waits for a scrape by anyone else (Prometheus), which the operator's, every few seconds, would otherwise end.
OPERATOR_SCRAPER = "kubetune-operator"
# How long rank 0 keeps serving its final values after the run for such a scrape (seconds; unset: 0, the trainer
# image sets 30). The operator sets it in the training pods when it knows better (0: nothing else scrapes them).
METRICS_LINGER_ENV = "KUBETUNE_METRICS_LINGER_SECONDS"


class MetricsSpec(Model):
    enabled: bool = True
    port: int = Field(9400, ge=0, le=65535, description="Prometheus endpoint on rank 0; 0 picks a free port")


class Hardware(Model):
    """What the run trains on, for the data report's cost estimate (data/report.py). The operator fills it from
    spec.resources and the chart's estimate.gpuTflops; `kubetune run` leaves the defaults."""

    processes: int = Field(1, ge=1, description="Training processes: workers x gpusPerWorker (workers on CPU)")
    gpus: int = Field(0, ge=0, description="GPUs over all workers")
    gpu_tflops: float = Field(DEFAULT_GPU_TFLOPS, gt=0, description="Sustained dense bf16 TFLOPS per GPU")


class TrainerConfig(FineTuneJobSpec):
    """The spec (its rules included) and what the cluster adds: the job's name, the run, the metrics endpoint,
    the hardware and the work directory. The file leaves out the OPERATOR_ONLY sections: a trainer that reads it
    has their defaults (`hardware` says what the run trains on)."""

    api_version: Literal["kubetune.io/v1alpha1"] = CONFIG_VERSION
    kind: Literal["TrainerConfig"] = "TrainerConfig"
    job_name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    run_id: str | None = Field(None, max_length=128, description="Which run this is: the FineTuneJob's uid (the "
                               "operator sets it); `kubetune run`: a hash of the manifest")
    storage: StorageEndpoint = Field(default_factory=StorageEndpoint)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    hardware: Hardware = Field(default_factory=Hardware)
    work_dir: str = WORK_DIR
    storage_prefixes: list[str] | None = Field(
        None, max_length=64, description="Where the job's data may be: the platform's policy.allowedStoragePrefixes "
        "for the job's namespace (the operator fills them in; the spec's own URIs were checked at admission). An "
        "s3:// image reference in a data file must be under one (uri_allowed); unset: anywhere")

    @field_validator("storage", mode="before")
    @classmethod
    def _without_credentials(cls, storage: Any) -> Any:
        """The spec's StorageSpec less its Secret and ServiceAccount: those become the pods' env and identity."""
        if isinstance(storage, StorageSpec):
            return StorageEndpoint(**storage.model_dump(include=set(StorageEndpoint.model_fields)))
        return storage

    @property
    def checkpoint_uri(self) -> str:
        return self.checkpoint.uri or join_uri(self.output.uri, "checkpoints/")

    @property
    def cache_uri(self) -> str:
        return self.dataset.cache_uri or join_uri(self.checkpoint_uri, "data-cache/")

    def dump(self) -> dict[str, Any]:
        """The file's content: camelCase, unset optional fields, empty sections (`tracking: {}`: a trainer that
        predates the section reads the file too) and the OPERATOR_ONLY sections left out."""
        doc = self.model_dump(by_alias=True, exclude_none=True, exclude=OPERATOR_ONLY, mode="json")
        return {key: value for key, value in doc.items() if value != {}}

    def to_yaml(self) -> str:
        doc = self.dump()
        return yaml.safe_dump({**{k: doc.pop(k) for k in _HEAD if k in doc}, **doc}, sort_keys=False)


def uri_allowed(uri: str, prefixes: list[str] | tuple[str, ...] | None) -> bool:
    """Under one of `prefixes` (none: any URI), with no `.` or `..` segment (S3 keeps such keys as they are, but
    a path or a proxy may resolve them). The operator's policy and the trainer's image references share it."""
    return not prefixes or (not {".", ".."} & set(uri.split("/")) and any(uri.startswith(p) for p in prefixes))


def join_uri(prefix: str, name: str) -> str:
    return prefix.rstrip("/") + "/" + name.lstrip("/")
