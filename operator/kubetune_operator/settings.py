"""The operator's configuration: every KUBETUNE_* environment variable it reads, read once, in `__main__`
(OperatorSettings.from_env()), and passed down to the handlers (kopf's memo), the loop, the scraper and
`reconcile.decide`. Nothing else in the operator reads the environment, so `decide` is a function of its
arguments alone. The defaults of what the variables set are here too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from kubetune_api import DEFAULT_GPU_TFLOPS, DEFAULT_TRAINER_IMAGE, MetricsSpec

from .policy import Settings as PolicySettings
from .policy import repository

RENDEZVOUS_PORT = 29500  # KUBETUNE_RENDEZVOUS_PORT: the workers' rendezvous (torch's default)
VALIDATION_DEFAULTS = {  # spec.validation field -> the default of the operator's setting
    "cpu": "500m",  # KUBETUNE_VALIDATION_CPU, the chart's validation.cpu
    "memory": "1Gi",  # KUBETUNE_VALIDATION_MEMORY
    "ephemeral_storage": "10Gi",  # KUBETUNE_VALIDATION_EPHEMERAL_STORAGE
    "active_deadline_seconds": 3600,  # KUBETUNE_VALIDATION_DEADLINE_SECONDS
}
RESYNC_SECONDS = 60.0  # KUBETUNE_RESYNC_SECONDS: the loop's safety-net resync
SCRAPE_SECONDS = 10.0  # KUBETUNE_SCRAPE_SECONDS: how often rank 0's /metrics is scraped
TRAINER_METRICS_PORT = MetricsSpec.model_fields["port"].default  # the trainer's own default (9400)


@dataclass(frozen=True)
class OperatorSettings:
    """The defaults are those of an operator started with none of the variables set."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE  # KUBETUNE_TRAINER_IMAGE: for jobs without spec.image
    rendezvous_port: int = RENDEZVOUS_PORT  # KUBETUNE_RENDEZVOUS_PORT (see children.service)
    trainer_metrics_port: int = TRAINER_METRICS_PORT  # KUBETUNE_TRAINER_METRICS_PORT: rank 0's /metrics
    gpu_tflops: float = DEFAULT_GPU_TFLOPS  # KUBETUNE_ESTIMATE_GPU_TFLOPS: the data report's GPU-hours estimate
    # KUBETUNE_STORAGE_{ENDPOINT,REGION,SECRET_NAME}: the storage defaults ("" : none)
    storage_endpoint: str = ""
    storage_region: str = ""
    storage_secret_name: str = ""
    # KUBETUNE_VALIDATION_{CPU,MEMORY,EPHEMERAL_STORAGE,DEADLINE_SECONDS}: the validation Job's, unless the job's
    # spec.validation says otherwise
    validation_cpu: str = VALIDATION_DEFAULTS["cpu"]
    validation_memory: str = VALIDATION_DEFAULTS["memory"]
    validation_ephemeral_storage: str = VALIDATION_DEFAULTS["ephemeral_storage"]
    validation_deadline_seconds: int = VALIDATION_DEFAULTS["active_deadline_seconds"]
    resync_seconds: float = RESYNC_SECONDS  # KUBETUNE_RESYNC_SECONDS
    scrape_seconds: float = SCRAPE_SECONDS  # KUBETUNE_SCRAPE_SECONDS
    metrics_port: int = 8080  # KUBETUNE_METRICS_PORT (0: off)
    health_port: int = 8081  # KUBETUNE_HEALTH_PORT
    ready_port: int = 8082  # KUBETUNE_READY_PORT (0: off)
    # KUBETUNE_POLICY_* and KUBETUNE_STORAGE_{SECRET_NAME,ENDPOINT} (policy.py); None: the defaults, the image
    # prefixes being the trainer image's repository
    policy: PolicySettings = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.policy is None:
            object.__setattr__(self, "policy", PolicySettings(image_prefixes=(repository(self.trainer_image),),
                                                              credentials_secret=self.storage_secret_name,
                                                              storage_endpoint=self.storage_endpoint))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        """From the environment (os.environ unless `environ` is given); what is unset (or, for most, empty) keeps
        its default."""
        env = (os.environ if environ is None else environ).get

        def names(var: str) -> tuple[str, ...]:
            return tuple(n.strip() for n in (env(var) or "").split(",") if n.strip())

        image = env("KUBETUNE_TRAINER_IMAGE", DEFAULT_TRAINER_IMAGE)
        secret = env("KUBETUNE_STORAGE_SECRET_NAME") or ""
        endpoint = env("KUBETUNE_STORAGE_ENDPOINT") or ""
        defaults = VALIDATION_DEFAULTS
        return cls(
            trainer_image=image,
            rendezvous_port=int(env("KUBETUNE_RENDEZVOUS_PORT") or RENDEZVOUS_PORT),
            trainer_metrics_port=int(env("KUBETUNE_TRAINER_METRICS_PORT") or TRAINER_METRICS_PORT),
            gpu_tflops=float(env("KUBETUNE_ESTIMATE_GPU_TFLOPS") or DEFAULT_GPU_TFLOPS),
            storage_endpoint=endpoint,
            storage_region=env("KUBETUNE_STORAGE_REGION") or "",
            storage_secret_name=secret,
            validation_cpu=env("KUBETUNE_VALIDATION_CPU") or defaults["cpu"],
            validation_memory=env("KUBETUNE_VALIDATION_MEMORY") or defaults["memory"],
            validation_ephemeral_storage=env("KUBETUNE_VALIDATION_EPHEMERAL_STORAGE") or defaults["ephemeral_storage"],
            validation_deadline_seconds=int(env("KUBETUNE_VALIDATION_DEADLINE_SECONDS")
                                            or defaults["active_deadline_seconds"]),
            resync_seconds=float(env("KUBETUNE_RESYNC_SECONDS", str(RESYNC_SECONDS))),
            scrape_seconds=float(env("KUBETUNE_SCRAPE_SECONDS", str(SCRAPE_SECONDS))),
            metrics_port=int(env("KUBETUNE_METRICS_PORT", "8080")),
            health_port=int(env("KUBETUNE_HEALTH_PORT", "8081")),
            ready_port=int(env("KUBETUNE_READY_PORT", "8082")),
            policy=PolicySettings(
                image_prefixes=names("KUBETUNE_POLICY_IMAGE_PREFIXES") or (repository(image),),
                credentials_secret=secret,
                credentials_namespaces=names("KUBETUNE_POLICY_CREDENTIALS_NAMESPACES"),
                allow_trust_remote_code=env("KUBETUNE_POLICY_ALLOW_TRUST_REMOTE_CODE") == "true",
                storage_prefixes=names("KUBETUNE_POLICY_STORAGE_PREFIXES"),
                storage_endpoint=endpoint,
                storage_endpoints=names("KUBETUNE_POLICY_STORAGE_ENDPOINTS"),
                binding=env("KUBETUNE_POLICY_BINDING") or ""),
        )
