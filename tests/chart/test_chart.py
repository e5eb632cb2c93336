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
    granted,
    helm_template,
    rbac_matrix,
    render,
    run,
    set_args,
    tool,
)

CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "ValidatingAdmissionPolicy",
                  "ValidatingAdmissionPolicyBinding"}


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
    assert kinds == sorted(["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Role",
                            "RoleBinding", "Service", "Deployment", "ConfigMap", "ConfigMap",
                            "ClusterRole", "ClusterRoleBinding",  # the finalizer removals
                            "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"])
    (deploy,) = find(objects, "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/kubetune/operator:0.1.0"
    # `helm template` finds no tenant namespace (no cluster to look up): the release namespace alone
    assert container["args"] == ["--namespace", "kubetune-system"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/trainer:0.1.0"
    assert env["KUBETUNE_METRICS_PORT"] == "8080" and env["KUBETUNE_HEALTH_PORT"] == "8081"
    assert env["KUBETUNE_READY_PORT"] == "8082"
    assert env["KUBETUNE_RESYNC_SECONDS"] == "60"
    assert (env["KUBETUNE_VALIDATION_CPU"], env["KUBETUNE_VALIDATION_MEMORY"],
            env["KUBETUNE_VALIDATION_EPHEMERAL_STORAGE"], env["KUBETUNE_VALIDATION_DEADLINE_SECONDS"],
            env["KUBETUNE_VALIDATION_MAX_ATTEMPTS"]) == ("500m", "1Gi", "10Gi", "3600", "5")
    # leader election: a Lease in the operator's own namespace (the downward API), client-go's durations
    lease_ns = next(e for e in container["env"] if e["name"] == "KUBETUNE_LEASE_NAMESPACE")
    assert lease_ns["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert (env["KUBETUNE_LEASE_NAME"], env["KUBETUNE_LEASE_DURATION_SECONDS"],
            env["KUBETUNE_LEASE_RENEW_DEADLINE_SECONDS"], env["KUBETUNE_LEASE_RETRY_PERIOD_SECONDS"]) == (
        "kubetune-operator", "15", "10", "2")
    assert "POD_ID" not in env
    assert "KUBETUNE_STORAGE_ENDPOINT" not in env
    assert deploy["spec"]["replicas"] == 1
    # Optional parts stay off
    assert not find(objects, "ServiceMonitor") and not find(objects, "PodMonitor")
    assert not find(objects, "PrometheusRule")
    assert not find(objects, "KopfPeering"), "no kopf peering: a tenant could pause the operator through it"


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
    assert not find(objects, "KopfPeering")
    assert _env(objects)["KUBETUNE_LEASE_NAME"] == "kubetune-ops"


def deployment_settings(objects: list[dict], monkeypatch):
    """The operator's settings as its __main__ reads them from the rendered Deployment's environment."""
    from kubetune_operator.settings import OperatorSettings

    (deploy,) = find(objects, "Deployment")
    for var in deploy["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in var:  # not KUBETUNE_LEASE_NAMESPACE (the pod's namespace)
            monkeypatch.setenv(var["name"], var["value"])
    return OperatorSettings.from_env()


def test_the_operator_applies_the_storage_defaults_the_chart_sets(monkeypatch):
    from kubetune_operator.children import with_storage_defaults

    settings = deployment_settings(render(FULL_VALUES), monkeypatch)
    assert with_storage_defaults({}, settings)["storage"] == {
        "endpoint": "http://minio.minio:9000", "region": "eu-west-1", "secretRef": {"name": "s3-credentials"}}
    own = {"endpoint": "http://s3.local", "region": "us-east-1", "serviceAccountName": "irsa"}
    assert with_storage_defaults({"storage": own}, settings)["storage"] == own  # a job's own storage wins, as a whole


def test_the_operator_applies_the_validation_defaults_the_chart_sets(monkeypatch):
    from types import SimpleNamespace

    from kubetune_api import ValidationSpec
    from kubetune_operator.children import validation_settings

    values = {"validation.cpu": "2", "validation.memory": "4Gi", "validation.ephemeralStorage": "50Gi",
              "validation.activeDeadlineSeconds": "600"}
    settings = deployment_settings(render(values), monkeypatch)
    assert validation_settings(SimpleNamespace(validation=ValidationSpec()), settings) == {
        "cpu": "2", "memory": "4Gi", "ephemeral_storage": "50Gi", "active_deadline_seconds": 600}


def test_the_operator_estimates_with_the_gpu_tflops_the_chart_sets(monkeypatch):
    from kubetune_api import FineTuneJobSpec
    from kubetune_operator.children import trainer_config

    spec = FineTuneJobSpec.model_validate({
        "baseModel": {"uri": "s3://models/m/"}, "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/"}, "resources": {"workers": 2, "gpusPerWorker": 4}})
    for values, tflops in (({}, 400.0), ({"estimate.gpuTflops": "125"}, 125.0)):
        hardware = trainer_config("demo", spec, deployment_settings(render(values), monkeypatch)).hardware
        assert (hardware.gpu_tflops, hardware.gpus, hardware.processes) == (tflops, 8, 8)


def test_the_training_pods_linger_only_when_something_scrapes_them(monkeypatch):
    """podMonitor.enabled=false (the default): nothing scrapes the pods, so rank 0 must not wait for a scrape (the
    image's 30 s would hold every job's result); with the PodMonitor the image's own; trainer.metricsLingerSeconds
    wins either way (a scrape config of one's own)."""
    from kubetune_api import FineTuneJobSpec
    from kubetune_operator.children import training_job

    spec = FineTuneJobSpec.model_validate({
        "baseModel": {"uri": "s3://models/m/"}, "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/"}})
    for values, linger in (({}, "0"), ({"podMonitor.enabled": "true"}, None),
                           ({"trainer.metricsLingerSeconds": "20"}, "20"),
                           ({"podMonitor.enabled": "true", "trainer.metricsLingerSeconds": "0"}, "0"),
                           ({"podMonitor.enabled": "true", "trainer.metricsLingerSeconds": "7.5"}, "7.5")):
        settings = deployment_settings(render(values), monkeypatch)
        monkeypatch.delenv("KUBETUNE_TRAINER_METRICS_LINGER_SECONDS", raising=False)  # for the next render's
        (container,) = training_job({"name": "demo", "uid": "u"}, spec, settings)["spec"]["template"]["spec"][
            "containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env.get("KUBETUNE_METRICS_LINGER_SECONDS") == linger, values


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
    ("kubetune.io", "finetunejobs"): {"get", "list", "watch", "create", "patch"},  # create: a sweep's trials
    ("kubetune.io", "finetunejobs/status"): {"patch"},
    ("kubetune.io", "finetunejobs/finalizers"): {"update"},
    ("kubetune.io", "finetunesweeps"): {"get", "list", "watch", "trial"},  # trial: a sweep's trials are admitted
    ("kubetune.io", "finetunesweeps/status"): {"patch"},
    ("kubetune.io", "finetunesweeps/finalizers"): {"update"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch"},
    ("", "services"): {"get", "list", "watch", "create"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "events"): {"create"},
    ("kueue.x-k8s.io", "workloads"): {"get", "list", "watch", "patch"},
    ("networking.k8s.io", "networkpolicies"): {"get", "list", "watch", "create"},
}
POLICY_RULES = {("admissionregistration.k8s.io", "validatingadmissionpolicies"): {"get"},
                ("admissionregistration.k8s.io", "validatingadmissionpolicybindings"): {"get"}}
LEADER_RULES = {("coordination.k8s.io", "leases"): {"create", "get", "update"}}  # in the release namespace
# Bound cluster-wide, so that a deleted namespace never sticks on the operator's finalizers (docs/security.md, 2)
FINALIZER_RULES = {("kubetune.io", "finetunejobs"): {"patch"}, ("batch", "jobs"): {"patch"}}
# `python -m kubetune_operator --all-namespaces` (docs/operator.md): kopf then observes CRDs; the chart never runs it
ALL_NAMESPACES_ONLY = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}


def served_roles(objects: list[dict], kind: str = "Role") -> list[dict]:
    """The Roles (or RoleBindings) of the served namespaces, not the leader election's."""
    return [r for r in find(objects, kind) if not r["metadata"]["name"].endswith("-leader-election")]


def leader_role(objects: list[dict], kind: str = "Role") -> dict:
    (role,) = [r for r in find(objects, kind) if r["metadata"]["name"].endswith("-leader-election")]
    return role


def _served(objects: list[dict]) -> dict[str, list[str]]:
    """Every place the chart writes the served namespaces."""
    (deploy,) = find(objects, "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    (binding,) = find(objects, "ValidatingAdmissionPolicyBinding")
    (expression,) = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"]
    assert (expression["key"], expression["operator"]) == ("kubernetes.io/metadata.name", "In")
    (pm,) = find(objects, "PodMonitor")
    assert args[::2] == ["--namespace"] * (len(args) // 2), args
    return {"args": args[1::2],
            "roles": sorted(r["metadata"]["namespace"] for r in served_roles(objects)),
            "rolebindings": sorted(b["metadata"]["namespace"] for b in served_roles(objects, "RoleBinding")),
            "policy binding": expression["values"],
            "podmonitor": pm["spec"]["namespaceSelector"]["matchNames"]}


def test_the_served_namespaces_are_watch_namespaces_everywhere():
    objects = render({"watchNamespaces": "{team-b,team-a}", "podMonitor.enabled": "true"})
    places = _served(objects)
    assert places.pop("args") == ["team-b", "team-a"]
    assert all(sorted(namespaces) == ["team-a", "team-b"] for namespaces in places.values()), places


def test_without_tenant_namespaces_the_release_namespace_alone_is_served():
    """`helm template` cannot look namespaces up; an install that finds none labelled serves the same way."""
    places = _served(render({"podMonitor.enabled": "true"}, namespace="ml-platform"))
    assert all(namespaces == ["ml-platform"] for namespaces in places.values()), places


def test_the_operator_never_runs_cluster_wide():
    for values in ({}, FULL_VALUES, {"watchNamespaces": "null"}, {"leaderElection.enabled": "false"}):
        objects = render(values)
        (deploy,) = find(objects, "Deployment")
        assert "--all-namespaces" not in deploy["spec"]["template"]["spec"]["containers"][0]["args"]
        assert not find(objects, "ClusterKopfPeering")
        assert not [r for r in find(objects, "ClusterRole") if set(_rules(r)) - set(POLICY_RULES)
                    and _rules(r) != FINALIZER_RULES]


def test_podmonitor_namespaces_override_the_served_ones():
    (pm,) = find(render({"podMonitor.enabled": "true", "podMonitor.namespaces": "{monitoring-a}"}), "PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["monitoring-a"]}


def test_rbac_is_least_privilege():
    for values, served in (({}, ["kubetune-system"]), ({"watchNamespaces": "{team-a,team-b}"}, ["team-a", "team-b"])):
        objects = render(values)
        (cluster_role,) = find(objects, "ClusterRole", "kubetune")
        assert _rules(cluster_role) == POLICY_RULES  # nothing namespaced cluster-wide but the finalizer removals
        (finalizers,) = find(objects, "ClusterRole", "kubetune-finalizers")
        assert _rules(finalizers) == FINALIZER_RULES  # patch alone: no read, create or delete outside
        (binding,) = find(objects, "ClusterRoleBinding", "kubetune-finalizers")
        assert binding["roleRef"]["name"] == "kubetune-finalizers" and binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "kubetune", "namespace": "kubetune-system"}]
        for rule in cluster_role["rules"]:  # its own admission policy and binding only, by name
            if rule["apiGroups"] == ["admissionregistration.k8s.io"]:
                assert rule["resourceNames"] == ["kubetune-finetunejobs"]
        (binding,) = find(objects, "ClusterRoleBinding", "kubetune")
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "kubetune", "namespace": "kubetune-system"}]
        roles = served_roles(objects)
        assert sorted(r["metadata"]["namespace"] for r in roles) == served
        for role in roles:
            assert _rules(role) == NAMESPACED_RULES
        bindings = served_roles(objects, "RoleBinding")
        assert sorted(b["metadata"]["namespace"] for b in bindings) == served
        for binding in bindings:
            assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kubetune"}
            assert binding["subjects"] == [
                {"kind": "ServiceAccount", "name": "kubetune", "namespace": "kubetune-system"}]
        for obj in objects:  # no wildcards anywhere
            for rule in obj.get("rules", []):
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]


