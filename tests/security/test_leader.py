"""Leader election cannot be steered by a tenant (issue 27, item 7; docs/security.md, "Leader election").

The operator elects its one working replica through a Lease in its own namespace. Before, it used kopf peering: a
KopfPeering `kubetune` in every served namespace, and a tenant allowed to write `kopfpeerings` in their namespace
could post a live peer of higher priority there and pause the operator for every tenant.

On the real control plane: an operator serving two tenant namespaces, `-n` each as the chart runs it, with its
Lease in a namespace of its own. The tenant Mallory may do anything in her namespace (`*` on `*`), and kopf's
peering CRDs are installed (as another kopf operator on the cluster might have done). Requests are made as
Mallory (kubectl --as), and the authorizer is asked directly (SubjectAccessReview).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.kube import get_json, http_get, kubectl, stop_process, wait_for
from tests.operator_tests import test_e2e as e2e
from tests.operator_tests.test_e2e import submit

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures"]

ROOT = Path(__file__).resolve().parents[2]
MALLORY = "mallory"
LEASE = "kubetune-operator"
crd = e2e.crd  # the FineTuneJob CRD


def _peering_crd(kind: str, plural: str, scope: str) -> dict:
    """kopf's peering CRDs (group kopf.dev), as kopf documents them: any fields, no status subresource."""
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.kopf.dev"},
            "spec": {"group": "kopf.dev", "scope": scope,
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                     "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}


@pytest.fixture(scope="module")
def peering_crds(control_plane):
    cp = control_plane
    crds = [_peering_crd("KopfPeering", "kopfpeerings", "Namespaced"),
            _peering_crd("ClusterKopfPeering", "clusterkopfpeerings", "Cluster")]
    names = {c["metadata"]["name"] for c in crds}
    ours = names - {c["metadata"]["name"] for c in get_json(cp, "crds")["items"]}
    for crd_ in crds:
        kubectl(cp, "apply", "-f", "-", stdin=json.dumps(crd_))
        kubectl(cp, "wait", "--for=condition=Established", f"crd/{crd_['metadata']['name']}", "--timeout=60s")
    try:
        yield
    finally:
        if ours:  # those this test installed
            kubectl(cp, "delete", "crd", *sorted(ours), check=False)


@pytest.fixture(scope="module")
def tenancy(control_plane, peering_crds):
    """{"operator": its namespace, "mallory": hers (she may do anything there), "victim": another tenant's}."""
    cp, suffix = control_plane, uuid.uuid4().hex[:6]
    names = {"operator": f"kubetune-system-{suffix}", "mallory": f"team-mallory-{suffix}",
             "victim": f"team-victim-{suffix}"}
    for ns in names.values():
        kubectl(cp, "create", "namespace", ns)
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "tenant-admin", "namespace": names["mallory"]},
            "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "tenant-admin", "namespace": names["mallory"]},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant-admin"},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": MALLORY}]}
    for obj in (role, binding):
        kubectl(cp, "apply", "-f", "-", stdin=json.dumps(obj))
    try:
        yield names
    finally:
        kubectl(cp, "delete", "namespace", *names.values(), "--wait=false", check=False)


@pytest.fixture(scope="module")
def operator(control_plane, crd, tenancy, s3_server, tmp_path_factory):
    """The operator as the chart runs it: `--namespace` per served tenant, its Lease in its own namespace."""
    env = e2e.operator_env(control_plane, KUBETUNE_LEASE_NAMESPACE=tenancy["operator"], KUBETUNE_LEASE_NAME=LEASE,
                           **e2e.platform_credentials(s3_server.endpoint))
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    cmd = [sys.executable, "-m", "kubetune_operator", "-n", tenancy["mallory"], "-n", tenancy["victim"], "-v"]
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    ready = f"http://127.0.0.1:{env['KUBETUNE_READY_PORT']}/readyz"
    try:
        wait_for("the operator to lead", lambda: proc.poll() is not None or http_get(ready)[0] == 200, 60)
        assert proc.poll() is None, log.read_text()[-3000:]
        yield {"ready": ready, "log": log, "proc": proc}
    finally:
        for ns in (tenancy["mallory"], tenancy["victim"]):  # while the operator can remove its finalizers
            kubectl(control_plane, "delete", "finetunejobs", "--all", "-n", ns, "--wait", "--timeout=60s",
                    check=False)
        stop_process(proc)
        print(f"operator log: {log}")


def as_mallory(cp, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return kubectl(cp, *args, "--as", MALLORY, stdin=stdin, check=False)


def allowed(cp, verb: str, namespace: str, name: str = "") -> bool:
    """The authorizer's answer for Mallory on leases (a SubjectAccessReview, asked by the cluster admin)."""
    attributes = {"verb": verb, "group": "coordination.k8s.io", "resource": "leases", "namespace": namespace}
    if name:
        attributes["name"] = name
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
              "spec": {"user": MALLORY, "resourceAttributes": attributes}}
    out = kubectl(cp, "create", "-f", "-", "-o", "json", stdin=json.dumps(review))
    return json.loads(out.stdout)["status"].get("allowed", False)


