"""FineTuneJob spec -> the child objects the operator wants (plain dicts, as the API server takes them).

Pure functions: no API calls, no clock, no environment (the operator's settings, settings.OperatorSettings, come
in as an argument). Names are deterministic, so creating a child twice is a 409, never a duplicate. Every child
carries the FineTuneJob's labels and a controller ownerReference, so deleting the FineTuneJob garbage-collects
them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kubetune_api import (
    API_GROUP,
    API_VERSION,
    DEFAULT_GPU_TFLOPS,
    KIND,
    METRICS_LINGER_ENV,
    MLFLOW_SECRET_KEYS,
    PERMANENT_EXIT_CODES,
    WORK_DIR,
    FineTuneJobSpec,
    Hardware,
    MetricsSpec,
    TrainerConfig,
)

from . import policy
from .settings import VALIDATION_DEFAULTS, OperatorSettings

CONFIG_DIR = "/etc/kubetune"
CONFIG_FILE = "trainer.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
PVC_ROOT = "/mnt/pvc"
TMP_DIR = "/tmp"  # an emptyDir, and HOME: the root filesystem is read-only
TRAINER_CONTAINER = "trainer"
VALIDATE_CONTAINER = "validate"

LABEL_JOB = "kubetune.io/finetunejob"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_ATTEMPT = "kubetune.io/attempt"  # on the training Jobs and their pods: the attempt's number
MANAGED_BY = "kubetune-operator"
TRAINING_SUFFIX = "-train"  # the training Jobs' names: the FineTuneJob's, this and -<attempt>
JOB_FINALIZER = "kubetune.io/outcome"  # on the training Job: kept until its outcome is in the FineTuneJob's status

# The `restricted` Pod Security Standard, and a read-only root filesystem: what the trainer writes goes to the
# explicit emptyDir volumes of _volumes (/tmp, which is also HOME and so every library's cache, and the work dir).
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}
SECRET_KEYS = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True))



def with_storage_defaults(spec: dict, settings: OperatorSettings) -> dict:
    """The spec with the operator's storage defaults (KUBETUNE_STORAGE_*, the Helm chart's `storage.*`) filled in:
    endpoint and region for a job without `storage.endpoint`; the credentials Secret for a job with neither
    `secretRef` nor `serviceAccountName`, unless it sets an endpoint of its own (the platform's credentials go to
    the platform's endpoint only)."""
    storage = dict(spec.get("storage") or {})
    own = policy.own_endpoint(storage.get("endpoint"), settings.policy)
    if not storage.get("endpoint"):
        for key, value in (("endpoint", settings.storage_endpoint), ("region", settings.storage_region)):
            if value:
                storage[key] = value
    secret = settings.storage_secret_name
    if secret and not (storage.get("secretRef") or storage.get("serviceAccountName") or own):
        storage["secretRef"] = {"name": secret}
    return {**spec, "storage": storage}


@dataclass(frozen=True)
class Names:
    """Child names, all derived from the FineTuneJob's name (at most 50 characters, see the CRD)."""

    job: str

    @property
    def config_map(self) -> str:
        return f"{self.job}-config"

    @property
    def validation(self) -> str:
        return f"{self.job}-validate"

    @property
    def service(self) -> str:
        return f"{self.job}-workers"

    def training(self, attempt: int) -> str:
        """The training Job of attempt `attempt` (1, 2, ...): each incident ends one, the next is a new Job."""
        return f"{self.job}{TRAINING_SUFFIX}-{attempt}"

    @property
    def network_policy(self) -> str:
        return f"{self.job}-ingress"

    def worker_host(self, attempt: int, index: int) -> str:
        """DNS name of worker `index` of attempt `attempt`: an Indexed Job's pod <job>-<index>, under subdomain
        <service>."""
        return f"{self.training(attempt)}-{index}.{self.service}"


def finetunejob_of(training_job: str) -> str | None:
    """The FineTuneJob's name in the name of one of its training Jobs (`<name>-train-<attempt>`), if it is one."""
    name, _, attempt = training_job.rpartition("-")
    return name.removesuffix(TRAINING_SUFFIX) if attempt.isdigit() and name.endswith(TRAINING_SUFFIX) else None


def attempt_of(obj: dict) -> int | None:
    """The attempt a training Job or worker pod belongs to (its LABEL_ATTEMPT)."""
    value = ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_ATTEMPT, "")
    return int(value) if value.isdigit() else None