def test_rbac_without_the_admission_policy_is_namespaced_only_but_the_finalizer_removals():
    objects = render({"policy.admission.enabled": "false"})
    assert [_rules(r) for r in find(objects, "ClusterRole")] == [FINALIZER_RULES]
    assert [b["metadata"]["name"] for b in find(objects, "ClusterRoleBinding")] == ["kubetune-finalizers"]
    assert served_roles(objects) and leader_role(objects)


def test_the_leader_election_lease_is_the_only_right_in_the_release_namespace():
    """The operator's Lease is in its own namespace: get and update that Lease by name, create (which RBAC cannot
    limit to a name). No KopfPeering, no kopf.dev right anywhere (a tenant who may patch `kopfpeerings` in their
    namespace could pause the operator for every tenant)."""
    for values, lease in (({}, "kubetune-operator"), ({"leaderElection.leaseName": "ops-lock"}, "ops-lock")):
        objects = render({"watchNamespaces": "{team-a}", **values}, namespace="ml-platform")
        role, binding = leader_role(objects), leader_role(objects, "RoleBinding")
        assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "ml-platform"
        assert role["rules"] == [
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [lease],
             "verbs": ["get", "update"]}]
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune", "namespace": "ml-platform"}]
        assert _env(objects)["KUBETUNE_LEASE_NAME"] == lease
        assert not [r for o in objects for r in o.get("rules", []) if "kopf.dev" in r["apiGroups"]]


