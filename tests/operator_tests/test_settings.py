"""The operator's configuration is read once (settings.OperatorSettings.from_env, in __main__) and passed down:
every KUBETUNE_* variable takes effect through it, and nothing else in the operator reads the environment, so
`decide` is a function of its arguments."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from kubetune_api import Reason
from kubetune_operator import __main__ as main
from kubetune_operator import children, leader, metrics, policy
from kubetune_operator.reconcile import Observed, decide
from kubetune_operator.settings import OperatorSettings

from .builders import NOW, ftj, pod

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "kubetune_operator"


def test_the_defaults_are_those_of_an_empty_environment():
    assert OperatorSettings.from_env({}) == OperatorSettings()
    s = OperatorSettings()
    assert (s.trainer_image, s.rendezvous_port, s.gpu_tflops) == ("ghcr.io/kubetune/trainer:0.1.0", 29500, 400.0)
    assert (s.validation_cpu, s.validation_memory, s.validation_ephemeral_storage,
            s.validation_deadline_seconds, s.validation_max_attempts) == ("500m", "1Gi", "10Gi", 3600, 5)
    assert (s.resync_seconds, s.scrape_seconds, s.metrics_port, s.health_port, s.ready_port) == (60, 10, 8080, 8081,
                                                                                                 8082)
    assert (s.storage_endpoint, s.storage_region, s.storage_secret_name) == ("", "", "")
    assert s.policy == policy.Settings(image_prefixes=("ghcr.io/kubetune/trainer",))


def test_every_variable_takes_effect():
    s = OperatorSettings.from_env({
        "KUBETUNE_TRAINER_IMAGE": "registry.local/trainer:1", "KUBETUNE_RENDEZVOUS_PORT": "31234",
        "KUBETUNE_TRAINER_METRICS_PORT": "31235", "KUBETUNE_TRAINER_METRICS_LINGER_SECONDS": "0",
        "KUBETUNE_ESTIMATE_GPU_TFLOPS": "125", "KUBETUNE_STORAGE_ENDPOINT": "http://minio:9000",
        "KUBETUNE_STORAGE_REGION": "eu-west-1", "KUBETUNE_STORAGE_SECRET_NAME": "platform-s3",
        "KUBETUNE_VALIDATION_CPU": "2", "KUBETUNE_VALIDATION_MEMORY": "2Gi",
        "KUBETUNE_VALIDATION_EPHEMERAL_STORAGE": "20Gi", "KUBETUNE_VALIDATION_DEADLINE_SECONDS": "600",
        "KUBETUNE_VALIDATION_MAX_ATTEMPTS": "2",
        "KUBETUNE_RESYNC_SECONDS": "1", "KUBETUNE_SCRAPE_SECONDS": "1", "KUBETUNE_METRICS_PORT": "0",
        "KUBETUNE_HEALTH_PORT": "18081", "KUBETUNE_READY_PORT": "0",
        "KUBETUNE_POLICY_IMAGE_PREFIXES": "a.io/x, b.io/", "KUBETUNE_POLICY_CREDENTIALS_NAMESPACES": "team-a,*",
        "KUBETUNE_POLICY_ALLOW_TRUST_REMOTE_CODE": "true", "KUBETUNE_POLICY_BINDING": "kubetune-finetunejobs",
        "KUBETUNE_POLICY_STORAGE_PREFIXES": "s3://ml-{namespace}/, hf://",
        "KUBETUNE_POLICY_STORAGE_ENDPOINTS": "https://s3.example.com",
    })
    assert s == OperatorSettings(
        trainer_image="registry.local/trainer:1", rendezvous_port=31234, trainer_metrics_port=31235,
        trainer_metrics_linger_seconds=0.0, gpu_tflops=125.0,
        storage_endpoint="http://minio:9000", storage_region="eu-west-1", storage_secret_name="platform-s3",
        validation_cpu="2", validation_memory="2Gi", validation_ephemeral_storage="20Gi",
        validation_deadline_seconds=600, validation_max_attempts=2,
        resync_seconds=1.0, scrape_seconds=1.0, metrics_port=0, health_port=18081,
        ready_port=0,
        policy=policy.Settings(image_prefixes=("a.io/x", "b.io/"), credentials_secret="platform-s3",
                               credentials_namespaces=("team-a", "*"), allow_trust_remote_code=True,
                               storage_prefixes=("s3://ml-{namespace}/", "hf://"), storage_endpoint="http://minio:9000",
                               storage_endpoints=("https://s3.example.com",), binding="kubetune-finetunejobs"))


def test_empty_values_keep_the_defaults_as_before():
    s = OperatorSettings.from_env({"KUBETUNE_RENDEZVOUS_PORT": "", "KUBETUNE_ESTIMATE_GPU_TFLOPS": "",
                                   "KUBETUNE_VALIDATION_MEMORY": "", "KUBETUNE_VALIDATION_DEADLINE_SECONDS": "",
                                   "KUBETUNE_POLICY_IMAGE_PREFIXES": "", "KUBETUNE_TRAINER_IMAGE": "my/trainer:2"})
    assert (s.rendezvous_port, s.gpu_tflops, s.validation_memory, s.validation_deadline_seconds) == (
        29500, 400.0, "1Gi", 3600)
    assert s.policy.image_prefixes == ("my/trainer",)  # the trainer image's repository
    assert OperatorSettings.from_env({"KUBETUNE_TRAINER_METRICS_LINGER_SECONDS": ""}).trainer_metrics_linger_seconds \
        is None  # the image's own linger


@pytest.mark.parametrize("value", ["-1", "soon", "nan"])
def test_a_bad_linger_is_refused_naming_the_variable(value):
    with pytest.raises(ValueError, match="KUBETUNE_TRAINER_METRICS_LINGER_SECONDS"):
        OperatorSettings.from_env({"KUBETUNE_TRAINER_METRICS_LINGER_SECONDS": value})
    assert OperatorSettings(trainer_image="my/trainer:2").policy.image_prefixes == ("my/trainer",)


def test_storage_defaults_fill_in_what_the_job_leaves_out():
    s = OperatorSettings(storage_endpoint="http://minio:9000", storage_region="eu", storage_secret_name="platform")
    assert children.with_storage_defaults({}, s)["storage"] == {
        "endpoint": "http://minio:9000", "region": "eu", "secretRef": {"name": "platform"}}
    own = {"storage": {"endpoint": "https://s3.example.com", "serviceAccountName": "trainer"}}
    assert children.with_storage_defaults(own, s)["storage"] == own["storage"]
    assert children.with_storage_defaults({}, OperatorSettings())["storage"] == {}


def test_decide_reads_its_settings_not_the_environment(monkeypatch):
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE", "from/the-environment:1")
    monkeypatch.setenv("KUBETUNE_VALIDATION_MEMORY", "64Gi")
    d = decide(ftj(), Observed(), NOW, OperatorSettings(trainer_image="from/the-settings:1"))
    container = d.create[1]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "from/the-settings:1" and container["resources"]["limits"]["memory"] == "1Gi"


def test_decide_never_builds_settings_of_its_own(monkeypatch):
    """From a new job to running workers (service, training Job, rank 0's metrics URL), every child and the status
    come from the settings given: the environment is not consulted, even indirectly."""
    settings = OperatorSettings(trainer_image="t:1", rendezvous_port=31234, gpu_tflops=125.0)

    def refuse(*_, **__):
        raise AssertionError("decide read the environment")

    monkeypatch.setattr(OperatorSettings, "from_env", refuse)
    body = ftj()
    d = decide(body, Observed(), NOW, settings)
    assert [o["metadata"]["name"] for o in d.create] == ["demo-config", "demo-validate"]
    cm = d.create[0]
    assert "gpuTflops: 125.0" in cm["data"]["trainer.yaml"]
    body["status"] = {"phase": "Queued", "conditions": [{"type": "Validated", "status": "True", "reason": "ok",
                                                          "lastTransitionTime": "2026-01-01T10:00:00Z"}]}
    d = decide(body, Observed(config_map=cm), NOW, settings)
    network, service, training = d.create
    assert network["kind"] == "NetworkPolicy"
    assert {"name": "rendezvous", "port": 31234} in service["spec"]["ports"]
    training["metadata"]["uid"], training["status"] = "tj", {"active": 2}
    d = decide(body, Observed(config_map=cm, service=service, training_job=training,
                              training_pods=[pod(training, index=0)]), NOW, settings)
    assert d.phase == "Running" and d.metrics_url == "http://10.0.0.5:9400/metrics"


def test_only_the_settings_module_reads_the_environment():
    readers = sorted(p.name for p in PACKAGE.glob("*.py") if re.search(r"os\.environ|getenv", p.read_text()))
    assert readers == ["settings.py"]


def test_reasons_are_their_strings():
    assert all(r == r.value == r.name for r in Reason)
    assert json.dumps({"reason": Reason.PolicyDenied}) == '{"reason": "PolicyDenied"}'
    assert f"{Reason.DatasetInvalid}:" == "DatasetInvalid:" and str(Reason.Hung) == "Hung"


def test_main_reads_the_environment_once_and_hands_the_settings_to_every_handler(monkeypatch):
    """What the cluster tests' operator_env() and the chart's Deployment set reaches the operator: the ports it
    serves, and (kopf's memo) the supervisors' settings."""
    served, started = [], {}

    async def operator(**kwargs):
        started.update(kwargs)

    monkeypatch.setattr(main.kopf, "configure", lambda **_: None)
    monkeypatch.setattr(main.kopf, "operator", operator)
    monkeypatch.setattr(main, "kueue_served", lambda: False)
    monkeypatch.setattr(main, "sweeps_served", lambda: False)
    elected = []
    monkeypatch.setattr(main, "elect", lambda config: elected.append(config) or FakeElector())
    monkeypatch.setattr(metrics, "serve", lambda port: served.append(("metrics", port)))
    monkeypatch.setattr(leader, "serve", lambda port: served.append(("ready", port)))
    for name, value in {"KUBETUNE_HEALTH_PORT": "18081", "KUBETUNE_METRICS_PORT": "18080",
                        "KUBETUNE_READY_PORT": "18082", "KUBETUNE_RESYNC_SECONDS": "1",
                        "KUBETUNE_SCRAPE_SECONDS": "1", "KUBETUNE_TRAINER_IMAGE": "registry.local/trainer:e2e",
                        "KUBETUNE_RENDEZVOUS_PORT": "31234", "KUBETUNE_POLICY_BINDING": "b"}.items():
        monkeypatch.setenv(name, value)
    main.main(["-n", "ml"])
    assert served == [("metrics", 18080), ("ready", 18082)]
    assert started["liveness_endpoint"] == "http://0.0.0.0:18081/healthz"
    assert started["standalone"] is True, "no kopf peering: the Lease elects the replica"
    assert elected == [OperatorSettings.from_env()] and elected[0].lease_name == "kubetune-operator"
    assert FakeElector.released, "a clean exit releases the Lease"
    settings = started["memo"].settings
    assert settings == OperatorSettings.from_env()
    assert (settings.resync_seconds, settings.scrape_seconds, settings.trainer_image, settings.rendezvous_port,
            settings.policy.binding) == (1.0, 1.0, "registry.local/trainer:e2e", 31234, "b")


class FakeElector:
    released = False

    def release(self) -> None:
        FakeElector.released = True


def test_standalone_runs_kopf_without_election(monkeypatch):
    """`--standalone` (a single replica): no Lease, active at once."""
    started = {}

    async def operator(**kwargs):
        started.update(kwargs, active=leader.state())

    monkeypatch.setattr(main.kopf, "configure", lambda **_: None)
    monkeypatch.setattr(main.kopf, "operator", operator)
    monkeypatch.setattr(main, "kueue_served", lambda: False)
    monkeypatch.setattr(main, "sweeps_served", lambda: False)
    monkeypatch.setattr(main, "elect", lambda config: (_ for _ in ()).throw(AssertionError("elected")))
    monkeypatch.setattr(metrics, "serve", lambda port: None)
    monkeypatch.setattr(leader, "serve", lambda port: None)
    main.main(["-n", "ml", "--standalone"])
    assert started["standalone"] is True and started["active"] == "active"
    assert leader.state() == "standby", "not ready once kopf has stopped"

def test_the_network_policy_variables_take_effect():
    """KUBETUNE_NETWORK_*, as the chart sets them (networkPolicy.*): off, the operator's namespace and pod labels,
    Prometheus's selectors; set but empty, no Prometheus peer; a label without `=` names the variable."""
    s = OperatorSettings()
    assert (s.network_policy, s.network_operator_namespace, s.network_operator_pods) == (True, "", ())
    assert dict(s.network_prometheus_namespaces) == {"kubernetes.io/metadata.name": "monitoring"}
    assert dict(s.network_prometheus_pods) == {"app.kubernetes.io/name": "prometheus"}
    s = OperatorSettings.from_env({
        "KUBETUNE_NETWORK_POLICY": "false", "KUBETUNE_NETWORK_OPERATOR_NAMESPACE": "kubetune-system",
        "KUBETUNE_NETWORK_OPERATOR_POD_LABELS": "app.kubernetes.io/name=kubetune,app.kubernetes.io/component=operator",
        "KUBETUNE_NETWORK_PROMETHEUS_NAMESPACE_SELECTOR": "team=observability",
        "KUBETUNE_NETWORK_PROMETHEUS_POD_SELECTOR": ""})
    assert s.network_policy is False and s.network_operator_namespace == "kubetune-system"
    assert dict(s.network_operator_pods) == {"app.kubernetes.io/name": "kubetune",
                                             "app.kubernetes.io/component": "operator"}
    assert (s.network_prometheus_namespaces, s.network_prometheus_pods) == ((("team", "observability"),), ())
    with pytest.raises(ValueError, match="KUBETUNE_NETWORK_PROMETHEUS_POD_SELECTOR: 'prometheus' is not key=value"):
        OperatorSettings.from_env({"KUBETUNE_NETWORK_PROMETHEUS_POD_SELECTOR": "prometheus"})