def labels(name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/instance": name,
            "app.kubernetes.io/managed-by": MANAGED_BY, LABEL_COMPONENT: component, LABEL_JOB: name}


def owner_reference(meta: dict) -> dict:
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": meta["name"],
            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}


def child_meta(meta: dict, name: str, component: str, extra_labels: dict | None = None) -> dict:
    return {"name": name, "namespace": meta.get("namespace"),
            "labels": {**labels(meta["name"], component), **(extra_labels or {})},
            "ownerReferences": [owner_reference(meta)]}


def hardware(spec: FineTuneJobSpec, gpu_tflops: float = DEFAULT_GPU_TFLOPS) -> Hardware:
    """What the run will train on, so that the CPU validation can say what the data costs in GPU-hours;
    `gpu_tflops` (KUBETUNE_ESTIMATE_GPU_TFLOPS, the chart's `estimate.gpuTflops`) is the sustained TFLOPS per GPU
    that the validation's data report divides the training FLOPs by."""
    res = spec.resources
    return Hardware(processes=world_size(spec), gpus=res.workers * res.gpus_per_worker, gpu_tflops=gpu_tflops)


def trainer_config(name: str, spec: FineTuneJobSpec, settings: OperatorSettings,
                   run_id: str | None = None, namespace: str | None = None) -> TrainerConfig:
    """The trainer's config: the spec and the cluster-side fields. `run_id` (the FineTuneJob's uid) tells this run's
    output and checkpoints from another run's. From the operator's settings: the GPU TFLOPS of the data report's
    estimate, the port of rank 0's /metrics, and (given the job's `namespace`) the storage prefixes its data files'
    image references must be under."""
    prefixes = policy.storage_prefixes(namespace, settings.policy) if namespace is not None else []
    return TrainerConfig(**dict(spec), job_name=name, run_id=run_id, hardware=hardware(spec, settings.gpu_tflops),
                         metrics=MetricsSpec(port=settings.trainer_metrics_port), storage_prefixes=prefixes or None)


def config_map(meta: dict, spec: FineTuneJobSpec, settings: OperatorSettings) -> dict:
    config = trainer_config(meta["name"], spec, settings, meta["uid"], meta.get("namespace") or "")
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": child_meta(meta, Names(meta["name"]).config_map, "config"),
            "data": {CONFIG_FILE: config.to_yaml()}}


def _storage_env(spec: FineTuneJobSpec, settings: OperatorSettings) -> list[dict]:
    """HOME, the PVC root and the Secret's keys: never the platform's default Secret for an endpoint of the job's
    own (policy.DEFAULT_CREDENTIALS_ENDPOINT refuses such a job; one admitted before that rule gets no keys)."""
    env = [{"name": "HOME", "value": "/tmp"}, {"name": "KUBETUNE_PVC_ROOT", "value": PVC_ROOT}]
    ref = spec.storage.secret_ref
    if ref and ref.name == settings.storage_secret_name and policy.own_endpoint(spec.storage.endpoint,
                                                                                 settings.policy):
        ref = None
    if ref:
        env += [{"name": key,
                 "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key, "optional": optional}}}
                for key, optional in SECRET_KEYS]
    return env


def _tracking_env(spec: FineTuneJobSpec) -> list[dict]:
    """With tracking.mlflow: the namespace (a tag of the MLflow run) and its Secret's keys, each optional, that
    MLflow's client reads. Every worker gets them (one pod template); rank 0 alone logs."""
    mlflow = spec.tracking.mlflow
    if not mlflow:
        return []
    env = [{"name": "KUBETUNE_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    if mlflow.secret_ref:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": mlflow.secret_ref.name, "key": key,
                                                              "optional": True}}}
                for key in MLFLOW_SECRET_KEYS]
    return env


def _volumes(meta: dict, spec: FineTuneJobSpec, shm: bool, settings: OperatorSettings) -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "config", "configMap": {"name": Names(meta["name"]).config_map}},
               {"name": "tmp", "emptyDir": {}},  # HOME: the Hugging Face, torch, Triton and XDG caches
               {"name": "work", "emptyDir": {}}]
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
              {"name": "tmp", "mountPath": TMP_DIR},
              {"name": "work", "mountPath": WORK_DIR}]  # model, data, checkpoints
    if shm:  # NCCL and dataloader workers use shared memory
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    for claim in spec.pvc_claims():
        volumes.append({"name": f"pvc-{claim}"[:63], "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": f"pvc-{claim}"[:63], "mountPath": f"{PVC_ROOT}/{claim}"})
    return volumes, mounts