def test_without_leader_election_the_operator_runs_standalone():
    objects = render({"leaderElection.enabled": "false"})
    (deploy,) = find(objects, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["--namespace", "kubetune-system", "--standalone"]
    assert not [e for e in container["env"] if e["name"].startswith("KUBETUNE_LEASE_")]
    assert not [r for r in find(objects, "Role") if r["metadata"]["name"].endswith("-leader-election")]
    proc = helm_template({"leaderElection.enabled": "false", "replicas": "2"}, check=False)
    assert proc.returncode != 0 and "replicas must be 0 or 1" in proc.stderr, proc.stderr


def test_the_operator_elects_with_the_durations_the_chart_sets(monkeypatch):
    from kubetune_operator.leader import Timing

    values = {"leaderElection.leaseDurationSeconds": "30", "leaderElection.renewDeadlineSeconds": "20",
              "leaderElection.retryPeriodSeconds": "4"}
    settings = deployment_settings(render(values), monkeypatch)
    assert Timing.of(settings) == Timing(30, 20, 4) and settings.lease_name == "kubetune-operator"


def test_rbac_equals_docs_operator_md():
    """docs/operator.md (by the operator's author) lists exactly what the operator calls; the chart grants
    exactly that, split between the ClusterRole and a Role per served namespace (not the `--all-namespaces`
    peering, which the chart never runs)."""
    documented = documented_rbac()
    assert documented, "no RBAC table in docs/operator.md"
    objects = render({"watchNamespaces": "{team-a}"})
    (cluster_role,) = find(objects, "ClusterRole", "kubetune")
    (ns_role,) = served_roles(objects)
    assert {**FINALIZER_RULES, **_rules(cluster_role), **_rules(ns_role), **_rules(leader_role(objects)),
            **ALL_NAMESPACES_ONLY} == documented
    assert _rules(find(objects, "ClusterRole", "kubetune-finalizers")[0]) == FINALIZER_RULES


# The releases tests/chart/test_install.py installs, as `helm template` can render them (watchNamespaces in place
# of the tenant lookup: the same Roles), and the namespaces it checks.
MATRIX_RELEASES = {"cluster-wide": ("kubetune", "kubetune-system", "ml-team"),
                   "scoped": ("kubetune-scoped", "kubetune-scoped-system", "team-x")}


def test_rbac_equals_the_committed_matrix():
    """tests/chart/rbac-expected.yaml, which test_install.py compares with `kubectl auth can-i --list`: a rule
    added to the chart without it fails here already."""
    matrix = rbac_matrix()
    assert set(matrix) == set(MATRIX_RELEASES)
    for mode, (release, namespace, served) in MATRIX_RELEASES.items():
        objects = render({"watchNamespaces": f"{{{served}}}"}, release=release, namespace=namespace)
        cluster_roles = find(objects, "ClusterRole")
        (role,) = served_roles(objects)
        assert matrix[mode] == {"served": granted(*cluster_roles, role), "kube-system": granted(*cluster_roles),
                                "unserved": granted(*cluster_roles),
                                "operator": granted(*cluster_roles, leader_role(objects))}, mode


# -- the admission policy -------------------------------------------------------------------------------------


def _env(objects: list[dict]) -> dict[str, str]:
    (deploy,) = find(objects, "Deployment")
    return {e["name"]: e["value"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}


def test_the_admission_policy_is_the_generated_one_under_the_releases_name():
    generated = yaml.safe_load((CHART / "files" / "admission-policy.yaml").read_text())
    objects = render(release="ml", namespace="ml-platform")
    (policy,) = find(objects, "ValidatingAdmissionPolicy")
    assert policy["metadata"]["name"] == "ml-kubetune-finetunejobs"
    assert policy["spec"] == generated["spec"]
    assert policy["metadata"]["labels"]["app.kubernetes.io/instance"] == "ml"
    (binding,) = find(objects, "ValidatingAdmissionPolicyBinding")
    assert binding["metadata"]["name"] == "ml-kubetune-finetunejobs"
    assert binding["spec"]["policyName"] == "ml-kubetune-finetunejobs"
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["paramRef"] == {"name": "ml-kubetune-policy", "namespace": "ml-platform",
                                           "parameterNotFoundAction": "Deny"}
    (params,) = find(objects, "ConfigMap", "ml-kubetune-policy")
    assert params["metadata"]["namespace"] == "ml-platform"
    assert _env(objects)["KUBETUNE_POLICY_BINDING"] == "ml-kubetune-finetunejobs"
    (cluster_role,) = find(objects, "ClusterRole", "ml-kubetune")
    assert {n for r in cluster_role["rules"] for n in r.get("resourceNames", [])} == {"ml-kubetune-finetunejobs"}


def test_policy_parameters_default_to_the_trainer_image_and_no_default_credentials():
    objects = render({"trainer.image.repository": "registry.example.com/ml/trainer", "storage.secretName": "s3"})
    (params,) = find(objects, "ConfigMap", "kubetune-policy")
    assert params["data"] == {"imagePrefixes": "registry.example.com/ml/trainer", "credentialsSecret": "s3",
                              "credentialsNamespaces": "", "allowTrustRemoteCode": "false", "storagePrefixes": "",
                              "defaultEndpoint": "", "storageEndpoints": "",
                              "nodeSelectors": "", "tolerations": "", "gpuResourceNames": "nvidia.com/gpu",
                              "maxTerminationGracePeriodSeconds": "3600", "requireQueue": "false"}
    env = _env(objects)
    assert (env["KUBETUNE_POLICY_IMAGE_PREFIXES"], env["KUBETUNE_POLICY_CREDENTIALS_NAMESPACES"],
            env["KUBETUNE_POLICY_ALLOW_TRUST_REMOTE_CODE"]) == ("registry.example.com/ml/trainer", "", "false")


POLICY_ENV = ["KUBETUNE_POLICY_IMAGE_PREFIXES", "KUBETUNE_POLICY_CREDENTIALS_NAMESPACES",
              "KUBETUNE_POLICY_ALLOW_TRUST_REMOTE_CODE", "KUBETUNE_POLICY_BINDING", "KUBETUNE_STORAGE_SECRET_NAME",
              "KUBETUNE_POLICY_NODE_SELECTORS", "KUBETUNE_POLICY_TOLERATIONS", "KUBETUNE_POLICY_GPU_RESOURCE_NAMES",
              "KUBETUNE_POLICY_MAX_GRACE_SECONDS", "KUBETUNE_POLICY_REQUIRE_QUEUE",
              "KUBETUNE_POLICY_STORAGE_PREFIXES", "KUBETUNE_POLICY_STORAGE_ENDPOINTS", "KUBETUNE_STORAGE_ENDPOINT"]


def test_the_operator_enforces_the_parameters_the_policy_gets(monkeypatch):
    """The operator's own rules (KUBETUNE_POLICY_*, KUBETUNE_STORAGE_SECRET_NAME) and the API server's (the
    params ConfigMap) come from the same values."""
    from kubetune_operator.settings import OperatorSettings

    for values in ({}, FULL_VALUES, {"policy.defaultCredentialsNamespaces": "{*}", "storage.secretName": "s3"}):
        objects = render(values)
        for name in POLICY_ENV:
            monkeypatch.delenv(name, raising=False)
        for name, value in _env(objects).items():
            monkeypatch.setenv(name, value)
        (params,) = find(objects, "ConfigMap", "kubetune-policy")
        settings = OperatorSettings.from_env().policy
        assert settings.params() == params["data"], values
        assert settings.binding == "kubetune-finetunejobs"
    assert params["data"]["credentialsNamespaces"] == "*"


def test_full_values_policy():
    (params,) = find(render(FULL_VALUES), "ConfigMap", "kubetune-policy")
    assert params["data"] == {"imagePrefixes": "registry.example.com/ml/,ghcr.io/kubetune/trainer",
                              "credentialsSecret": "s3-credentials", "credentialsNamespaces": "team-a",
                              "allowTrustRemoteCode": "true", "storagePrefixes": "s3://ml-{namespace}/,hf://",
                              "defaultEndpoint": "http://minio.minio:9000",
                              "storageEndpoints": "https://s3.eu-west-1.amazonaws.com",
                              "nodeSelectors": "kubetune.io/pool=training,topology.kubernetes.io/zone",
                              "tolerations": "nvidia.com/gpu:NoSchedule,kubetune.io/pool=training",
                              "gpuResourceNames": "nvidia.com/gpu,amd.com/gpu",
                              "maxTerminationGracePeriodSeconds": "900", "requireQueue": "true"}


def test_the_admission_policy_can_be_left_out():
    objects = render({"policy.admission.enabled": "false"})
    assert not find(objects, "ValidatingAdmissionPolicy") and not find(objects, "ValidatingAdmissionPolicyBinding")
    assert not find(objects, "ConfigMap", "kubetune-policy")
    env = _env(objects)
    assert "KUBETUNE_POLICY_BINDING" not in env  # the operator enforces the rules itself, author checks refused
    assert env["KUBETUNE_POLICY_IMAGE_PREFIXES"] == "ghcr.io/kubetune/trainer"


@pytest.mark.parametrize("values, message", [
    ({"replicas": "two"}, "replicas"),
    ({"resyncSeconds": "0"}, "resyncSeconds"),
    ({"readyPort": "0"}, "readyPort"),
    ({"validation.memory": "lots"}, "memory"),
    ({"validation.activeDeadlineSeconds": "30"}, "activeDeadlineSeconds"),  # the CRD: at least 60
    ({"validation.gpu": "1"}, "gpu"),
    ({"estimate.gpuTflops": "0"}, "gpuTflops"),
    ({"estimate.gpuTflops": "fast"}, "gpuTflops"),
    ({"trainer.metricsLingerSeconds": "-1"}, "metricsLingerSeconds"),
    ({"trainer.metricsLingerSeconds": "soon"}, "metricsLingerSeconds"),
    ({"image.pullPolicy": "Sometimes"}, "pullPolicy"),
    ({"watchNamespaces": "{Team_A}"}, "watchNamespaces"),
    ({"prometheusRule.trainingStalledFor": "fifteen minutes"}, "trainingStalledFor"),
    ({"image.digest": "latest"}, "digest"),
    ({"unknownKey": "1"}, "unknownKey"),
    ({"policy.admission.enabled": "maybe"}, "enabled"),
    ({"policy.allowedImagePrefixes": "{ghcr.io/a b}"}, "allowedImagePrefixes"),
    ({"policy.defaultCredentialsNamespaces": "{Team_A}"}, "defaultCredentialsNamespaces"),
    ({"policy.allowTrustRemoteCode": "yes"}, "allowTrustRemoteCode"),
    ({"policy.allowedNodeSelectors": "{gpu type=a}"}, "allowedNodeSelectors"),
    ({"policy.allowedNodeSelectors": "{a\\,b}"}, "allowedNodeSelectors"),
    ({"policy.allowedTolerations": "{nvidia.com/gpu:Never}"}, "allowedTolerations"),
    ({"policy.allowedTolerations": "{:NoSchedule}"}, "allowedTolerations"),
    ({"policy.allowedGPUResourceNames": "{nvidia gpu}"}, "allowedGPUResourceNames"),
    ({"policy.maxTerminationGracePeriodSeconds": "86401"}, "maxTerminationGracePeriodSeconds"),
    ({"policy.requireQueue": "yes"}, "requireQueue"),
    ({"tenants.excludedNamespaces": "{Kube_System}"}, "excludedNamespaces"),
    ({"tenants.namespaceSelector.matchExpressions[0].key": "team"}, "matchExpressions"),
    ({"leaderElection.enabled": "sometimes"}, "enabled"),
    ({"leaderElection.leaseName": "Kubetune_Lock"}, "leaseName"),
    ({"leaderElection.renewDeadlineSeconds": "0"}, "renewDeadlineSeconds"),
    ({"leaderElection.peering": "true"}, "peering"),
])
def test_schema_rejects_bad_values(values, message):
    proc = helm_template(values, check=False)
    assert proc.returncode != 0, f"helm template accepted {values}"
    assert "schema" in proc.stderr and message in proc.stderr, proc.stderr


VENDORED_CRDS: list[str] = []  # CRDs in the chart only (none since kopf peering gave way to a Lease)


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


def test_crd_has_the_short_name_notes_uses():
    crd = yaml.safe_load((CHART / "crds" / "kubetune.io_finetunejobs.yaml").read_text())
    assert "ftj" in crd["spec"]["names"].get("shortNames", []), "NOTES.txt tells users `kubectl get ftj`"


def test_dashboard_configmap_carries_the_sidecar_label_and_json():
    (cm,) = find(render(), "ConfigMap", "kubetune-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["kubetune.json"].strip() == (CHART / "dashboards" / "kubetune.json").read_text().strip()
    (cm,) = find(render({"dashboard.label": "dash", "dashboard.labelValue": "yes",
                         "dashboard.namespace": "monitoring"}), "ConfigMap", "kubetune-dashboard")
    assert cm["metadata"]["labels"]["dash"] == "yes" and cm["metadata"]["namespace"] == "monitoring"
    assert not find(render({"dashboard.enabled": "false"}), "ConfigMap", "kubetune-dashboard")


# Values documented as a whole (a Kubernetes object, not chart settings)
WHOLE = {"prometheus", "resources", "podSecurityContext", "securityContext", "strategy", "selector", "livenessProbe",
         "readinessProbe", "namespaceSelector"}


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


def test_each_job_gets_a_network_policy_the_operator_may_create(monkeypatch):
    """networkPolicy.*: the operator gets the selectors of its own pods (the release namespace, the Deployment's
    pod labels) and of Prometheus, and the right to create NetworkPolicies; `enabled: false` takes both away."""
    from kubetune_operator.children import network_policy

    objects = render({"networkPolicy.prometheus.namespaceSelector.team": "observability"})
    settings = deployment_settings(objects, monkeypatch)
    (deploy,) = find(objects, "Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert settings.network_policy and settings.network_operator_namespace == deploy["metadata"]["namespace"]
    assert dict(settings.network_operator_pods).items() <= pod_labels.items()
    assert dict(settings.network_operator_pods) == deploy["spec"]["selector"]["matchLabels"]
    policy = network_policy({"name": "demo", "namespace": "ml-team", "uid": "u"}, settings)
    operator_peer, prometheus_peer = policy["spec"]["ingress"][1]["from"]
    assert prometheus_peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring",
                                                                   "team": "observability"}
    for role in served_roles(objects):
        assert "create" in _rules(role)[("networking.k8s.io", "networkpolicies")]

    objects = render({"networkPolicy.enabled": "false"})
    assert not deployment_settings(objects, monkeypatch).network_policy
    for role in served_roles(objects):
        assert _rules(role)[("networking.k8s.io", "networkpolicies")] == {"get", "list", "watch"}
