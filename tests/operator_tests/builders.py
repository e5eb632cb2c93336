"""Fake API objects for the operator's unit tests: a FineTuneJob and the children the cluster would hold."""

from __future__ import annotations

import copy
from datetime import UTC, datetime

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
UID = "11111111-2222-3333-4444-555555555555"

SPEC = {
    "baseModel": {"uri": "s3://models/tiny/"},
    "dataset": {"train": "s3://data/train.jsonl", "validation": "s3://data/val.jsonl"},
    "output": {"uri": "s3://adapters/demo/"},
    # no Secret of its own: naming one needs the admission policy (policy.SECRET), whose checks these tests skip
    "storage": {"endpoint": "http://minio:9000"},
    "resources": {"workers": 2, "gpusPerWorker": 1},
}


def ftj(spec_updates: dict | None = None, status: dict | None = None, name: str = "demo") -> dict:
    spec = copy.deepcopy(SPEC)
    for key, value in (spec_updates or {}).items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "ml", "uid": UID, "generation": 1},
        "spec": spec,
        "status": status or {},
    }


def job(
    obj: dict,
    *,
    finished: str | None = None,
    reason: str = "",
    message: str = "",
    active: int = 0,
    failed: int = 0,
    suspend: bool | None = None,
) -> dict:
    """A child Job as the API server would return it (built from the operator's desired object)."""
    out = copy.deepcopy(obj)
    out["metadata"]["uid"] = "job-" + obj["metadata"]["name"]
    if suspend is not None:
        out["spec"]["suspend"] = suspend
    status = {"active": active, "failed": failed}
    if finished:
        status["conditions"] = [{"type": finished, "status": "True", "reason": reason, "message": message}]
    out["status"] = status
    return out


def pod(
    job_obj: dict,
    index: int = 0,
    phase: str = "Running",
    exit_code: int | None = None,
    message: str = "",
    ip: str = "10.0.0.5",
    container: str = "trainer",
) -> dict:
    state = {"running": {"startedAt": "2026-01-01T11:00:00Z"}}
    if exit_code is not None:
        state = {
            "terminated": {"exitCode": exit_code, "message": message, "finishedAt": "2026-01-01T11:30:00Z"}
        }
    return {
        "metadata": {
            "name": f"{job_obj['metadata']['name']}-{index}-abcde",
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
            "ownerReferences": [{"uid": job_obj["metadata"]["uid"], "controller": True}],
        },
        "status": {"phase": phase, "podIP": ip, "containerStatuses": [{"name": container, "state": state}]},
    }