def _pod_spec(meta: dict, spec: FineTuneJobSpec, container: dict, shm: bool, settings: OperatorSettings) -> dict:
    volumes, mounts = _volumes(meta, spec, shm, settings)
    sa = spec.storage.service_account_name
    pod = {"restartPolicy": "Never", "securityContext": POD_SECURITY,
           "automountServiceAccountToken": bool(sa), "enableServiceLinks": False,
           "containers": [{**container, "volumeMounts": mounts, "securityContext": CONTAINER_SECURITY,
                           "terminationMessagePolicy": "FallbackToLogsOnError"}],
           "volumes": volumes}
    if sa:
        pod["serviceAccountName"] = sa
    if spec.scheduling.priority_class_name:
        pod["priorityClassName"] = spec.scheduling.priority_class_name
    return pod


def _failure_policy(container: str, disruptions: str) -> dict:
    """Exit codes 65/73/78 (data invalid, output in use, config invalid) fail the Job at once with the reason
    PodFailurePolicy; a disruption (DisruptionTarget: eviction, preemption, drain) takes the action `disruptions`.
    Both Jobs have backoffLimit 0: any other pod failure fails the Job too. The validation Job ignores
    disruptions (its pod is replaced); a training Job fails on them too: the operator, not the Job controller,
    starts the next attempt, as a new Job (no back-off that grows with the failed pods)."""
    return {"rules": [
        {"action": "FailJob",
         "onExitCodes": {"containerName": container, "operator": "In", "values": list(PERMANENT_EXIT_CODES)}},
        {"action": disruptions, "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def validation_settings(spec: FineTuneJobSpec, settings: OperatorSettings) -> dict:
    """The validation Job's CPU, memory, scratch size and deadline: spec.validation, else the operator's
    settings (KUBETUNE_VALIDATION_*, the chart's `validation.*`, by default settings.VALIDATION_DEFAULTS)."""
    operator = {"cpu": settings.validation_cpu, "memory": settings.validation_memory,
                "ephemeral_storage": settings.validation_ephemeral_storage,
                "active_deadline_seconds": settings.validation_deadline_seconds}
    out = {key: getattr(spec.validation, key) or operator[key] or default
           for key, default in VALIDATION_DEFAULTS.items()}
    out["active_deadline_seconds"] = int(out["active_deadline_seconds"])
    return out


def cpus(quantity: str) -> int:
    """A CPU quantity ("500m", "2", "1.5") as whole CPUs, rounded up, at least 1."""
    try:
        value = float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    except ValueError:
        return 1
    return max(1, math.ceil(value)) if math.isfinite(value) else 1


def validation_job(meta: dict, spec: FineTuneJobSpec, settings: OperatorSettings) -> dict:
    """One CPU pod running `kubetune validate`: bad data fails here, before any GPU is requested. One pod per
    Job (backoffLimit 0): the operator retries transient failures itself, with a growing delay."""
    name, v = meta["name"], validation_settings(spec, settings)
    scratch = {"ephemeral-storage": v["ephemeral_storage"]}
    container = {"name": VALIDATE_CONTAINER, "image": spec.image or settings.trainer_image,
                 "command": ["kubetune", "validate", "--config", CONFIG_PATH],
                 # The validating and tokenizing pass runs one process per CPU the pod requests.
                 "env": [*_storage_env(spec, settings),
                         {"name": "KUBETUNE_DATA_WORKERS", "value": str(cpus(v["cpu"]))}],
                 "resources": {"requests": {"cpu": v["cpu"], "memory": v["memory"], **scratch},
                               "limits": {"memory": v["memory"], **scratch}}}
    pod = _pod_spec(meta, spec, container, shm=False, settings=settings)
    for volume in pod["volumes"]:
        if volume["name"] == "work":
            volume["emptyDir"] = {"sizeLimit": v["ephemeral_storage"]}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": child_meta(meta, Names(name).validation, "validation"),
            "spec": {"completions": 1, "backoffLimit": 0, "activeDeadlineSeconds": v["active_deadline_seconds"],
                     "podFailurePolicy": _failure_policy(VALIDATE_CONTAINER, "Ignore"),
                     "template": {"metadata": {"labels": labels(name, "validation")}, "spec": pod}}}


def service(meta: dict, spec: FineTuneJobSpec, settings: OperatorSettings) -> dict:
    """Headless Service: gives each worker pod a stable DNS name for the rendezvous (on the settings'
    rendezvous port: pods that share the host's network, as the process node agent's do in tests, need a port no
    other program there listens on)."""
    name = meta["name"]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": child_meta(meta, Names(name).service, "workers"),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {LABEL_JOB: name, LABEL_COMPONENT: "workers"},
                     "ports": [{"name": "rendezvous", "port": settings.rendezvous_port},
                               {"name": "metrics",
                                "port": settings.trainer_metrics_port}]}}


