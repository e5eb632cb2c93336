"""spec -> desired child objects: pure, so every contract detail is checked directly."""

from __future__ import annotations

import pytest
import yaml
from kubetune_api import FineTuneJobSpec, TrainerConfig
from kubetune_operator import children
from kubetune_operator.settings import OperatorSettings

from .builders import UID, ftj

IMAGE = "registry.local/trainer:test"
SETTINGS = OperatorSettings(trainer_image=IMAGE)


def build(spec_updates: dict | None = None, name: str = "demo"):
    body = ftj(spec_updates, name=name)
    return body["metadata"], FineTuneJobSpec.model_validate(body["spec"])


def container(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]["containers"][0]


def env(obj: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(obj)["env"]}


def test_every_child_is_labelled_and_owned():
    meta, spec = build()
    objs = [
        children.config_map(meta, spec, SETTINGS),
        children.validation_job(meta, spec, SETTINGS),
        children.service(meta, spec, SETTINGS),
        children.training_job(meta, spec, SETTINGS),
    ]
    assert [o["metadata"]["name"] for o in objs] == [
        "demo-config",
        "demo-validate",
        "demo-workers",
        "demo-train-1",
    ]
    for obj in objs:
        assert obj["metadata"]["namespace"] == "ml"
        assert obj["metadata"]["labels"][children.LABEL_JOB] == "demo"
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "name": "demo",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }


CREDENTIALS = {"storage": {"secretRef": {"name": "s3-credentials"}}}


def test_config_map_holds_the_trainer_config_and_no_secret():
    meta, spec = build(CREDENTIALS)
    cm = children.config_map(meta, spec, SETTINGS)
    config = TrainerConfig.model_validate(yaml.safe_load(cm["data"]["trainer.yaml"]))
    assert config.job_name == "demo" and config.dataset.train == "s3://data/train.jsonl"
    assert config.run_id == UID  # the FineTuneJob's uid: this run's output and checkpoints are told from others'
    assert config.storage.endpoint == "http://minio:9000"
    assert (
        "secretRef" not in cm["data"]["trainer.yaml"] and "s3-credentials" not in cm["data"]["trainer.yaml"]
    )


