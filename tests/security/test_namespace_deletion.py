"""A tenant namespace deleted with FineTuneJobs in it goes away (issue 27, item 7, "Finalizers").

A FineTuneJob carries kopf's finalizer `kubetune.io/finalizer`, its training Job the operator's
`kubetune.io/outcome`. Only the operator removes them, and the chart gives it its rights in a tenant namespace
through a Role and RoleBinding in that namespace. `kubectl delete namespace` deletes everything in it in one pass:
the RoleBinding goes at once, the jobs wait on their finalizers, and the operator, now refused, could never remove
them. A tenant (or an admin) deleting their namespace would leave it Terminating forever, and its name could not
be used again.

The answer: the chart binds, cluster-wide, a ClusterRole with the finalizer removals alone (`patch` on
finetunejobs and on Jobs), so the RBAC that removes the finalizers is never deleted before them. The test runs the
operator as its ServiceAccount with exactly the chart's RBAC (rendered by helm, `watchNamespaces` the tenant's
namespace), makes a FineTuneJob with its children (a suspended training Job), deletes the namespace, and the
namespace is gone within a bounded time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.chart.conftest import CHART, tool
from tests.kube import drop_finalizers, get_json, kubectl, wait_for
from tests.operator_tests import test_e2e as e2e

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]

crd, s3_inputs = e2e.crd, e2e.s3_inputs  # the e2e fixtures
RELEASE = "kubetune-nsdel"
RBAC_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
GONE_WITHIN_S = 120  # the namespace controller's own pace: a few passes of a few seconds
# kopf's log line when the API server refuses its finalizer removal (the PATCH of the FineTuneJob)
REFUSED = 'APIForbiddenError(\'finetunejobs.kubetune.io "doomed" is forbidden'


def chart_rbac(operator_ns: str, tenant: str) -> list[dict]:
    """The ServiceAccount and RBAC `helm template` renders for a release in `operator_ns` serving `tenant`."""
    out = subprocess.run([tool("helm"), "template", RELEASE, str(CHART), "-n", operator_ns,
                          "--set", f"watchNamespaces={{{tenant}}}", "--set", "policy.admission.enabled=false"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d and d["kind"] in RBAC_KINDS]


def service_account_kubeconfig(cp, namespace: str, name: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount (a token from the TokenRequest API)."""
    token = kubectl(cp, "create", "token", name, "-n", namespace, "--duration=1h").stdout.strip()
    config = yaml.safe_load(Path(cp.kubeconfig).read_text())
    config["users"] = [{"name": "admin", "user": {"token": token}}]
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def tenant(request, control_plane, crd, s3_inputs, tmp_path):
    """A tenant namespace served by an operator that runs as the chart's ServiceAccount with the chart's RBAC
    (`request.param` False: less the cluster-wide finalizer removals, as the chart was before)."""
    cp, suffix = control_plane, uuid.uuid4().hex[:6]
    operator_ns, tenant_ns = f"nsdel-operator-{suffix}", f"nsdel-tenant-{suffix}"
    for ns in (operator_ns, tenant_ns):
        kubectl(cp, "create", "namespace", ns)
    objects = chart_rbac(operator_ns, tenant_ns)
    if not getattr(request, "param", True):
        objects = [o for o in objects if not o["metadata"]["name"].endswith("-finalizers")]
    kubectl(cp, "apply", "-f", "-", stdin="\n---\n".join(json.dumps(o) for o in objects))
    (account,) = [o for o in objects if o["kind"] == "ServiceAccount"]
    kubeconfig = service_account_kubeconfig(cp, operator_ns, account["metadata"]["name"], tmp_path / "sa.kubeconfig")
    log = tmp_path / "operator.log"
    env = {**e2e.operator_env(cp, **e2e.platform_credentials(s3_inputs["endpoint"])), "KUBECONFIG": str(kubeconfig)}
    with log.open("a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kubetune_operator", "--namespace", tenant_ns, "--standalone",
                                 "-v"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=e2e.ROOT)
    request.node.operator_pid, request.node.operator_log = proc.pid, log
    try:
        yield tenant_ns
    finally:
        proc.terminate()
        proc.wait(30)
        print(f"operator log: {log}")
        # A namespace the test left stuck: release it by hand (as the admin), then delete what the chart made.
        if kubectl(cp, "get", "namespace", tenant_ns, check=False).returncode == 0:
            for kind in ("ftj", "job"):
                drop_finalizers(cp, kind, "-n", tenant_ns, check=False)
        kubectl(cp, "delete", "namespace", operator_ns, tenant_ns, "--wait=false", "--ignore-not-found", check=False)
        for o in objects:
            if o["kind"] in ("ClusterRole", "ClusterRoleBinding"):
                kubectl(cp, "delete", o["kind"].lower(), o["metadata"]["name"], "--ignore-not-found", check=False)


