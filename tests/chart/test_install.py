"""`helm install` of charts/kubetune into the local control plane, a real training run, and a real Prometheus.

* Release `kubetune` (no watchNamespaces, values from tests/chart/local-values.yaml) serves the tenant namespaces:
  ml-team, labelled before the install (kube-system is labelled too, and excluded). Its operator Deployment runs as a
  pod on the node agent, the image mapped to this repo's .venv running the operator Dockerfile's ENTRYPOINT with
  the chart's args, in-cluster config from the pod's ServiceAccount token. A FineTuneJob that leaves out `image`
  and `storage` (the chart's defaults) trains the tiny model with the real trainer (the trainer Dockerfile's
  ENTRYPOINT, `kubetune launch`) to Succeeded: the chart's RBAC suffices.
* Release `kubetune-scoped` (watchNamespaces, replicas 0): its namespaced RBAC only.
* `kubectl auth can-i --as` each operator ServiceAccount, in a served namespace, kube-system and an unserved one:
  exactly the committed matrix tests/chart/rbac-expected.yaml, and none of a list of things it must never do.
* Prometheus (/usr/bin/prometheus) scrapes the operator pod and rank 0 every second, selected by the relabelings
  the Prometheus Operator generates from the chart's ServiceMonitor and PodMonitor, over targets with the labels
  Kubernetes discovery gives them (tests/chart/monitoring.py: Debian's Prometheus has no kubernetes_sd_configs,
  so file_sd_configs are written from the API server every second). Then every dashboard panel query and every
  alert expression runs against it.
"""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from kubetune_api import StorageEndpoint
from kubetune_dashboard import panel_queries, substitute
from kubetune_dashboard.alerts import render_rules
from kubetune_dev.cluster.agent_pod import ImageRule
from kubetune_dev.s3server import FAKE_CREDENTIALS
from kubetune_trainer.storage import Storage

from tests.chart.conftest import CHART, ROOT, Prometheus, entrypoint, rbac_matrix, tool
from tests.chart.monitoring import KubernetesTargets, scrape_config
from tests.kube import free_port, get_json, kubectl, wait_for
from tests.operator_tests.test_e2e import credentials, submit, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]

VALUES = Path(__file__).with_name("local-values.yaml")
RELEASE, SYSTEM_NS, JOB_NS, JOB = "kubetune", "kubetune-system", "ml-team", "support-bot"
SCOPED, SCOPED_NS, TEAM_NS = "kubetune-scoped", "kubetune-scoped-system", "team-x"
TENANT_LABEL = "kubetune.io/tenant"  # values.yaml: tenants.namespaceSelector
OPERATOR_IMAGE = "ghcr.io/kubetune/operator:chart-e2e"
TRAINER_IMAGE = "ghcr.io/kubetune/trainer:chart-e2e"
SCRAPE_S = 1  # local-values.yaml: the monitors' interval
GPU_PANELS = {"GPU memory used", "GPU utilization"}  # no data without a GPU: only checked to be valid there
# Data from a dpo or orpo run only (this job is sft): the query is checked to be valid here, and to return data
# from a real Prometheus in tests/chart/test_dashboard.py.
PREFERENCE_PANELS = {"Objective metrics"}
# The Sweeps row: data from a FineTuneSweep only (none runs here); checked to be valid here, and to return data from
# a real Prometheus in tests/chart/test_dashboard.py.
SWEEP_PANELS = {"Trials by phase", "Best so far", "GPU-hours", "Trial validation curves"}


