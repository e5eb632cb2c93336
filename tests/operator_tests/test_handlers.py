"""The kopf layer against a fake API: idempotent creates, status patches, events, operator metrics."""

from __future__ import annotations

import logging

import kopf
import pytest
from kubetune_operator import handlers, kube, metrics
from kubetune_operator.__main__ import parse_args
from prometheus_client import generate_latest

from .builders import ftj


class FakeKube:
    """Holds objects by API path, like the API server (409 on a second create)."""

    def __init__(self):
        self.objects: dict[str, dict] = {}
        self.patches: list[tuple[str, dict]] = []

    def get(self, path):
        return self.objects.get(path)

    def list(self, path, selector):
        return []

    def create(self, obj):
        path = kube.object_path(obj)
        if path in self.objects:
            return False
        self.objects[path] = {**obj, "metadata": {**obj["metadata"], "uid": "uid-" + obj["metadata"]["name"]}}
        return True

    def merge_patch(self, path, patch):
        self.patches.append((path, patch))


@pytest.fixture
def fake(monkeypatch):
    api = FakeKube()
    monkeypatch.setattr(kube, "client", lambda: api)
    events = []
    monkeypatch.setattr(kopf, "event", lambda body, type, reason, message: events.append((type, reason)))
    monkeypatch.setattr(kopf, "info", lambda body, reason, message: events.append(("Normal", reason)))
    api.events = events
    return api


def reconcile(body: dict) -> kopf.Patch:
    patch = kopf.Patch()
    handlers.reconcile("test", kopf.Body(body), patch, logging.getLogger("test"))
    return patch


def test_reconcile_creates_children_once(fake):
    body = ftj()
    patch = reconcile(body)
    assert sorted(fake.objects) == [
        "/api/v1/namespaces/ml/configmaps/demo-config",
        "/apis/batch/v1/namespaces/ml/jobs/demo-validate",
    ]
    assert patch["status"]["phase"] == "Pending"
    assert ("Normal", "Created") in fake.events
    body["status"] = dict(patch["status"])
    patch = reconcile(body)  # a restarted operator, or the next resync: nothing new
    assert len(fake.objects) == 2
    assert patch["status"]["phase"] == "Validating"


def test_children_of_a_deleted_namesake_are_not_ours(fake):
    body = ftj()
    reconcile(body)
    for obj in fake.objects.values():
        obj["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    patch = reconcile(body)
    assert patch["status"]["phase"] == "Pending"  # absent, as far as this FineTuneJob is concerned


def test_terminal_jobs_are_left_alone(fake):
    reconcile(ftj(status={"phase": "Failed"}))
    assert fake.objects == {}


def test_patch_status_sends_only_changes():
    patch = kopf.Patch()
    handlers.patch_status(
        {"phase": "Running", "restarts": 0, "gpuAccountedAt": "t"}, {"phase": "Running", "restarts": 1}, patch
    )
    assert dict(patch["status"]) == {"restarts": 1, "gpuAccountedAt": None}


def test_operator_metrics_are_exported(fake):
    reconcile(ftj())
    text = generate_latest(metrics.REGISTRY).decode()
    for name in (
        'kubetune_operator_finetunejobs{phase="Pending"}',
        "kubetune_operator_reconciles_total",
        "kubetune_operator_reconcile_errors_total",
        "kubetune_operator_reconcile_duration_seconds_bucket",
        "kubetune_operator_gpus_in_use",
        "kubetune_operator_finetunejob_failures",
    ):
        assert name in text
    metrics.record("u1", "Running", "Failed", "DatasetInvalid", 0)
    assert (
        'kubetune_operator_finetunejob_failures_total{reason="DatasetInvalid"} 1.0'
        in generate_latest(metrics.REGISTRY).decode()
    )
    metrics.forget("u1")


def test_cli_scope():
    assert parse_args([]).namespace == []
    assert parse_args(["-n", "a", "-n", "b"]).namespace == ["a", "b"]
    with pytest.raises(SystemExit):
        parse_args(["-n", "a", "--all-namespaces"])