def doomed_job(cp, tenant: str, s3_inputs: dict) -> None:
    """A FineTuneJob (kopf's finalizer) and its training Job (suspended; `kubetune.io/outcome`) in `tenant`."""
    e2e.credentials(cp, tenant)
    e2e.submit(cp, tenant, "doomed", e2e.training_spec(s3_inputs, e2e.IMAGE, runPolicy={"suspend": True}))

    def training_job() -> dict | None:
        jobs = get_json(cp, "jobs", "-n", tenant, "--field-selector", "metadata.name=doomed-train-1")["items"]
        return jobs[0] if jobs and "kubetune.io/outcome" in (jobs[0]["metadata"].get("finalizers") or []) else None

    wait_for("the training Job with its finalizer", training_job, timeout=240)
    assert "kubetune.io/finalizer" in get_json(cp, "ftj", "-n", tenant, "doomed")["metadata"]["finalizers"]


def delete_namespace(cp, namespace: str, operator_pid: int) -> None:
    """`kubectl delete namespace` with the operator paused until the namespace controller has deleted the
    operator's RoleBinding there: the order that strands the finalizers, made certain (an operator that happens to
    react first could still remove them with its namespace rights, and the case would not be tested)."""
    os.kill(operator_pid, signal.SIGSTOP)
    try:
        kubectl(cp, "delete", "namespace", namespace, "--wait=false")
        wait_for("the namespace's RoleBindings to go", lambda: not get_json(cp, "rolebinding", "-n", namespace)[
            "items"], timeout=60, every=0.5)
    finally:
        os.kill(operator_pid, signal.SIGCONT)


def left_in(cp, namespace: str) -> dict:
    return {kind: [(o["metadata"]["name"], o["metadata"].get("finalizers")) for o in
                   get_json(cp, kind, "-n", namespace)["items"]] for kind in ("ftj", "job", "rolebinding")}


def gone(cp, namespace: str) -> bool:
    return kubectl(cp, "get", "namespace", namespace, check=False).returncode != 0


@pytest.mark.parametrize("tenant", [False], indirect=True, ids=["without-the-cluster-wide-removals"])
def test_without_the_cluster_wide_finalizer_removals_the_namespace_sticks(control_plane, node_agent, tenant,
                                                                          s3_inputs, request):
    """The chart as it was (the operator's rights in the namespace alone): deleting the namespace deletes the
    RoleBinding in the same pass, and the operator can no longer remove its finalizers: the namespace sticks."""
    cp = control_plane
    doomed_job(cp, tenant, s3_inputs)
    delete_namespace(cp, tenant, request.node.operator_pid)
    wait_for("the operator's finalizer removal to be refused", lambda: REFUSED in request.node.operator_log.read_text(),
             timeout=90, every=1)
    time.sleep(5)  # a pass of the namespace controller after it: nobody left who may remove the finalizers
    assert not gone(cp, tenant)
    left = left_in(cp, tenant)
    assert not left["rolebinding"], "the operator's RoleBinding went first"
    assert left["ftj"] or left["job"], "held by the operator's finalizers"


def test_deleting_a_tenant_namespace_with_jobs_in_it_never_sticks(control_plane, node_agent, tenant, s3_inputs,
                                                                  request):
    """A namespace with a FineTuneJob (kopf's finalizer) and its training Job (`kubetune.io/outcome`) is deleted:
    it is gone within GONE_WITHIN_S, although its Role and RoleBinding went first."""
    cp = control_plane
    doomed_job(cp, tenant, s3_inputs)
    started = time.monotonic()
    delete_namespace(cp, tenant, request.node.operator_pid)
    try:
        wait_for(f"namespace {tenant} to go", lambda: gone(cp, tenant), timeout=GONE_WITHIN_S, every=1)
    except AssertionError:
        status = get_json(cp, "namespace", tenant).get("status")
        raise AssertionError(f"namespace {tenant} still Terminating after {GONE_WITHIN_S}s: {left_in(cp, tenant)}; "
                             f"{status}") from None
    print(f"namespace gone after {time.monotonic() - started:.1f}s")