def test_validation_job_is_one_cpu_pod_running_kubetune_validate():
    meta, spec = build()
    vj = children.validation_job(meta, spec, SETTINGS)
    c, pod = container(vj), vj["spec"]["template"]["spec"]
    assert c["command"] == ["kubetune", "validate", "--config", "/etc/kubetune/trainer.yaml"]
    assert c["image"] == IMAGE
    assert "nvidia.com/gpu" not in str(c["resources"])
    assert vj["spec"].get("completions", 1) == 1 and vj["spec"]["backoffLimit"] <= 3
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    rules = vj["spec"]["podFailurePolicy"]["rules"]
    assert rules == [
        {"action": "FailJob", "onExitCodes": {"containerName": "validate", "operator": "In", "values": [65, 73, 78]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_validation_resources_come_from_the_job_else_the_operator_else_defaults():
    def settings(vj: dict) -> tuple:
        c, pod = container(vj), vj["spec"]["template"]["spec"]
        work = next(v for v in pod["volumes"] if v["name"] == "work")
        return c["resources"], vj["spec"]["activeDeadlineSeconds"], work["emptyDir"]

    resources, deadline, scratch = settings(children.validation_job(*build(), SETTINGS))
    assert resources == {"requests": {"cpu": "500m", "memory": "1Gi", "ephemeral-storage": "10Gi"},
                         "limits": {"memory": "1Gi", "ephemeral-storage": "10Gi"}}
    assert deadline == 3600 and scratch == {"sizeLimit": "10Gi"}
    operator = OperatorSettings.from_env({"KUBETUNE_TRAINER_IMAGE": IMAGE, "KUBETUNE_VALIDATION_MEMORY": "2Gi",
                                          "KUBETUNE_VALIDATION_DEADLINE_SECONDS": "600"})
    meta, spec = build({"validation": {"cpu": "2", "ephemeralStorage": "50Gi"}})
    resources, deadline, scratch = settings(children.validation_job(meta, spec, operator))
    assert resources["requests"] == {"cpu": "2", "memory": "2Gi", "ephemeral-storage": "50Gi"}
    assert deadline == 600 and scratch == {"sizeLimit": "50Gi"}


def test_the_validation_pass_runs_one_process_per_requested_cpu():
    for cpu, workers in (("500m", "1"), ("2", "2"), ("2500m", "3"), ("1.5", "2")):
        meta, spec = build({"validation": {"cpu": cpu}})
        assert env(children.validation_job(meta, spec, SETTINGS))["KUBETUNE_DATA_WORKERS"] == workers, cpu


def test_credentials_come_from_the_secret_as_env():
    meta, spec = build(CREDENTIALS)
    e = env(children.validation_job(meta, spec, SETTINGS))
    assert e["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID", "optional": False}
    }
    assert e["AWS_SESSION_TOKEN"]["secretKeyRef"]["optional"] is True


def test_mlflow_credentials_reach_the_trainer_as_optional_secret_env():
    """tracking.mlflow.secretRef: its MLFLOW_* keys, each optional, and the namespace, in the training pods only;
    no value inline, and no empty `tracking` section in the trainer's config file."""
    meta, spec = build({"tracking": {"mlflow": {"uri": "http://mlflow:5000", "secretRef": {"name": "mlflow-token"}}}})
    e = env(children.training_job(meta, spec, SETTINGS))
    for key in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert e[key] == {"secretKeyRef": {"name": "mlflow-token", "key": key, "optional": True}}
    assert e["KUBETUNE_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert not {k for k in env(children.validation_job(meta, spec, SETTINGS)) if k.startswith("MLFLOW_")}
    meta, spec = build({"tracking": {"mlflow": {"uri": "http://mlflow:5000"}}})
    assert not {k for k in env(children.training_job(meta, spec, SETTINGS)) if k.startswith("MLFLOW_")}
    meta, spec = build()
    assert "KUBETUNE_NAMESPACE" not in env(children.training_job(meta, spec, SETTINGS))
    assert "tracking" not in yaml.safe_load(children.config_map(meta, spec, SETTINGS)["data"]["trainer.yaml"])


def test_service_account_replaces_the_secret_and_mounts_its_token():
    meta, spec = build({"storage": {"secretRef": None, "serviceAccountName": "trainer"}})
    pod = children.training_job(meta, spec, SETTINGS)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "trainer" and pod["automountServiceAccountToken"] is True
    assert "AWS_ACCESS_KEY_ID" not in env(children.training_job(meta, spec, SETTINGS))


def test_headless_service_selects_the_workers():
    meta, spec = build()
    svc = children.service(meta, spec, SETTINGS)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {children.LABEL_JOB: "demo", children.LABEL_COMPONENT: "workers"}
    tj = children.training_job(meta, spec, SETTINGS)
    assert svc["spec"]["selector"].items() <= tj["spec"]["template"]["metadata"]["labels"].items()


def pod_labels(job: dict) -> dict:
    return job["spec"]["template"]["metadata"]["labels"]


def test_training_job_is_indexed_with_rendezvous_env():
    meta, spec = build()
    tj = children.training_job(meta, spec, SETTINGS)
    s, pod = tj["spec"], tj["spec"]["template"]["spec"]
    assert (s["completions"], s["parallelism"], s["completionMode"]) == (2, 2, "Indexed")
    assert pod["subdomain"] == "demo-workers" and pod["restartPolicy"] == "Never"
    e = env(tj)
    assert e["MASTER_ADDR"] == "demo-train-1-0.demo-workers" and e["MASTER_PORT"] == "29500"
    assert e["WORLD_SIZE"] == "2" and e["NODE_RANK"] == "$(JOB_COMPLETION_INDEX)"
    assert "job-completion-index" in e["JOB_COMPLETION_INDEX"]["fieldRef"]["fieldPath"]
    assert container(tj)["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert {"name": "metrics", "containerPort": 9400} in container(tj)["ports"]
    assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"] is True
    # any worker that ends otherwise than with success ends the attempt: the operator starts the next, a new Job
    assert s["suspend"] is False and s["backoffLimit"] == 0
    assert s["podFailurePolicy"]["rules"] == [  # in order: the first rule that matches decides
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [65, 73, 78]}},
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    assert tj["metadata"]["labels"][children.LABEL_ATTEMPT] == "1" == pod_labels(tj)[children.LABEL_ATTEMPT]
    assert pod["terminationGracePeriodSeconds"] == 300 and e["KUBETUNE_TERMINATION_GRACE_SECONDS"] == "300"


@pytest.mark.parametrize(("resources", "threads"), [
    ({"cpu": "8", "gpusPerWorker": 4}, "2"),  # torchrun's four processes share the pod's eight CPUs
    ({"cpu": "2", "gpusPerWorker": 0}, "2"),  # a CPU worker: one process
    ({"cpu": "500m", "gpusPerWorker": 0}, "1"),
    ({"cpu": "2", "gpusPerWorker": 4}, "1"),  # fewer CPUs than processes: one thread each, never none
    ({"gpusPerWorker": 1}, None),  # no CPU request: torch's default
])
def test_torch_threads_follow_the_pods_cpus_per_process(resources, threads):
    """torch starts one thread per core of the node, not of the pod's CPUs: on a 64-core node, a pod of 2 CPUs
    ran 64 threads that waited their turn. OMP_NUM_THREADS is the pod's CPUs per process."""
    meta, spec = build({"resources": {"workers": 1, **resources}})
    assert env(children.training_job(meta, spec, SETTINGS)).get("OMP_NUM_THREADS") == threads


def test_each_attempt_is_a_job_of_its_own():
    meta, spec = build()
    tj = children.training_job(meta, spec, SETTINGS, attempt=3)
    assert tj["metadata"]["name"] == "demo-train-3" and children.attempt_of(tj) == 3
    assert env(tj)["MASTER_ADDR"] == "demo-train-3-0.demo-workers"
    assert children.finetunejob_of("demo-train-3") == "demo" and children.finetunejob_of("a-train-x-train-12") == \
        "a-train-x"
    assert children.finetunejob_of("demo-validate") is None and children.finetunejob_of("demo-train") is None


def test_the_rendezvous_port_can_be_moved():
    moved = OperatorSettings.from_env({"KUBETUNE_TRAINER_IMAGE": IMAGE, "KUBETUNE_RENDEZVOUS_PORT": "31234"})
    meta, spec = build()
    tj, svc = children.training_job(meta, spec, moved), children.service(meta, spec, moved)
    assert env(tj)["MASTER_PORT"] == "31234"
    assert {"name": "rendezvous", "containerPort": 31234} in container(tj)["ports"]
    assert container(tj)["args"][container(tj)["args"].index("--main_process_port") + 1] == "31234"
    assert {"name": "rendezvous", "port": 31234} in svc["spec"]["ports"]


def test_the_trainers_metrics_port_can_be_moved():
    """Rank 0 serves /metrics on the settings' port: the trainer's config, the container, the Service agree."""
    moved = OperatorSettings.from_env({"KUBETUNE_TRAINER_IMAGE": IMAGE, "KUBETUNE_TRAINER_METRICS_PORT": "31235"})
    meta, spec = build()
    tj, svc, cm = (children.training_job(meta, spec, moved), children.service(meta, spec, moved),
                   children.config_map(meta, spec, moved))
    assert {"name": "metrics", "containerPort": 31235} in container(tj)["ports"]
    assert {"name": "metrics", "port": 31235} in svc["spec"]["ports"]
    assert yaml.safe_load(cm["data"][children.CONFIG_FILE])["metrics"]["port"] == 31235


def test_the_metrics_linger_is_the_images_unless_the_settings_say():
    """Unset (a PodMonitor scrapes the pods): no variable, the image's 30 s, so Prometheus reads the final values.
    The chart's PodMonitor off sets 0: nothing would scrape, so rank 0 exits once it has published."""
    meta, spec = build()
    assert "KUBETUNE_METRICS_LINGER_SECONDS" not in env(children.training_job(meta, spec, SETTINGS))
    for value, rendered in (("0", "0"), ("7.5", "7.5"), ("30", "30")):
        settings = OperatorSettings.from_env({"KUBETUNE_TRAINER_IMAGE": IMAGE,
                                              "KUBETUNE_TRAINER_METRICS_LINGER_SECONDS": value})
        assert env(children.training_job(meta, spec, settings))["KUBETUNE_METRICS_LINGER_SECONDS"] == rendered
        assert "KUBETUNE_METRICS_LINGER_SECONDS" not in env(children.validation_job(meta, spec, settings))


def test_accelerate_args():
    args = children.accelerate_args("demo", build()[1], SETTINGS)
    assert args[:4] == ["--num_machines", "2", "--num_processes", "2"]
    assert args[args.index("--machine_rank") + 1] == "$(JOB_COMPLETION_INDEX)"
    assert args[args.index("--main_process_ip") + 1] == "demo-train-1-0.demo-workers"
    assert "--main_process_port" in args and "--multi_gpu" in args
    assert args[-5:] == ["-m", "kubetune_trainer", "train", "--config", "/etc/kubetune/trainer.yaml"]
    one = children.accelerate_args("demo", build({"resources": {"workers": 1, "gpusPerWorker": 1}})[1], SETTINGS)
    assert "--multi_gpu" not in one and "--machine_rank" not in one
    four = children.accelerate_args("demo", build({"resources": {"workers": 2, "gpusPerWorker": 4}})[1], SETTINGS)
    assert four[3] == "8" and "--multi_gpu" in four
    cpu = children.accelerate_args("demo", build({"resources": {"workers": 1, "gpusPerWorker": 0}})[1], SETTINGS)
    assert "--cpu" in cpu
    meta, spec = build({"resources": {"workers": 2, "gpusPerWorker": 0}})
    cpus = children.accelerate_args("demo", spec, SETTINGS)
    assert "--cpu" in cpus and "--multi_gpu" not in cpus and cpus[3] == "2"
    e = env(children.training_job(meta, spec, SETTINGS))
    assert e["RANK"] == "$(JOB_COMPLETION_INDEX)" and e["LOCAL_RANK"] == "0" and e["WORLD_SIZE"] == "2"
    assert "RANK" not in env(children.training_job(*build(), SETTINGS))


def test_scheduling_run_policy_and_kueue():
    meta, spec = build(
        {
            "resources": {
                "workers": 1,
                "gpusPerWorker": 8,
                "gpuResourceName": "amd.com/gpu",
                "cpu": "16",
                "memory": "128Gi",
                "nodeSelector": {"gpu": "h100"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {"nodeAffinity": {}},
            },
            "runPolicy": {"backoffLimit": 1, "activeDeadlineSeconds": 7200, "ttlSecondsAfterFinished": 60},
            "scheduling": {"priorityClassName": "training", "queueName": "team-a"},
        }
    )
    tj = children.training_job(meta, spec, SETTINGS)
    s, pod = tj["spec"], tj["spec"]["template"]["spec"]
    assert container(tj)["resources"] == {
        "requests": {"cpu": "16", "memory": "128Gi"},
        "limits": {"memory": "128Gi", "amd.com/gpu": "8"},
    }
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["affinity"] == {"nodeAffinity": {}}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "training"
    assert tj["metadata"]["labels"][children.LABEL_QUEUE] == "team-a"
    assert s["suspend"] is True  # Kueue admits it by unsuspending
    # backoffLimit counts failed attempts in the operator: each Job fails at its first failed worker
    assert (s["backoffLimit"], s["activeDeadlineSeconds"], s["ttlSecondsAfterFinished"]) == (0, 7200, 60)


def test_the_grace_period_comes_from_the_run_policy_when_the_job_is_created():
    meta, spec = build({"runPolicy": {"terminationGracePeriodSeconds": 1800}})
    tj = children.training_job(meta, spec, SETTINGS)
    assert tj["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 1800
    assert env(tj)["KUBETUNE_TERMINATION_GRACE_SECONDS"] == "1800"
    assert "terminationGracePeriodSeconds" not in children.mutable_job_spec(spec)  # the pod template is immutable


def test_user_suspend_creates_a_suspended_job():
    meta, spec = build({"runPolicy": {"suspend": True}})
    assert children.training_job(meta, spec, SETTINGS)["spec"]["suspend"] is True


def test_spec_image_overrides_the_default():
    meta, spec = build({"image": "my/trainer:1"})
    assert container(children.training_job(meta, spec, SETTINGS))["image"] == "my/trainer:1"


def test_default_image_from_env():
    assert OperatorSettings.from_env({}).trainer_image == "ghcr.io/kubetune/trainer:0.1.0"
    assert OperatorSettings().trainer_image == "ghcr.io/kubetune/trainer:0.1.0"
    assert OperatorSettings.from_env({"KUBETUNE_TRAINER_IMAGE": "x/y:z"}).trainer_image == "x/y:z"


def test_pvc_uris_mount_their_claims():
    meta, spec = build(
        {"dataset": {"train": "pvc://datasets/support/train.jsonl"}, "output": {"uri": "pvc://outputs/demo/"}}
    )
    assert spec.pvc_claims() == ["datasets", "outputs"]
    pod = children.training_job(meta, spec, SETTINGS)["spec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/mnt/pvc/datasets", "/mnt/pvc/outputs", "/etc/kubetune", "/tmp/kubetune", "/dev/shm"} <= mounts
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"datasets", "outputs"}


# -- pod security: the `restricted` Pod Security Standard, a read-only root, no token without workload identity --

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """What the `restricted` Pod Security Standard refuses in a pod spec (the API server's checks, for the fields a
    pod of ours could set); tests/operator_tests/test_security.py has the real Pod Security admission judge too."""
    found = []
    pod_sc = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(key)
    found += [f"volume {v['name']}" for v in pod.get("volumes", [])
              if not set(v) - {"name"} <= RESTRICTED_VOLUMES]
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            found.append(f"{c['name']}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{c['name']}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{c['name']}: capabilities must drop ALL")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            found.append(f"{c['name']}: runAsNonRoot")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            found.append(f"{c['name']}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{c['name']}: seccompProfile")
        found += [f"{c['name']}: hostPort" for p in c.get("ports", []) if p.get("hostPort")]
    return found


def pod_specs(spec_updates: dict | None = None) -> dict[str, dict]:
    meta, spec = build(spec_updates)
    return {"validation": children.validation_job(meta, spec, SETTINGS)["spec"]["template"]["spec"],
            "training": children.training_job(meta, spec, SETTINGS)["spec"]["template"]["spec"]}


WORKLOAD_IDENTITY = {"storage": {"secretRef": None, "serviceAccountName": "trainer"}}
EVERYTHING = {"dataset": {"train": "pvc://datasets/train.jsonl"}, "output": {"uri": "pvc://outputs/demo/"},
              "resources": {"workers": 2, "gpusPerWorker": 4}, "scheduling": {"priorityClassName": "training"},
              **WORKLOAD_IDENTITY}


@pytest.mark.parametrize("updates", [None, EVERYTHING], ids=["default", "pvcs-gpus-service-account"])
def test_pods_meet_the_restricted_pod_security_standard(updates):
    for kind, pod in pod_specs(updates).items():
        assert restricted_violations(pod) == [], kind


def test_a_pod_that_breaks_the_standard_is_caught_by_the_check():
    pod = pod_specs()["training"]
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    pod["containers"][0]["securityContext"] = {"capabilities": {"add": ["SYS_ADMIN"]}}
    assert restricted_violations(pod) == ["volume host", "trainer: allowPrivilegeEscalation must be false",
                                          "trainer: capabilities must drop ALL"]


@pytest.mark.parametrize("updates", [None, EVERYTHING], ids=["default", "pvcs-gpus-service-account"])
def test_the_root_filesystem_is_read_only_and_writes_go_to_explicit_volumes(updates):
    """/tmp (HOME: every library's cache) and the work dir are emptyDirs; /dev/shm is memory; the config is read-only;
    PVCs the URIs name are the only other writable paths."""
    for kind, pod in pod_specs(updates).items():
        (c,) = pod["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, kind
        assert {e["name"]: e.get("value") for e in c["env"]}["HOME"] == "/tmp"
        volumes = {v["name"]: v for v in pod["volumes"]}
        writable = {m["mountPath"]: next(k for k in volumes[m["name"]] if k != "name")
                    for m in c["volumeMounts"] if not m.get("readOnly")}
        expected = {"/tmp": "emptyDir", "/tmp/kubetune": "emptyDir"}
        if kind == "training":
            expected["/dev/shm"] = "emptyDir"
        if updates:
            expected |= {"/mnt/pvc/datasets": "persistentVolumeClaim", "/mnt/pvc/outputs": "persistentVolumeClaim"}
        assert writable == expected, kind
        assert {m["mountPath"] for m in c["volumeMounts"] if m.get("readOnly")} == {"/etc/kubetune"}


def test_no_service_account_token_unless_the_job_names_a_service_account():
    for kind, pod in pod_specs().items():
        assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod, kind
        assert pod["enableServiceLinks"] is False  # no other Service's address in the environment either
    for kind, pod in pod_specs(WORKLOAD_IDENTITY).items():
        assert pod["automountServiceAccountToken"] is True and pod["serviceAccountName"] == "trainer", kind


NETWORKED = OperatorSettings(
    trainer_image=IMAGE, trainer_metrics_port=9400, network_operator_namespace="kubetune-system",
    network_operator_pods=(("app.kubernetes.io/name", "kubetune"), ("app.kubernetes.io/component", "operator")))


def test_network_policy_lets_in_only_the_jobs_pods_the_operator_and_prometheus():
    """The job's pods (workers and validation) are selected; every port is open to the job's own pods (the
    rendezvous, NCCL/gloo), only the metrics port to the operator's pods and Prometheus; egress is not touched."""
    meta, _ = build()
    policy = children.network_policy(meta, NETWORKED)
    assert (policy["apiVersion"], policy["kind"], policy["metadata"]["name"]) == (
        "networking.k8s.io/v1", "NetworkPolicy", "demo-ingress")
    assert policy["metadata"]["ownerReferences"][0]["uid"] == meta["uid"]
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"kubetune.io/finetunejob": "demo"}}
    assert spec["policyTypes"] == ["Ingress"]  # egress: storage endpoints are arbitrary
    own, scrapers = spec["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": {"kubetune.io/finetunejob": "demo"}}}]}  # no ports: all
    assert scrapers["ports"] == [{"protocol": "TCP", "port": 9400}]
    assert scrapers["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubetune-system"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubetune",
                                         "app.kubernetes.io/component": "operator"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]
    job_spec = build()[1]
    for obj in (children.training_job(meta, job_spec, NETWORKED), children.validation_job(meta, job_spec, NETWORKED)):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert labels["kubetune.io/finetunejob"] == "demo", "the policy selects every pod of the job"


def test_network_policy_without_scrapers_admits_only_the_jobs_pods():
    meta, _ = build()
    settings = OperatorSettings(trainer_image=IMAGE, network_prometheus_namespaces=(), network_prometheus_pods=())
    assert children.network_policy(meta, settings)["spec"]["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": {"kubetune.io/finetunejob": "demo"}}}]}]