@functools.cache
def gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def helm(cp, *args: str, check: bool = True) -> str:
    out = subprocess.run([tool("helm"), "--kubeconfig", str(cp.kubeconfig), *args], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 or not check, f"helm {' '.join(args)}: {out.stderr}"
    return out.stdout


def image_rule(image: str, dockerfile: Path, **env: str) -> ImageRule:
    """`image` runs the Dockerfile's ENTRYPOINT from this repo's .venv (the pod gives the args)."""
    return ImageRule(match=image, path=[str(Path(sys.executable).parent)], working_dir=str(ROOT),
                     env={"PYTHONUNBUFFERED": "1", **env}, entrypoint=entrypoint(dockerfile))


@pytest.fixture(scope="module")
def training_data(s3_server, tmp_path_factory) -> dict:
    from kubetune_dev.demo_data import generic_texts, write_support_dataset
    from kubetune_dev.tiny import make_tiny_base

    bucket, tmp = f"chart-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("data")
    s3_server.create_bucket(bucket)
    storage = Storage(StorageEndpoint(endpoint=s3_server.endpoint))
    base = make_tiny_base(tmp / "tiny", generic_texts(50), vocab_size=512, hidden_size=32, layers=1, heads=2)
    storage.upload_dir(base, f"s3://{bucket}/model/")
    for split, path in write_support_dataset(tmp / "data", train=32, validation=8, test=8).items():
        storage.upload_file(path, f"s3://{bucket}/data/{split}.jsonl")
    return {"model": f"s3://{bucket}/model/", "data": f"s3://{bucket}/data/", "output": f"s3://{bucket}/out/",
            "endpoint": s3_server.endpoint}


@pytest.fixture(scope="module")
def release(control_plane, node_agent, s3_server) -> list[str]:
    """Both releases installed; yields the value arguments of `kubetune`. Uninstalls everything afterwards."""
    cp = control_plane
    rules = [image_rule(OPERATOR_IMAGE, ROOT / "Dockerfile"),
             # the image lingers 30 s; 3 s are three scrapes here
             image_rule(TRAINER_IMAGE, ROOT / "trainer-image" / "Dockerfile", KUBETUNE_METRICS_LINGER_SECONDS="3")]
    node_agent.image_rules[:0] = rules
    crds = {c["metadata"]["name"] for c in get_json(cp, "crds")["items"]}
    values = ["-f", str(VALUES), "--set", f"metricsPort={free_port()}", "--set", f"healthPort={free_port()}",
              "--set", f"trainer.metricsPort={free_port()}",  # the pods share the host's ports with other tests
              "--set", f"readyPort={free_port()}",
              "--set", f"storage.endpoint={s3_server.endpoint}"]
    try:
        for ns in (JOB_NS, TEAM_NS):
            kubectl(cp, "create", "namespace", ns)
        # the tenants, labelled before the install finds them; kube-system too, which the chart excludes
        for ns in (JOB_NS, "kube-system"):
            kubectl(cp, "label", "namespace", ns, f"{TENANT_LABEL}=enabled", "--overwrite")
        credentials(cp, JOB_NS)  # Secret s3-credentials: the chart's storage.secretName
        helm(cp, "install", RELEASE, str(CHART), "-n", SYSTEM_NS, "--create-namespace", "--wait", "--timeout", "3m",
             *values)
        helm(cp, "install", SCOPED, str(CHART), "-n", SCOPED_NS, "--create-namespace", "--set", "replicas=0",
             "--set", f"watchNamespaces={{{TEAM_NS}}}")
        yield values
    finally:
        # FineTuneJobs first, while the operator runs and its Role in JOB_NS exists: it removes kopf's finalizer
        # (deleting the namespace would delete that Role too, in the same pass, and leave the jobs stuck).
        kubectl(cp, "delete", "finetunejobs", "--all", "-n", JOB_NS, "--wait", "--timeout=120s", check=False)
        kubectl(cp, "delete", "namespace", JOB_NS, "--wait", "--timeout=120s", check=False)
        for name, ns in ((RELEASE, SYSTEM_NS), (SCOPED, SCOPED_NS)):
            helm(cp, "uninstall", name, "-n", ns, "--wait", "--ignore-not-found", check=False)
        kubectl(cp, "delete", "namespace", SYSTEM_NS, SCOPED_NS, TEAM_NS, "--wait=false", check=False)
        kubectl(cp, "label", "namespace", "kube-system", f"{TENANT_LABEL}-", check=False)
        new_crds = {c["metadata"]["name"] for c in get_json(cp, "crds")["items"]} - crds
        if new_crds:  # what Helm installed from crds/: leave the cluster as we found it
            kubectl(cp, "delete", "crd", *sorted(new_crds), check=False)
        for rule in rules:
            node_agent.image_rules.remove(rule)


def operator_pod(cp) -> dict:
    (pod,) = get_json(cp, "pods", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/component=operator")["items"]
    return pod


@pytest.fixture(scope="module")
def prometheus(control_plane, release, tmp_path_factory):
    # --dry-run=server: the chart looks the tenant namespaces up, as the install did (the PodMonitor's namespaces)
    rendered = helm(control_plane, "template", RELEASE, str(CHART), "-n", SYSTEM_NS, *release, "--dry-run=server",
                    "--set", "serviceMonitor.enabled=true", "--set", "podMonitor.enabled=true",
                    "--show-only", "templates/servicemonitor.yaml", "--show-only", "templates/podmonitor.yaml")
    monitors = [doc for doc in yaml.safe_load_all(rendered) if doc]
    assert sorted(m["kind"] for m in monitors) == ["PodMonitor", "ServiceMonitor"]
    (pod_monitor,) = [m for m in monitors if m["kind"] == "PodMonitor"]
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": [JOB_NS]}
    work = tmp_path_factory.mktemp("prometheus")
    configs = [scrape_config(m, work / f"targets-{i}.json") for i, m in enumerate(monitors)]
    with control_plane.api_client() as api:
        targets = KubernetesTargets(api, configs)
        targets.start()
        rules = work / "kubetune.rules.yaml"  # the chart's alerts, as `make alerts` renders them
        rules.write_text(yaml.safe_dump(render_rules(release=RELEASE, namespace=SYSTEM_NS)))
        config = {"global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
                  "rule_files": [str(rules)],
                  "scrape_configs": [{k: v for k, v in c.items() if not k.startswith("_")} for c in configs]}
        server = Prometheus(work / "data", yaml.safe_dump(config))
        try:
            server.wait_ready()
            yield server
        finally:
            server.stop()
            targets.stop()


@pytest.fixture(scope="module")
def finished(control_plane, release, prometheus, training_data) -> dict:
    """The FineTuneJob, once Succeeded. It sets neither `image` nor `storage`: the chart's defaults give both."""
    d = training_data["data"]
    submit(control_plane, JOB_NS, JOB, {
        "baseModel": {"uri": training_data["model"]},
        "dataset": {"train": f"{d}train.jsonl", "validation": f"{d}validation.jsonl", "test": f"{d}test.jsonl"},
        "hyperparameters": {"maxSteps": 6, "batchSize": 2, "maxSeqLength": 256, "loggingSteps": 1},
        "evaluation": {"everySteps": 3}, "checkpoint": {"everySteps": 2}, "output": {"uri": training_data["output"]},
        "resources": {"workers": 1, "gpusPerWorker": 1 if gpu() else 0},
    })
    ftj = wait_phase(control_plane, JOB_NS, JOB, ("Succeeded", "Failed"), timeout=600)
    assert ftj["status"]["phase"] == "Succeeded", ftj["status"]
    return ftj


# -- the release ---------------------------------------------------------------------------------------------------


def test_the_operator_runs_as_a_pod_with_its_service_account(control_plane, node_agent, release):
    deploy = get_json(control_plane, "deployment", "-n", SYSTEM_NS, RELEASE)
    assert deploy["status"].get("readyReplicas") == 1
    pod = operator_pod(control_plane)
    spec, (container,) = pod["spec"], pod["spec"]["containers"]
    assert spec["serviceAccountName"] == RELEASE and pod["status"]["phase"] == "Running"
    assert (container["image"], container["args"]) == (OPERATOR_IMAGE, ["--namespace", JOB_NS, "--verbose"])
    assert any("serviceAccountToken" in source for volume in spec["volumes"]
               for source in volume.get("projected", {}).get("sources", [])), "no ServiceAccount token volume"
    assert "KUBECONFIG" not in {e["name"] for e in container["env"]}
    name = pod["metadata"]["name"]
    wait_for("kopf to log in", lambda: "configured in cluster with service account" in node_agent.logs(SYSTEM_NS, name),
             timeout=60)


def test_the_release_serves_the_labelled_namespaces_but_the_excluded_ones(control_plane, release):
    """Helm's lookup found ml-team and kube-system labelled; kube-system is in tenants.excludedNamespaces."""
    def namespaces(kind: str) -> list[str]:
        items = get_json(control_plane, kind, "-A", "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]
        return sorted(o["metadata"]["namespace"] for o in items)

    served = f"app.kubernetes.io/instance={RELEASE}"
    roles = get_json(control_plane, "roles", "-A", "-l", served)["items"]
    assert sorted((r["metadata"]["namespace"], r["metadata"]["name"]) for r in roles) == [
        (SYSTEM_NS, f"{RELEASE}-leader-election"), (JOB_NS, RELEASE)]
    assert namespaces("roles") == namespaces("rolebindings") == sorted([JOB_NS, SYSTEM_NS])
    binding = get_json(control_plane, "validatingadmissionpolicybinding", f"{RELEASE}-finetunejobs")
    (expression,) = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"]
    assert expression["values"] == [JOB_NS]
    assert binding["spec"]["paramRef"]["namespace"] == SYSTEM_NS
    get_json(control_plane, "validatingadmissionpolicy", f"{RELEASE}-finetunejobs")
    params = get_json(control_plane, "configmap", "-n", SYSTEM_NS, f"{RELEASE}-policy")["data"]
    assert params["credentialsNamespaces"] == JOB_NS and params["credentialsSecret"] == "s3-credentials"


# -- RBAC: kubectl auth can-i as the operator's ServiceAccounts ------------------------------------------------------

OPERATOR = f"system:serviceaccount:{SYSTEM_NS}:{RELEASE}"
SCOPED_OPERATOR = f"system:serviceaccount:{SCOPED_NS}:{SCOPED}"
# tests/chart/rbac-expected.yaml: each release's ServiceAccount, and the namespaces its entries are measured in
MATRIX = {"cluster-wide": (OPERATOR, {"served": JOB_NS, "kube-system": "kube-system", "unserved": TEAM_NS,
                                      "operator": SYSTEM_NS}),
          "scoped": (SCOPED_OPERATOR, {"served": TEAM_NS, "kube-system": "kube-system", "unserved": JOB_NS,
                                       "operator": SCOPED_NS})}


def can_i(cp, user: str, verb: str, resource: str, *args: str) -> bool:
    out = kubectl(cp, "auth", "can-i", verb, resource, *args, "--as", user, check=False)
    assert out.stdout.strip() in ("yes", "no"), out.stderr
    if "doesn't have a resource type" in out.stderr:  # not installed: kubectl asked for that whole name in core
        return _access_review(cp, user, verb, resource, *args)
    return out.stdout.strip() == "yes"


def _access_review(cp, user: str, verb: str, resource: str, *args: str) -> bool:
    """What `kubectl auth can-i` asks (a SelfSubjectAccessReview, impersonating `user`), for a `<plural>.<group>`
    that discovery does not show: Kueue's Workloads where Kueue is not installed (RBAC grants them all the same)."""
    name, _, obj = resource.partition("/")
    plural, _, group = name.partition(".")
    attributes = {"verb": verb, "group": group, "resource": plural, "namespace": "default"}
    if obj:
        attributes["name"] = obj
    rest = iter(args)
    for arg in rest:
        if arg.startswith("--subresource="):
            attributes["subresource"] = arg.removeprefix("--subresource=")
        elif arg == "-n":
            attributes["namespace"] = next(rest)
        elif arg == "--all-namespaces":
            attributes["namespace"] = ""
        else:
            raise AssertionError(f"can_i: {arg}?")
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
              "spec": {"resourceAttributes": attributes}}
    out = kubectl(cp, "create", "--validate=false", "-f", "-", "-o", "json", "--as", user, stdin=json.dumps(review))
    return json.loads(out.stdout)["status"].get("allowed", False)


def _rules_list(cp, user: str, namespace: str) -> dict[str, set[str]]:
    """`kubectl auth can-i --list`: resource (`<resource> [<names>]` when restricted to named objects) -> verbs,
    less what every ServiceAccount may do (self reviews, ClusterTrustBundles: the `default` ServiceAccount's list)."""
    def rules(user: str) -> dict[str, set[str]]:
        out = kubectl(cp, "auth", "can-i", "--list", "-n", namespace, "--as", user).stdout
        found: dict[str, set[str]] = {}
        for resource, names, verbs in re.findall(r"^(\S+)\s+\[[^]]*\]\s+\[([^]]*)\]\s+\[([^]]*)\]$", out, flags=re.M):
            key = f"{resource} [{' '.join(sorted(names.split()))}]" if names else resource
            found.setdefault(key, set()).update(verbs.split())
        return found

    everyone = rules(f"system:serviceaccount:{namespace}:default")
    granted = {r: verbs - everyone.get(r, set()) for r, verbs in rules(user).items()}
    return {r: verbs for r, verbs in granted.items() if verbs}


def test_the_operators_rules_are_exactly_the_committed_matrix(control_plane, release):
    """A permission added to the chart (or taken away) without updating tests/chart/rbac-expected.yaml fails."""
    measured = {mode: {where: _rules_list(control_plane, user, ns) for where, ns in places.items()}
                for mode, (user, places) in MATRIX.items()}
    listing = {mode: {where: {r: sorted(v) for r, v in rules.items()} for where, rules in places.items()}
               for mode, places in measured.items()}
    assert measured == rbac_matrix(), "kubectl auth can-i --list measured:\n" + yaml.safe_dump(listing)


def test_the_operator_can_do_what_the_matrix_lists(control_plane, release):
    """Each entry, asked one by one (a SubjectAccessReview, where --list is a SelfSubjectRulesReview)."""
    refused = []
    for mode, (user, places) in MATRIX.items():
        for where, rules in rbac_matrix()[mode].items():
            for resource, verbs in rules.items():
                name, _, names = resource.partition(" [")
                base, _, sub = name.partition("/")
                targets = [f"{base}/{n}" for n in names.rstrip("]").split()] or [base]
                args = [f"--subresource={sub}"] if sub else []
                refused += [(user, where, verb, target) for verb in verbs for target in targets
                            if not can_i(control_plane, user, verb, target, *args, "-n", places[where])]
    assert not refused


# Things the operator never needs: Secrets, pods of its own, exec/logs, nodes, RBAC, tokens, deletes (but of Jobs),
# CRD writes, its admission policy's writes, Kueue's objects (but a Workload's get/list/watch/patch).
NEVER = [
    ("get", "secrets"), ("list", "secrets"), ("watch", "secrets"),
    ("create", "pods"), ("delete", "pods"), ("create", "pods", "--subresource=exec"),
    ("get", "pods", "--subresource=log"), ("delete", "nodes"), ("get", "nodes", "--subresource=proxy"),
    ("create", "roles.rbac.authorization.k8s.io"), ("bind", "clusterroles.rbac.authorization.k8s.io"),
    ("escalate", "roles.rbac.authorization.k8s.io"), ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("impersonate", "serviceaccounts"), ("create", "serviceaccounts", "--subresource=token"),
    # (it creates FineTuneJobs: a FineTuneSweep's trials; the admission policy judges them against the operator,
    # which holds none of the rights the author-dependent rules ask for, so a trial can do no more than that)
    ("update", "finetunejobs.kubetune.io"),
    ("delete", "finetunejobs.kubetune.io"), ("patch", "services"), ("patch", "events"),
    ("update", "jobs.batch"), ("deletecollection", "jobs.batch"), ("delete", "configmaps"),
    ("update", "configmaps"), ("delete", "services"), ("update", "services"), ("delete", "events"),
    ("list", "namespaces"), ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ("list", "customresourcedefinitions.apiextensions.k8s.io"),
    ("delete", "clusterkopfpeerings.kopf.dev"), ("patch", "clusterkopfpeerings.kopf.dev"),
    ("patch", "kopfpeerings.kopf.dev"), ("list", "kopfpeerings.kopf.dev"),
    ("delete", "leases.coordination.k8s.io"), ("list", "leases.coordination.k8s.io"),
    ("list", "validatingadmissionpolicies.admissionregistration.k8s.io"),
    ("create", "validatingadmissionpolicybindings.admissionregistration.k8s.io"),
    ("use", "priorityclasses.scheduling.k8s.io"), ("use", "persistentvolumeclaims"),
    ("create", "workloads.kueue.x-k8s.io"), ("delete", "workloads.kueue.x-k8s.io"),
    ("update", "workloads.kueue.x-k8s.io"), ("patch", "workloads.kueue.x-k8s.io", "--subresource=status"),
    ("list", "localqueues.kueue.x-k8s.io"), ("get", "clusterqueues.kueue.x-k8s.io"),
    ("*", "*"),
]
# With tenant namespaces: nothing namespaced in kube-system (labelled, but excluded), in a namespace that is not a
# tenant, or in the release namespace (the policy's parameters); its own admission policy read-only.
CLUSTER_WIDE_NEVER = [
    ("create", "jobs.batch", "-n", "kube-system"), ("patch", "configmaps", "-n", "kube-system"),
    ("list", "configmaps", "--all-namespaces"), ("list", "pods", "-n", "kube-system"),
    ("list", "jobs.batch", "--all-namespaces"), ("list", "finetunejobs.kubetune.io", "--all-namespaces"),
    ("create", "jobs.batch", "-n", TEAM_NS), ("list", "pods", "-n", "default"), ("create", "events", "-n", TEAM_NS),
    ("patch", "configmaps", "-n", SYSTEM_NS), ("get", "configmaps", "-n", SYSTEM_NS),
    ("list", "kopfpeerings.kopf.dev", "--all-namespaces"), ("patch", "kopfpeerings.kopf.dev", "-n", "kube-system"),
    ("update", "leases.coordination.k8s.io/kube-controller-manager", "-n", "kube-system"),
    ("update", f"leases.coordination.k8s.io/{SCOPED}-operator", "-n", SCOPED_NS),
    ("get", f"leases.coordination.k8s.io/{RELEASE}-operator", "-n", JOB_NS),
    ("update", "leases.coordination.k8s.io/another-lease", "-n", SYSTEM_NS),
    ("list", "workloads.kueue.x-k8s.io", "--all-namespaces"), ("patch", "workloads.kueue.x-k8s.io", "-n", TEAM_NS),
    ("patch", f"validatingadmissionpolicybindings.admissionregistration.k8s.io/{RELEASE}-finetunejobs"),
    ("delete", f"validatingadmissionpolicies.admissionregistration.k8s.io/{RELEASE}-finetunejobs"),
    ("get", f"validatingadmissionpolicies.admissionregistration.k8s.io/{SCOPED}-finetunejobs"),
]
# With watchNamespaces, nothing outside those namespaces.
SCOPED_NEVER = [
    ("list", "finetunejobs.kubetune.io", "--all-namespaces"), ("create", "jobs.batch", "-n", JOB_NS),
    ("list", "pods", "-n", "default"), ("create", "events", "-n", JOB_NS), ("patch", "configmaps", "-n", JOB_NS),
    ("watch", "jobs.batch", "-n", JOB_NS), ("delete", "jobs.batch", "-n", JOB_NS),
    ("create", "jobs.batch", "-n", "kube-system"), ("list", "kopfpeerings.kopf.dev", "--all-namespaces"),
    ("patch", "workloads.kueue.x-k8s.io", "-n", JOB_NS), ("list", "workloads.kueue.x-k8s.io", "--all-namespaces"),
]


def test_the_operator_cannot_do_anything_else(control_plane, release):
    allowed = [(OPERATOR, *c) for c in NEVER if can_i(control_plane, OPERATOR, *c, "-n", JOB_NS)]
    allowed += [(SCOPED_OPERATOR, *c) for c in NEVER if can_i(control_plane, SCOPED_OPERATOR, *c, "-n", TEAM_NS)]
    allowed += [(OPERATOR, *c) for c in CLUSTER_WIDE_NEVER if can_i(control_plane, OPERATOR, *c)]
    allowed += [(SCOPED_OPERATOR, *c) for c in SCOPED_NEVER if can_i(control_plane, SCOPED_OPERATOR, *c)]
    assert not allowed


# -- a training run ----------------------------------------------------------------------------------------------


def test_a_finetunejob_succeeds_with_the_charts_defaults(control_plane, node_agent, s3_server, training_data,
                                                         finished):
    status = finished["status"]
    assert status["result"]["adapterUri"] == training_data["output"]
    manifest = Storage(StorageEndpoint(endpoint=s3_server.endpoint)).get_json(status["result"]["manifestUri"])
    assert manifest["steps"] == 6 and manifest["metrics"]["test"]["loss"] > 0
    # trainer.image, storage.endpoint/region/secretName of the chart
    train = get_json(control_plane, "job", "-n", JOB_NS, f"{JOB}-train-1")["spec"]["template"]["spec"]
    (container,) = train["containers"]
    assert container["image"] == TRAINER_IMAGE
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e
               and "secretKeyRef" in e["valueFrom"]}
    assert secrets == {"s3-credentials"}
    config = yaml.safe_load(get_json(control_plane, "configmap", "-n", JOB_NS, f"{JOB}-config")["data"]["trainer.yaml"])
    assert config["storage"]["endpoint"] == s3_server.endpoint and config["storage"]["region"] == "us-east-1"
    # the chart's RBAC sufficed for the whole run, and no credentials reached the operator's log
    log = node_agent.logs(SYSTEM_NS, operator_pod(control_plane)["metadata"]["name"])
    refused = [line for line in log.splitlines() if "Forbidden" in line or " 403" in line]
    assert not refused, "\n".join(refused)
    assert FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in log


# -- Prometheus, the dashboard and the alerts ----------------------------------------------------------------------


def last_trainer_scrape(prometheus) -> float:
    """When Prometheus last scraped rank 0 (the trainer keeps serving its final values for a few scrapes)."""
    series = prometheus.query(f'kubetune_trainer_info{{finetunejob="{JOB}"}}[1h]')
    assert series, "Prometheus never scraped the trainer"
    return max(float(s["values"][-1][0]) for s in series)


def rate_interval(model: dict, max_points: int = 1000) -> str:
    """Grafana's $__rate_interval for the dashboard's default time range (now-6h): max($__interval + scrape
    interval, 4 x scrape interval), $__interval being the range over a panel's data points (about its width in
    pixels), at least the data source's scrape interval."""
    amount, unit = re.fullmatch(r"now-(\d+)([smhd])", model["time"]["from"]).groups()
    range_s = int(amount) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    interval = max(range_s / max_points, SCRAPE_S)
    return f"{math.ceil(max(interval + SCRAPE_S, 4 * SCRAPE_S))}s"


def _has_data(result: list[dict]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


def test_prometheus_scrapes_the_operator_and_rank_0_as_the_monitors_select(control_plane, prometheus, finished):
    at = last_trainer_scrape(prometheus)
    trainer_job = f"{SYSTEM_NS}/{RELEASE}-trainer"  # the PodMonitor's namespace/name
    up = {(s["metric"]["job"], s["metric"]["pod"], s["value"][1]) for s in prometheus.query("up", at=at)}
    assert {(job, value) for job, _, value in up} == {(f"{RELEASE}-metrics", "1"), (trainer_job, "1")}, up
    assert (f"{RELEASE}-metrics", operator_pod(control_plane)["metadata"]["name"], "1") in up
    # over the whole run: pods of index 0 of the training Job only, never a validation pod
    scraped = prometheus.query(f'count by (pod) (count_over_time(up{{job="{trainer_job}"}}[1h]))', at=at)
    rank0 = get_json(control_plane, "pods", "-n", JOB_NS, "-l",
                     f"kubetune.io/finetunejob={JOB},batch.kubernetes.io/job-completion-index=0")["items"]
    assert {s["metric"]["pod"] for s in scraped} <= {p["metadata"]["name"] for p in rank0}


def test_every_dashboard_panel_has_data(prometheus, finished):
    at = last_trainer_scrape(prometheus)
    model = json.loads((CHART / "dashboards" / "kubetune.json").read_text())
    rate = rate_interval(model)
    empty = []
    for query in panel_queries(model):
        result = prometheus.query(substitute(query.expr, JOB, rate), at=at)  # fails on a query error
        optional = query.panel in PREFERENCE_PANELS | SWEEP_PANELS or (query.panel in GPU_PANELS and not gpu())
        if not optional and not _has_data(result):
            empty.append(f"{query.panel}: {query.expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    # the `finetunejob` variable: label_values(kubetune_trainer_info, finetunejob)
    assert JOB in prometheus.label_values("finetunejob", "kubetune_trainer_info")


def test_the_alerts_see_the_real_series_and_none_fired(prometheus, finished):
    at = last_trainer_scrape(prometheus)
    for group in render_rules(release=RELEASE, namespace=SYSTEM_NS)["groups"]:
        for rule in group["rules"]:  # e.g. the job and namespace labels the monitors give
            for selector in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*\{[^}]*\}", rule["expr"]):
                assert prometheus.query(selector, at=at), f"{rule['alert']}: {selector} matches no series"
    assert prometheus.query('count_over_time(ALERTS{alertstate="firing"}[1h])', at=at) == []


# -- onboarding (last: it restarts the operator) --------------------------------------------------------------------


def test_onboarding_a_namespace_is_a_label_and_an_upgrade(control_plane, release):
    """docs/install.md, "Tenant namespaces": label the namespace, `helm upgrade`; unlabel, upgrade, and it is gone."""
    cp, new_ns = control_plane, "team-y"
    upgrade = ("upgrade", RELEASE, str(CHART), "-n", SYSTEM_NS, "--reuse-values", "--wait", "--timeout", "3m")
    kubectl(cp, "create", "namespace", new_ns)
    try:
        assert not can_i(cp, OPERATOR, "create", "jobs.batch", "-n", new_ns)
        kubectl(cp, "label", "namespace", new_ns, f"{TENANT_LABEL}=enabled")
        helm(cp, *upgrade)
        assert operator_pod(cp)["spec"]["containers"][0]["args"] == [
            "--namespace", JOB_NS, "--namespace", new_ns, "--verbose"]
        assert can_i(cp, OPERATOR, "create", "jobs.batch", "-n", new_ns)
        assert not can_i(cp, OPERATOR, "create", "jobs.batch", "-n", "kube-system")
        binding = get_json(cp, "validatingadmissionpolicybinding", f"{RELEASE}-finetunejobs")
        assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]["values"] == [
            JOB_NS, new_ns]
        kubectl(cp, "label", "namespace", new_ns, f"{TENANT_LABEL}-")
        helm(cp, *upgrade)
        assert not can_i(cp, OPERATOR, "create", "jobs.batch", "-n", new_ns)
    finally:
        kubectl(cp, "delete", "namespace", new_ns, "--wait=false", check=False)