def lease_holder(cp, namespace: str) -> str | None:
    """The holder of the operator's Lease; None when there is no Lease."""
    out = kubectl(cp, "get", "lease", "-n", namespace, LEASE, "-o", "jsonpath={.spec.holderIdentity}", check=False)
    return out.stdout if out.returncode == 0 else None


def handled(cp, namespace: str, name: str) -> None:
    """A suspended FineTuneJob; the operator handles it (its ConfigMap appears) within 60 s."""
    submit(cp, namespace, name, {
        "baseModel": {"uri": "s3://nowhere/model/"}, "dataset": {"train": "s3://nowhere/train.jsonl"},
        "output": {"uri": f"s3://nowhere/{name}/"},  # one unfinished job per output prefix
        "runPolicy": {"suspend": True}})
    wait_for(f"the operator to handle {namespace}/{name}", lambda: kubectl(
        cp, "get", "configmap", "-n", namespace, f"{name}-config", check=False).returncode == 0, 60)


def test_a_tenant_who_may_write_kopfpeerings_cannot_pause_the_operator(control_plane, tenancy, operator):
    """Mallory, who may write anything in her namespace, posts a KopfPeering `kubetune` there with a live peer of
    the highest priority (what paused kopf peering for every served namespace), and squats a Lease named like the
    operator's in her namespace. The operator does not look at either: it stays ready and handles new
    FineTuneJobs in her namespace and in the victim's, and its Lease in its own namespace is untouched."""
    cp = control_plane
    holder = lease_holder(cp, tenancy["operator"])
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
               "metadata": {"name": "kubetune", "namespace": tenancy["mallory"]},
               "status": {"mallory-peer": {"priority": 2**52, "lifetime": 86400, "lastseen": now}}}
    squat = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
             "metadata": {"name": LEASE, "namespace": tenancy["mallory"]},
             "spec": {"holderIdentity": "mallory", "leaseDurationSeconds": 86400, "renewTime": now}}
    for obj in (peering, squat):
        done = as_mallory(cp, "create", "-f", "-", stdin=json.dumps(obj))
        assert done.returncode == 0, done.stderr  # she may: it is her namespace

    handled(cp, tenancy["victim"], "after-the-attack")
    handled(cp, tenancy["mallory"], "her-own-job")
    assert http_get(operator["ready"])[0] == 200
    assert operator["proc"].poll() is None
    assert lease_holder(cp, tenancy["operator"]) == holder is not None
    assert "paused" not in operator["log"].read_text().lower()


@pytest.mark.parametrize("verb", ["get", "list", "watch", "create", "update", "patch", "delete"])
def test_the_authorizer_denies_a_tenant_the_operators_lease(control_plane, tenancy, verb):
    """Mallory asks for any right on leases in the operator's namespace: the authorizer says no (and yes in her
    own namespace, so the check is not vacuous)."""
    cp = control_plane
    assert not allowed(cp, verb, tenancy["operator"], "" if verb in ("list", "watch", "create") else LEASE)
    assert allowed(cp, verb, tenancy["mallory"], "" if verb in ("list", "watch", "create") else LEASE)


def test_a_tenant_cannot_read_take_or_delete_the_operators_lease(control_plane, tenancy, operator):
    """Mallory tries, for real, to read the operator's Lease, make herself its holder (patch and replace), delete
    it, and create another Lease there: each request is Forbidden, and the operator still holds its Lease."""
    cp, ns = control_plane, tenancy["operator"]
    lease = get_json(cp, "lease", "-n", ns, LEASE)
    stolen = {**lease, "spec": {**lease["spec"], "holderIdentity": "mallory"}}
    attempts = {
        "get": as_mallory(cp, "get", "lease", "-n", ns, LEASE),
        "patch": as_mallory(cp, "patch", "lease", "-n", ns, LEASE, "--type=merge",
                            "-p", json.dumps({"spec": {"holderIdentity": "mallory"}})),
        "replace": as_mallory(cp, "replace", "-f", "-", stdin=json.dumps(stolen)),
        "delete": as_mallory(cp, "delete", "lease", "-n", ns, LEASE),
        "create": as_mallory(cp, "create", "-f", "-", stdin=json.dumps({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "mallory", "namespace": ns}, "spec": {"holderIdentity": "mallory"}})),
    }
    for what, done in attempts.items():
        assert done.returncode != 0 and "forbidden" in done.stderr.lower(), (what, done.stdout, done.stderr)
    after = get_json(cp, "lease", "-n", ns, LEASE)
    assert after["spec"]["holderIdentity"] == lease["spec"]["holderIdentity"]
    assert http_get(operator["ready"])[0] == 200
