"""The Helm chart: lint, render with default and non-default values, schema, CRDs, security, docs."""

from __future__ import annotations

import filecmp
import re

import pytest
import yaml

from tests.chart.conftest import (
    CHART,
    FULL_VALUES,
    ROOT,
    documented_rbac,
    find,
    helm_template,
    render,
    run,
    set_args,
    tool,
)

CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering", "CustomResourceDefinition"}


def test_helm_lint_default_and_full_values():
    run(tool("helm"), "lint", "--strict", str(CHART))
    run(tool("helm"), "lint", "--strict", str(CHART), *set_args(FULL_VALUES))


@pytest.mark.parametrize("values", [{}, FULL_VALUES], ids=["default", "full"])
def test_rendered_objects_are_well_formed(values):
    objects = render(values)
    assert objects
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", obj["metadata"]["name"]
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace"), f"{obj['kind']}/{obj['metadata']['name']}: no namespace"


def test_default_render():
    objects = render()
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment",
                            "ConfigMap", "ClusterKopfPeering"])
    (deploy,) = find(objects, "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/kubetune/operator:0.1.0"
    assert container["args"] == ["--all-namespaces"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/trainer:0.1.0"
    assert env["KUBETUNE_METRICS_PORT"] == "8080" and env["KUBETUNE_HEALTH_PORT"] == "8081"
    assert env["KUBETUNE_READY_PORT"] == "8082"
    assert env["KUBETUNE_RESYNC_SECONDS"] == "60"
    assert (env["KUBETUNE_VALIDATION_CPU"], env["KUBETUNE_VALIDATION_MEMORY"],
            env["KUBETUNE_VALIDATION_EPHEMERAL_STORAGE"], env["KUBETUNE_VALIDATION_DEADLINE_SECONDS"]) == (
        "500m", "1Gi", "10Gi", "3600")
    pod_id = next(e for e in container["env"] if e["name"] == "POD_ID")  # kopf's identity among its peers
    assert pod_id["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "KUBETUNE_STORAGE_ENDPOINT" not in env
    assert deploy["spec"]["replicas"] == 1
    # Optional parts stay off
    assert not find(objects, "ServiceMonitor") and not find(objects, "PodMonitor")
    assert not find(objects, "PrometheusRule")
    (peering,) = find(objects, "ClusterKopfPeering", "kubetune")  # on by default: its CRDs are in crds/


def test_operator_pod_is_locked_down():
    for values in ({}, FULL_VALUES):
        (deploy,) = find(render(values), "Deployment")
        pod = deploy["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        (container,) = pod["containers"]
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ready"}
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"metrics": 8080, "health": 8081, "ready": 8082}
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_full_values_render():
    objects = render(FULL_VALUES)
    (deploy,) = find(objects, "Deployment")
    spec = deploy["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert deploy["spec"]["replicas"] == 2
    assert container["args"] == ["--namespace", "team-a", "--namespace", "team-b"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/trainer:0.2.0"
    assert env["KUBETUNE_STORAGE_ENDPOINT"] == "http://minio.minio:9000"
    assert env["KUBETUNE_STORAGE_REGION"] == "eu-west-1"
    assert env["KUBETUNE_STORAGE_SECRET_NAME"] == "s3-credentials"
    # Monitoring objects
    (svc,) = find(objects, "Service")
    (sm,) = find(objects, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    (pm,) = find(objects, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "kubetune",
                                                       "app.kubernetes.io/component": "workers"}
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    endpoint = pm["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics"
    assert endpoint["relabelings"][0] == {  # rank 0 only
        "sourceLabels": ["__meta_kubernetes_pod_label_batch_kubernetes_io_job_completion_index"],
        "regex": "0|", "action": "keep"}
    (rule,) = find(objects, "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == {"KubetuneFineTuneJobFailed", "KubetuneTrainingStalled", "KubetuneLossNotFinite",
                      "KubetuneOperatorDown"}
    peerings = find(objects, "KopfPeering", "kubetune")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]


def test_the_operator_applies_the_storage_defaults_the_chart_sets(monkeypatch):
    from kubetune_operator.children import with_storage_defaults

    (deploy,) = find(render(FULL_VALUES), "Deployment")
    for var in deploy["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in var:  # not POD_ID (the pod's name)
            monkeypatch.setenv(var["name"], var["value"])
    assert with_storage_defaults({})["storage"] == {
        "endpoint": "http://minio.minio:9000", "region": "eu-west-1", "secretRef": {"name": "s3-credentials"}}
    own = {"endpoint": "http://s3.local", "region": "us-east-1", "serviceAccountName": "irsa"}
    assert with_storage_defaults({"storage": own})["storage"] == own  # a job's own storage wins, as a whole


def test_the_operator_applies_the_validation_defaults_the_chart_sets(monkeypatch):
    from types import SimpleNamespace

    from kubetune_operator.children import validation_settings
    from kubetune_trainer.spec import ValidationSpec

    values = {"validation.cpu": "2", "validation.memory": "4Gi", "validation.ephemeralStorage": "50Gi",
              "validation.activeDeadlineSeconds": "600"}
    (deploy,) = find(render(values), "Deployment")
    for var in deploy["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in var:
            monkeypatch.setenv(var["name"], var["value"])
    assert validation_settings(SimpleNamespace(validation=ValidationSpec())) == {
        "cpu": "2", "memory": "4Gi", "ephemeral_storage": "50Gi", "active_deadline_seconds": 600}


def test_the_operator_estimates_with_the_gpu_tflops_the_chart_sets(monkeypatch):
    from kubetune_operator.children import trainer_config
    from kubetune_trainer.spec import FineTuneJobSpec

    spec = FineTuneJobSpec.model_validate({
        "baseModel": {"uri": "s3://models/m/"}, "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/"}, "resources": {"workers": 2, "gpusPerWorker": 4}})
    for values, tflops in (({}, 400.0), ({"estimate.gpuTflops": "125"}, 125.0)):
        (deploy,) = find(render(values), "Deployment")
        for var in deploy["spec"]["template"]["spec"]["containers"][0]["env"]:
            if "value" in var:
                monkeypatch.setenv(var["name"], var["value"])
        hardware = trainer_config("demo", spec).hardware
        assert (hardware.gpu_tflops, hardware.gpus, hardware.processes) == (tflops, 8, 8)


def test_the_probes_ask_the_ports_the_operator_serves():
    (deploy,) = find(render({"healthPort": "9001", "readyPort": "9002"}), "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    ports = {p["name"]: str(p["containerPort"]) for p in container["ports"]}
    assert ports["health"] == env["KUBETUNE_HEALTH_PORT"] == "9001"
    assert ports["ready"] == env["KUBETUNE_READY_PORT"] == "9002"


def test_image_digest_wins_over_tag():
    (deploy,) = find(render({"image.digest": "sha256:" + "a" * 64, "image.tag": "x"}), "Deployment")
    assert deploy["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "ghcr.io/kubetune/operator@sha256:" + "a" * 64)


def _rules(role: dict) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


NAMESPACED_RULES = {
    ("kubetune.io", "finetunejobs"): {"get", "list", "watch", "patch"},
    ("kubetune.io", "finetunejobs/status"): {"patch"},
    ("kubetune.io", "finetunejobs/finalizers"): {"update"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch"},
    ("", "services"): {"get", "list", "watch", "create"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "events"): {"create"},
}
CRD_RULE = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
CLUSTER_WIDE_ONLY = {("kopf.dev", "clusterkopfpeerings"): {"list", "watch", "patch"}}
PER_NAMESPACE_ONLY = {("kopf.dev", "kopfpeerings"): {"list", "watch", "patch"}}


def test_rbac_cluster_wide_is_least_privilege():
    objects = render()
    (role,) = find(objects, "ClusterRole")
    assert _rules(role) == {**CRD_RULE, **CLUSTER_WIDE_ONLY, **NAMESPACED_RULES}
    assert not find(objects, "Role")
    (binding,) = find(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kubetune", "namespace": "kubetune-system"}]


def test_rbac_per_namespace_when_watching_a_list():
    objects = render({"watchNamespaces": "{team-a,team-b}"})
    (cluster_role,) = find(objects, "ClusterRole")
    assert _rules(cluster_role) == CRD_RULE  # nothing namespaced cluster-wide
    roles = find(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert _rules(role) == {**PER_NAMESPACE_ONLY, **NAMESPACED_RULES}
    bindings = find(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == "kubetune-system"
    for obj in objects:  # no wildcards anywhere
        for rule in obj.get("rules", []):
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]


def test_rbac_equals_docs_operator_md():
    """docs/operator.md (by the operator's author) lists exactly what the operator calls; the chart grants
    exactly that: all of it cluster-wide, or split between the ClusterRole and per-namespace Roles."""
    documented = documented_rbac()
    assert documented, "no RBAC table in docs/operator.md"
    (role,) = find(render(), "ClusterRole")
    assert {**_rules(role), **PER_NAMESPACE_ONLY} == documented
    objects = render({"watchNamespaces": "{team-a}"})
    (cluster_role,) = find(objects, "ClusterRole")
    (ns_role,) = find(objects, "Role")
    assert {**_rules(cluster_role), **_rules(ns_role), **CLUSTER_WIDE_ONLY} == documented


@pytest.mark.parametrize("values, message", [
    ({"replicas": "two"}, "replicas"),
    ({"resyncSeconds": "0"}, "resyncSeconds"),
    ({"readyPort": "0"}, "readyPort"),
    ({"validation.memory": "lots"}, "memory"),
    ({"validation.activeDeadlineSeconds": "30"}, "activeDeadlineSeconds"),  # the CRD: at least 60
    ({"validation.gpu": "1"}, "gpu"),
    ({"estimate.gpuTflops": "0"}, "gpuTflops"),
    ({"estimate.gpuTflops": "fast"}, "gpuTflops"),
    ({"image.pullPolicy": "Sometimes"}, "pullPolicy"),
    ({"watchNamespaces": "{Team_A}"}, "watchNamespaces"),
    ({"prometheusRule.trainingStalledFor": "fifteen minutes"}, "trainingStalledFor"),
    ({"image.digest": "latest"}, "digest"),
    ({"unknownKey": "1"}, "unknownKey"),
])
def test_schema_rejects_bad_values(values, message):
    proc = helm_template(values, check=False)
    assert proc.returncode != 0, f"helm template accepted {values}"
    assert "schema" in proc.stderr and message in proc.stderr, proc.stderr


VENDORED_CRDS = ["kopf.dev_peerings.yaml"]  # kopf's peering CRDs: in the chart only


def test_chart_crds_equal_generated_crds():
    generated = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert "kubetune.io_finetunejobs.yaml" in generated, "crds/ has no FineTuneJob CRD: generate it first"
    in_chart = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert in_chart == sorted(generated + VENDORED_CRDS), "run `make chart-crds`"
    match, mismatch, errors = filecmp.cmpfiles(ROOT / "crds", CHART / "crds", generated, shallow=False)
    assert not mismatch and not errors, f"chart CRDs differ ({mismatch + errors}): run `make chart-crds`"
    for name in in_chart:
        for doc in yaml.safe_load_all((CHART / "crds" / name).read_text()):
            if doc:
                assert doc["kind"] == "CustomResourceDefinition", name


def test_kopf_peering_crds_match_what_kopf_uses():
    """The vendored CRDs serve exactly the resources kopf's peering reads and patches."""
    from kopf._cogs.structs import references

    docs = [d for d in yaml.safe_load_all((CHART / "crds" / "kopf.dev_peerings.yaml").read_text()) if d]
    served = {(d["spec"]["group"], d["spec"]["versions"][0]["name"], d["spec"]["names"]["plural"],
               d["spec"]["scope"]) for d in docs}
    def wanted(selector, scope: str) -> tuple:
        return selector.group, selector.version, selector.plural or selector.any_name, scope

    assert served == {wanted(references.CLUSTER_PEERINGS_K, "Cluster"),
                      wanted(references.NAMESPACED_PEERINGS_K, "Namespaced")}
    for doc in docs:  # kopf merge-patches .status on the object itself: no status subresource
        assert "subresources" not in doc["spec"]["versions"][0]


def test_crd_has_the_short_name_notes_uses():
    crd = yaml.safe_load((CHART / "crds" / "kubetune.io_finetunejobs.yaml").read_text())
    assert "ftj" in crd["spec"]["names"].get("shortNames", []), "NOTES.txt tells users `kubectl get ftj`"


def test_dashboard_configmap_carries_the_sidecar_label_and_json():
    (cm,) = find(render(), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["kubetune.json"].strip() == (CHART / "dashboards" / "kubetune.json").read_text().strip()
    (cm,) = find(render({"dashboard.label": "dash", "dashboard.labelValue": "yes",
                         "dashboard.namespace": "monitoring"}), "ConfigMap")
    assert cm["metadata"]["labels"]["dash"] == "yes" and cm["metadata"]["namespace"] == "monitoring"
    assert not find(render({"dashboard.enabled": "false"}), "ConfigMap")


# Values documented as a whole (a Kubernetes object, not chart settings)
WHOLE = {"resources", "podSecurityContext", "securityContext", "strategy", "selector", "livenessProbe",
         "readinessProbe"}


def _leaf_keys(values: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in WHOLE:
            keys |= _leaf_keys(value, path + ".")
        else:
            keys.add(path)
    return keys


def test_every_value_is_documented_in_install_md():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    doc = (ROOT / "docs" / "install.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", doc, flags=re.MULTILINE))
    missing = _leaf_keys(values) - documented
    assert not missing, f"values not in the docs/install.md values table: {sorted(missing)}"
