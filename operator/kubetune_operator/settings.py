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

from .policy import Scheduling, repository
from .policy import Settings as PolicySettings

RENDEZVOUS_PORT = 29500  # KUBETUNE_RENDEZVOUS_PORT: the workers' rendezvous (torch's default)
VALIDATION_DEFAULTS = {  # spec.validation field -> the default of the operator's setting
    "cpu": "500m",  # KUBETUNE_VALIDATION_CPU, the chart's validation.cpu
    "memory": "1Gi",  # KUBETUNE_VALIDATION_MEMORY
    "ephemeral_storage": "10Gi",  # KUBETUNE_VALIDATION_EPHEMERAL_STORAGE
    "active_deadline_seconds": 3600,  # KUBETUNE_VALIDATION_DEADLINE_SECONDS
}
VALIDATION_MAX_ATTEMPTS = 5  # KUBETUNE_VALIDATION_MAX_ATTEMPTS: validation Jobs per FineTuneJob, then Failed
RESYNC_SECONDS = 60.0  # KUBETUNE_RESYNC_SECONDS: the loop's safety-net resync
SCRAPE_SECONDS = 10.0  # KUBETUNE_SCRAPE_SECONDS: how often rank 0's /metrics is scraped
LEASE_NAME = "kubetune-operator"  # KUBETUNE_LEASE_NAME: leader election's Lease (the chart: the release's name)
# KUBETUNE_LEASE_{DURATION,RENEW_DEADLINE,RETRY_PERIOD}_SECONDS, client-go's defaults (leader.Timing)
LEASE_DURATION_SECONDS, LEASE_RENEW_DEADLINE_SECONDS, LEASE_RETRY_PERIOD_SECONDS = 15.0, 10.0, 2.0
TRAINER_METRICS_PORT = MetricsSpec.model_fields["port"].default  # the trainer's own default (9400)
# Prometheus as kube-prometheus-stack deploys it (the chart's PodMonitor is for it): the Prometheus Operator labels
# its pods app.kubernetes.io/name=prometheus; the namespace is by name (a label only the API server sets), so no
# tenant can label their own pods into the peer
PROMETHEUS_NAMESPACES = (("kubernetes.io/metadata.name", "monitoring"),)
PROMETHEUS_PODS = (("app.kubernetes.io/name", "prometheus"),)


