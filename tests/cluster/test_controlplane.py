"""The local control plane is a real one: stamped version, CEL validation, garbage collection, tokens."""

from __future__ import annotations

import base64
import json
from functools import partial

import pytest
from kubetune_dev.cluster.controlplane import pinned_version

from tests.kube import Reader, get_json, kubectl, wait_for

pytestmark = pytest.mark.cluster
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin"]






def jwt_claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def test_version_is_stamped(control_plane):
    version = json.loads(kubectl(control_plane, "version", "-o", "json").stdout)["serverVersion"]
    expected = pinned_version()
    assert version["gitVersion"] == expected
    assert (version["major"], version["minor"]) == ("1", expected.split(".")[1])
    assert control_plane.version["gitVersion"] == expected


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.test.kubetune.io"},
    "spec": {
        "group": "test.kubetune.io", "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
            "type": "object",
            "properties": {"spec": {
                "type": "object",
                "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}},
                "x-kubernetes-validations": [{"rule": "self.min <= self.max",
                                              "message": "min must not exceed max"}],
            }},
        }}}],
    },
}


def widget(name: str, lo: int, hi: int) -> str:
    return json.dumps({"apiVersion": "test.kubetune.io/v1", "kind": "Widget", "metadata": {"name": name},
                       "spec": {"min": lo, "max": hi}})


def test_crd_cel_rule_refuses_bad_object(control_plane, namespace):
    k = partial(kubectl, control_plane)
    k("apply", "-f", "-", stdin=json.dumps(CRD))
    k("wait", "--for=condition=Established", "crd/widgets.test.kubetune.io", "--timeout=60s")
    # The discovery cache may lag the Established condition for a moment.
    wait_for("the widget resource", lambda: k(
        "apply", "-n", namespace, "-f", "-", stdin=widget("good", 1, 2), check=False).returncode == 0)
    bad = k("apply", "-n", namespace, "-f", "-", stdin=widget("bad", 3, 2), check=False)
    assert bad.returncode != 0
    assert "min must not exceed max" in bad.stderr


def test_deleting_owner_garbage_collects_children(control_plane, namespace):
    k = partial(kubectl, control_plane, "-n", namespace)
    owner = json.loads(k("create", "configmap", "owner", "-o", "json").stdout)
    child = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "child", "ownerReferences": [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}]}}
    k("apply", "-f", "-", stdin=json.dumps(child))
    k("delete", "configmap", "owner", "--cascade=background")
    wait_for("the child to be garbage-collected",
               lambda: "NotFound" in k("get", "configmap", "child", check=False).stderr)


def test_service_account_tokens_are_issued(control_plane, namespace):
    k = partial(kubectl, control_plane, "-n", namespace)
    subject = f"system:serviceaccount:{namespace}:default"
    wait_for("the default service account", lambda: k("get", "sa", "default", check=False).returncode == 0)
    # TokenRequest API: signed by the API server's --service-account-signing-key-file.
    token = k("create", "token", "default").stdout.strip()
    claims = jwt_claims(token)
    assert claims["iss"] == "https://kubernetes.default.svc.cluster.local"
    assert claims["sub"] == subject
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
    status = json.loads(k("create", "-o", "json", "-f", "-", stdin=json.dumps(review)).stdout)["status"]
    assert status["authenticated"] is True
    # The controller-manager signs legacy token Secrets and publishes the root CA in every namespace.
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
              "metadata": {"name": "legacy",
                           "annotations": {"kubernetes.io/service-account.name": "default"}}}
    k("apply", "-f", "-", stdin=json.dumps(secret))
    data = wait_for("the token controller to fill the Secret", lambda: json.loads(
        k("get", "secret", "legacy", "-o", "json").stdout).get("data", {}).get("token"))
    assert jwt_claims(base64.b64decode(data).decode())["sub"] == subject
    ca = wait_for("kube-root-ca.crt", lambda: k(
        "get", "configmap", "kube-root-ca.crt", "-o", "json", check=False).stdout)
    assert "BEGIN CERTIFICATE" in ca


def test_get_json_reads_what_kubectl_prints(control_plane, namespace):
    """tests.kube.get_json reads objects in-process (the tests poll thousands of times): for every form it reads
    (short, singular and plural names, a name, -n, -A, -l, --field-selector, a CRD installed a moment ago), it
    returns what `kubectl get -o json` prints, and a missing object fails as kubectl does."""
    k = partial(kubectl, control_plane)
    k("create", "configmap", "c1", "-n", namespace, "--from-literal=a=b")
    k("label", "configmap", "c1", "-n", namespace, "tier=one")
    k("apply", "-f", "-", stdin=json.dumps(CRD))
    k("wait", "--for=condition=Established", "crd/widgets.test.kubetune.io", "--timeout=60s")
    wait_for("the widget resource", lambda: k(
        "apply", "-n", namespace, "-f", "-", stdin=widget("w1", 1, 2), check=False).returncode == 0)
    forms = [("configmap", "-n", namespace), ("cm", "-n", namespace, "c1"), ("configmaps", "-A", "-l", "tier=one"),
             ("namespace", namespace), ("crd",), ("widget", "-n", namespace), ("widgets", "-n", namespace, "w1"),
             ("events", "-n", namespace, "--field-selector", "involvedObject.name=c1"), ("nodes",),
             ("roles", "-A", "-l", "tier=none")]

    def shown(out: dict) -> object:  # a list's order is the server's in both; compare as sets of objects
        items = out.get("items")
        return sorted(json.dumps(i, sort_keys=True) for i in items) if items is not None else out

    reader = Reader.of(control_plane)
    for form in forms:
        read = reader.get(form)
        assert read is not None, f"{form} went to kubectl"
        assert shown(read) == shown(json.loads(k("get", *form, "-o", "json").stdout)), form
    with pytest.raises(AssertionError, match=r"\(NotFound\).*\"missing\" not found"):
        get_json(control_plane, "configmap", "-n", namespace, "missing")
    assert reader.get(("configmap", "-n", namespace, "-o", "yaml")) is None  # not a form it reads: kubectl