def world_size(spec: FineTuneJobSpec) -> int:
    return spec.resources.workers * max(spec.resources.gpus_per_worker, 1)


def accelerate_args(name: str, spec: FineTuneJobSpec, settings: OperatorSettings, attempt: int = 1) -> list[str]:
    """`accelerate launch` flags (the image's entrypoint), then the trainer command."""
    workers, gpus = spec.resources.workers, spec.resources.gpus_per_worker
    args = ["--num_machines", str(workers), "--num_processes", str(world_size(spec))]
    if workers > 1:
        args += ["--machine_rank", "$(JOB_COMPLETION_INDEX)", "--main_process_ip", Names(name).worker_host(attempt, 0),
                 "--main_process_port", str(settings.rendezvous_port)]
    if gpus == 0:
        args.append("--cpu")  # one process per worker; RANK/LOCAL_RANK env make it MULTI_CPU (gloo)
    elif world_size(spec) > 1:
        args.append("--multi_gpu")  # torchrun: one process per GPU
    return [*args, "-m", "kubetune_trainer", "train", "--config", CONFIG_PATH]


def _resources(spec: FineTuneJobSpec) -> dict:
    r = spec.resources
    requests = {k: v for k, v in (("cpu", r.cpu), ("memory", r.memory)) if v}
    limits = {"memory": r.memory} if r.memory else {}
    if r.gpus_per_worker:
        limits[r.gpu_resource_name] = str(r.gpus_per_worker)
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def training_job(meta: dict, spec: FineTuneJobSpec, settings: OperatorSettings, attempt: int = 1) -> dict:
    """The Indexed Job of attempt `attempt`: one pod per worker, rank = completion index, rank 0 is the rendezvous
    host. Any pod failure ends it (backoffLimit 0): the next attempt is a new Job (reconcile._next_attempt)."""
    name, names, res, run = meta["name"], Names(meta["name"]), spec.resources, spec.run_policy
    env = [
        {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "NODE_RANK", "value": "$(JOB_COMPLETION_INDEX)"},
        {"name": "MASTER_ADDR", "value": names.worker_host(attempt, 0)},
        {"name": "MASTER_PORT", "value": str(settings.rendezvous_port)},
        {"name": "WORLD_SIZE", "value": str(world_size(spec))},
        {"name": "KUBETUNE_JOB", "value": name},
        {"name": "KUBETUNE_TERMINATION_GRACE_SECONDS", "value": str(run.termination_grace_period_seconds)},
        *_storage_env(spec, settings),
        *_tracking_env(spec),
    ]
    if res.gpus_per_worker == 0 and res.workers > 1:  # torchrun sets these itself for GPU workers
        env += [{"name": "RANK", "value": "$(JOB_COMPLETION_INDEX)"}, {"name": "LOCAL_RANK", "value": "0"}]
    linger = settings.trainer_metrics_linger_seconds
    if linger is not None:  # else the image's own (30 s): rank 0 waits for Prometheus to read its final values
        env.append({"name": METRICS_LINGER_ENV, "value": f"{linger:g}"})
    if res.cpu:  # torch starts a thread per core of the node, not of the pod's share: its CPUs per process
        threads = max(1, cpus(res.cpu) // max(res.gpus_per_worker, 1))
        env.append({"name": "OMP_NUM_THREADS", "value": str(threads)})
    container = {"name": TRAINER_CONTAINER, "image": spec.image or settings.trainer_image,
                 "args": accelerate_args(name, spec, settings, attempt),
                 "env": env, "resources": _resources(spec),
                 "ports": [{"name": "rendezvous", "containerPort": settings.rendezvous_port},
                           {"name": "metrics", "containerPort": settings.trainer_metrics_port}]}
    pod = _pod_spec(meta, spec, container, shm=True, settings=settings)
    pod["subdomain"] = names.service
    # Time to write a checkpoint after SIGTERM. Read when the Job is created: a Job's pod template is immutable.
    pod["terminationGracePeriodSeconds"] = run.termination_grace_period_seconds
    for key, value in (("nodeSelector", res.node_selector), ("affinity", res.affinity),
                       ("tolerations", [t.dump() for t in res.tolerations or []] or None)):
        if value:
            pod[key] = value
    queue = spec.scheduling.queue_name
    attempt_label = {LABEL_ATTEMPT: str(attempt)}
    job_spec = {"completions": res.workers, "parallelism": res.workers, "completionMode": "Indexed",
                "backoffLimit": 0, "podFailurePolicy": _failure_policy(TRAINER_CONTAINER, "FailJob"),
                "suspend": bool(run.suspend or queue),  # Kueue admits a queued Job by unsuspending it
                "template": {"metadata": {"labels": {**labels(name, "workers"), **attempt_label}}, "spec": pod}}
    job_spec.update({k: v for k, v in mutable_job_spec(spec).items() if v is not None})
    job_meta = child_meta(meta, names.training(attempt), "workers",
                          {**attempt_label, **({LABEL_QUEUE: queue} if queue else {})})
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {**job_meta, "finalizers": [JOB_FINALIZER]},
            "spec": job_spec}