@dataclass(frozen=True)
class OperatorSettings:
    """The defaults are those of an operator started with none of the variables set."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE  # KUBETUNE_TRAINER_IMAGE: for jobs without spec.image
    rendezvous_port: int = RENDEZVOUS_PORT  # KUBETUNE_RENDEZVOUS_PORT (see children.service)
    trainer_metrics_port: int = TRAINER_METRICS_PORT  # KUBETUNE_TRAINER_METRICS_PORT: rank 0's /metrics
    # KUBETUNE_TRAINER_METRICS_LINGER_SECONDS: the training pods' KUBETUNE_METRICS_LINGER_SECONDS, how long rank 0
    # waits after the run for a scrape of its final values; None (unset or empty): the image's own (30 s). The
    # chart sets 0 when its PodMonitor is off: nothing would scrape, and each job's result would wait for nothing.
    trainer_metrics_linger_seconds: float | None = None
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
    # KUBETUNE_VALIDATION_MAX_ATTEMPTS: validation Jobs that fail transiently (exit 75, a crash, an OOM kill, the
    # deadline) before the FineTuneJob fails ValidationFailed; counted in status.validationAttempts
    validation_max_attempts: int = VALIDATION_MAX_ATTEMPTS
    resync_seconds: float = RESYNC_SECONDS  # KUBETUNE_RESYNC_SECONDS
    scrape_seconds: float = SCRAPE_SECONDS  # KUBETUNE_SCRAPE_SECONDS
    metrics_port: int = 8080  # KUBETUNE_METRICS_PORT (0: off)
    health_port: int = 8081  # KUBETUNE_HEALTH_PORT
    ready_port: int = 8082  # KUBETUNE_READY_PORT (0: off)
    # KUBETUNE_POLICY_* and KUBETUNE_STORAGE_{SECRET_NAME,ENDPOINT} (policy.py); None: the defaults, the image
    # prefixes being the trainer image's repository
    policy: PolicySettings = None  # type: ignore[assignment]
    # Leader election (leader.py): the Lease KUBETUNE_LEASE_NAME in KUBETUNE_LEASE_NAMESPACE (the chart: the
    # operator's own namespace, from the downward API); KUBETUNE_LEASE_{DURATION,RENEW_DEADLINE,RETRY_PERIOD}_SECONDS
    lease_name: str = LEASE_NAME
    lease_namespace: str = "default"
    lease_duration_seconds: float = LEASE_DURATION_SECONDS
    lease_renew_deadline_seconds: float = LEASE_RENEW_DEADLINE_SECONDS
    lease_retry_period_seconds: float = LEASE_RETRY_PERIOD_SECONDS
    # KUBETUNE_NETWORK_*: the NetworkPolicy of each job (children.network_policy; the chart's networkPolicy.*)
    network_policy: bool = True  # KUBETUNE_NETWORK_POLICY ("false": none is created)
    # KUBETUNE_NETWORK_OPERATOR_NAMESPACE and _POD_LABELS: where the operator's pods run and their labels, the
    # peers that may scrape /metrics ("": no operator peer, as for an operator that runs outside the cluster)
    network_operator_namespace: str = ""
    network_operator_pods: tuple[tuple[str, str], ...] = ()
    # KUBETUNE_NETWORK_PROMETHEUS_NAMESPACE_SELECTOR and _POD_SELECTOR: Prometheus, the other peer of /metrics
    network_prometheus_namespaces: tuple[tuple[str, str], ...] = PROMETHEUS_NAMESPACES
    network_prometheus_pods: tuple[tuple[str, str], ...] = PROMETHEUS_PODS

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
            trainer_metrics_linger_seconds=_seconds(env("KUBETUNE_TRAINER_METRICS_LINGER_SECONDS"),
                                                    "KUBETUNE_TRAINER_METRICS_LINGER_SECONDS"),
            gpu_tflops=float(env("KUBETUNE_ESTIMATE_GPU_TFLOPS") or DEFAULT_GPU_TFLOPS),
            storage_endpoint=endpoint,
            storage_region=env("KUBETUNE_STORAGE_REGION") or "",
            storage_secret_name=secret,
            validation_cpu=env("KUBETUNE_VALIDATION_CPU") or defaults["cpu"],
            validation_memory=env("KUBETUNE_VALIDATION_MEMORY") or defaults["memory"],
            validation_ephemeral_storage=env("KUBETUNE_VALIDATION_EPHEMERAL_STORAGE") or defaults["ephemeral_storage"],
            validation_deadline_seconds=int(env("KUBETUNE_VALIDATION_DEADLINE_SECONDS")
                                            or defaults["active_deadline_seconds"]),
            validation_max_attempts=max(1, int(env("KUBETUNE_VALIDATION_MAX_ATTEMPTS") or VALIDATION_MAX_ATTEMPTS)),
            resync_seconds=float(env("KUBETUNE_RESYNC_SECONDS", str(RESYNC_SECONDS))),
            scrape_seconds=float(env("KUBETUNE_SCRAPE_SECONDS", str(SCRAPE_SECONDS))),
            metrics_port=int(env("KUBETUNE_METRICS_PORT", "8080")),
            health_port=int(env("KUBETUNE_HEALTH_PORT", "8081")),
            ready_port=int(env("KUBETUNE_READY_PORT", "8082")),
            **network_settings(env),
            policy=PolicySettings(
                image_prefixes=names("KUBETUNE_POLICY_IMAGE_PREFIXES") or (repository(image),),
                credentials_secret=secret,
                credentials_namespaces=names("KUBETUNE_POLICY_CREDENTIALS_NAMESPACES"),
                allow_trust_remote_code=env("KUBETUNE_POLICY_ALLOW_TRUST_REMOTE_CODE") == "true",
                storage_prefixes=names("KUBETUNE_POLICY_STORAGE_PREFIXES"),
                storage_endpoint=endpoint,
                storage_endpoints=names("KUBETUNE_POLICY_STORAGE_ENDPOINTS"),
                binding=env("KUBETUNE_POLICY_BINDING") or "",
                scheduling=_scheduling(env)),
            lease_name=env("KUBETUNE_LEASE_NAME") or LEASE_NAME,
            lease_namespace=env("KUBETUNE_LEASE_NAMESPACE") or "default",
            lease_duration_seconds=float(env("KUBETUNE_LEASE_DURATION_SECONDS") or LEASE_DURATION_SECONDS),
            lease_renew_deadline_seconds=float(env("KUBETUNE_LEASE_RENEW_DEADLINE_SECONDS")
                                               or LEASE_RENEW_DEADLINE_SECONDS),
            lease_retry_period_seconds=float(env("KUBETUNE_LEASE_RETRY_PERIOD_SECONDS") or LEASE_RETRY_PERIOD_SECONDS),
        )


def _seconds(value: str | None, var: str) -> float | None:
    """A duration that may be left to someone else's default: unset or empty, None; else seconds >= 0 (an error
    naming the variable otherwise)."""
    if not (value or "").strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # NaN too
        raise ValueError(f"{var}: {value!r} is not a number of seconds >= 0")
    return seconds


def _scheduling(env) -> Scheduling:
    """KUBETUNE_POLICY_{NODE_SELECTORS,TOLERATIONS,GPU_RESOURCE_NAMES,MAX_GRACE_SECONDS,REQUIRE_QUEUE} (the
    chart's policy.allowedNodeSelectors, ...): comma-separated lists; unset, the defaults. GPU resource names set
    but empty: none."""
    def names(var: str) -> tuple[str, ...]:
        return tuple(n.strip() for n in (env(var) or "").split(",") if n.strip())

    default = Scheduling()
    gpus = env("KUBETUNE_POLICY_GPU_RESOURCE_NAMES")
    return Scheduling(node_selectors=names("KUBETUNE_POLICY_NODE_SELECTORS"),
                      tolerations=names("KUBETUNE_POLICY_TOLERATIONS"),
                      gpu_resource_names=default.gpu_resource_names if gpus is None
                      else names("KUBETUNE_POLICY_GPU_RESOURCE_NAMES"),
                      max_grace_seconds=int(env("KUBETUNE_POLICY_MAX_GRACE_SECONDS") or default.max_grace_seconds),
                      require_queue=env("KUBETUNE_POLICY_REQUIRE_QUEUE") == "true")


def labels_setting(value: str, var: str) -> tuple[tuple[str, str], ...]:
    """`k=v,k2=v2` (a label selector's matchLabels, as `kubectl label` takes them) as pairs; a pair without `=`
    is an error naming the variable."""
    pairs = []
    for item in (i.strip() for i in value.split(",") if i.strip()):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{var}: {item!r} is not key=value; write labels as k=v,k2=v2")
        pairs.append((key.strip(), val.strip()))
    return tuple(pairs)


def network_settings(env) -> dict:
    """KUBETUNE_NETWORK_{POLICY,OPERATOR_NAMESPACE,OPERATOR_POD_LABELS,PROMETHEUS_NAMESPACE_SELECTOR,
    PROMETHEUS_POD_SELECTOR} (the chart's networkPolicy.*). The Prometheus selectors, unset: the defaults; set but
    empty: no Prometheus peer (with both empty)."""
    def selector(var: str, default: tuple) -> tuple:
        value = env(var)
        return default if value is None else labels_setting(value, var)

    return {"network_policy": (env("KUBETUNE_NETWORK_POLICY") or "true").strip().lower() != "false",
            "network_operator_namespace": (env("KUBETUNE_NETWORK_OPERATOR_NAMESPACE") or "").strip(),
            "network_operator_pods": labels_setting(env("KUBETUNE_NETWORK_OPERATOR_POD_LABELS") or "",
                                                    "KUBETUNE_NETWORK_OPERATOR_POD_LABELS"),
            "network_prometheus_namespaces": selector("KUBETUNE_NETWORK_PROMETHEUS_NAMESPACE_SELECTOR",
                                                      PROMETHEUS_NAMESPACES),
            "network_prometheus_pods": selector("KUBETUNE_NETWORK_PROMETHEUS_POD_SELECTOR", PROMETHEUS_PODS)}