def mutable_job_spec(spec: FineTuneJobSpec) -> dict:
    """The training Job's fields that follow edits of spec.runPolicy while it runs (None: unset)."""
    run = spec.run_policy
    return {"activeDeadlineSeconds": run.active_deadline_seconds,
            "ttlSecondsAfterFinished": run.ttl_seconds_after_finished}


def network_policy(meta: dict, settings: OperatorSettings) -> dict:
    """The job's NetworkPolicy, created before its training Job: its pods (the workers and the validation pod)
    take ingress only from the job's own pods (every port: the rendezvous, torch's TCPStore, has no
    authentication, and NCCL and gloo connect on ports of their own), and on the trainer's /metrics port from the
    operator's pods and Prometheus (the settings' KUBETUNE_NETWORK_* selectors). Egress is not restricted: storage
    endpoints are arbitrary. Enforced only where the cluster's network plugin enforces NetworkPolicies."""
    name = meta["name"]
    own = {"podSelector": {"matchLabels": {LABEL_JOB: name}}}  # in the job's namespace only
    scrapers = []
    if settings.network_operator_namespace:
        scrapers.append({"namespaceSelector": {"matchLabels": {
                             "kubernetes.io/metadata.name": settings.network_operator_namespace}},
                         "podSelector": {"matchLabels": dict(settings.network_operator_pods)}})
    if settings.network_prometheus_namespaces or settings.network_prometheus_pods:
        scrapers.append({"namespaceSelector": {"matchLabels": dict(settings.network_prometheus_namespaces)},
                         "podSelector": {"matchLabels": dict(settings.network_prometheus_pods)}})
    ingress = [{"from": [own]}]
    if scrapers:
        ingress.append({"from": scrapers, "ports": [{"protocol": "TCP", "port": settings.trainer_metrics_port}]})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": child_meta(meta, Names(name).network_policy, "network"),
            "spec": {"podSelector": {"matchLabels": {LABEL_JOB: name}}, "policyTypes": ["Ingress"],
                     "ingress": ingress}}


def tool_pod(meta: dict, spec: FineTuneJobSpec, name: str, command: list[str], settings: OperatorSettings) -> dict:
    """A one-container CPU pod running `command` (a `kubetune` tool) with the FineTuneJob `meta`'s trainer config,
    storage credentials and volumes, as its validation pod has them: a FineTuneSweep's promotion of its best
    trial."""
    v = validation_settings(spec, settings)
    container = {"name": name, "image": spec.image or settings.trainer_image, "command": command,
                 "env": _storage_env(spec, settings),
                 "resources": {"requests": {"cpu": v["cpu"], "memory": v["memory"]},
                               "limits": {"memory": v["memory"]}}}
    return _pod_spec(meta, spec, container, shm=False, settings=settings)
