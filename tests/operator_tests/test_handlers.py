"""The loop's apply step against a fake API: idempotent creates, a status guarded by resourceVersion,
refusals as status, work that waits for the status, orphaned finalizers, operator metrics."""

from __future__ import annotations

import logging
import threading
import time

import kopf
import pytest
from kubetune_api import FineTuneJobSpec
from kubetune_operator import children, kube, loop, metrics
from kubetune_operator.__main__ import parse_args
from kubetune_operator.reconcile import Observed
from kubetune_operator.settings import OperatorSettings
from prometheus_client import generate_latest

from .builders import ftj

LOG = logging.getLogger("test")
SETTINGS = OperatorSettings()  # the operator's defaults: no KUBETUNE_* variable set


class FakeKube(kube.Kube):
    """Holds objects by API path, like the API server: 409 on a second create, a resourceVersion check on
    status patches, and a log of every call in order."""

    def __init__(self):
        self.objects: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []
        self.rv = "1"
        self.refuse: dict[str, tuple[int, str]] = {}  # name -> (status, message)

    def call(self, method, path, body=None, query=None, content_type="application/json"):
        self.calls.append((method, path))
        name = path.rsplit("/", 1)[-1]
        if method == "POST":
            name = body["metadata"]["name"]
            if name in self.refuse:
                status, message = self.refuse[name]
                raise kube.ApiError(status, f'{{"kind": "Status", "message": "{message}"}}')
            full = kube.object_path(body)
            if full in self.objects:
                raise kube.ApiError(409, "exists")
            self.objects[full] = {**body, "metadata": {**body["metadata"], "uid": "uid-" + name}}
            return self.objects[full]
        if method == "GET" and path.endswith("/finetunejobs"):  # a list, cluster-wide or of one namespace
            return {"items": [o for p, o in self.objects.items() if o.get("kind") == "FineTuneJob"
                              and p.startswith(path.removesuffix("finetunejobs").split("/namespaces/")[0])
                              and (f"/namespaces/{o['metadata']['namespace']}/" in path or "/namespaces/" not in path)]}
        if method == "GET":
            if path not in self.objects:
                raise kube.ApiError(404, "not found")
            return self.objects[path]
        if method == "PATCH" and path.endswith("/status"):
            if body["metadata"]["resourceVersion"] != self.rv:
                raise kube.ApiError(409, "the object has been modified")
            self.status = body["status"]
            return {"metadata": {"resourceVersion": str(int(self.rv) + 1)}, "status": body["status"]}
        if method == "DELETE":
            self.objects.pop(path, None)
        return {}


@pytest.fixture
def fake(monkeypatch):
    api = FakeKube()
    events = []
    monkeypatch.setattr(kopf, "event", lambda body, type, reason, message: events.append((type, reason)))
    api.events = events
    return api


def body(**kw) -> dict:
    b = ftj(**kw)
    b["metadata"]["resourceVersion"] = "1"
    return b


def test_apply_creates_children_once_and_writes_the_status(fake):
    b = body()
    d, written, created = loop.apply(fake, b, Observed(), LOG, SETTINGS)
    assert [o["metadata"]["name"] for o in created] == ["demo-config", "demo-validate"]
    assert written["metadata"]["resourceVersion"] == "2"
    assert sorted(fake.objects) == [
        "/api/v1/namespaces/ml/configmaps/demo-config",
        "/apis/batch/v1/namespaces/ml/jobs/demo-validate",
    ]
    assert fake.status["phase"] == "Pending" and d.phase == "Pending"
    assert ("Normal", "Created") in fake.events
    b["status"] = dict(fake.status)
    fake.calls.clear()
    loop.apply(fake, b, Observed(), LOG, SETTINGS)  # the index has not caught up: 409s on our own objects are fine
    assert len(fake.objects) == 2 and [m for m, _ in fake.calls].count("POST") == 2


def test_a_stale_copy_never_overwrites_a_newer_status(fake):
    b = body()
    fake.rv = "2"
    fake.objects[kube.object_path(b)] = {**b, "metadata": {**b["metadata"], "resourceVersion": "2"},
                                         "status": {"phase": "Validating"}}  # someone else decided since
    assert loop.apply(fake, b, Observed(), LOG, SETTINGS)[:2] == (None, None)


def test_a_conflict_on_metadata_only_still_writes_the_status(fake):
    b = body()
    fake.rv = "2"  # kopf added its finalizer meanwhile: the status the decision was made from is unchanged
    fake.objects[kube.object_path(b)] = {**b, "metadata": {**b["metadata"], "resourceVersion": "2"}}
    assert loop.apply(fake, b, Observed(), LOG, SETTINGS)[0] is not None
    assert fake.status["validationAttempts"] == 1


def test_the_training_job_is_recorded_with_its_uid(fake):
    b = body(status={"phase": "Queued", "conditions": [{"type": "Validated", "status": "True", "reason": "ok",
                                                         "lastTransitionTime": "2026-01-01T10:00:00Z"}]})
    loop.apply(fake, b, Observed(), LOG, SETTINGS)
    assert fake.status["trainingJob"] == {"name": "demo-train-1", "uid": "uid-demo-train-1"}
    job = fake.objects["/apis/batch/v1/namespaces/ml/jobs/demo-train-1"]
    assert job["metadata"]["finalizers"] == [children.JOB_FINALIZER]


def test_a_recorded_job_missing_from_the_index_is_asked_for_not_recreated(fake):
    b = body(status={"phase": "Queued", "trainingJob": {"name": "demo-train-1", "uid": "uid-demo-train-1"},
                     "conditions": [{"type": "Validated", "status": "True", "reason": "ok",
                                     "lastTransitionTime": "2026-01-01T10:00:00Z"}]})
    path = "/apis/batch/v1/namespaces/ml/jobs/demo-train-1"
    fake.objects[path] = {"apiVersion": "batch/v1", "kind": "Job", "spec": {}, "status": {}, "metadata": {
        "name": "demo-train-1", "namespace": "ml", "uid": "uid-demo-train-1",
        "ownerReferences": [{"uid": b["metadata"]["uid"], "controller": True}]}}
    d, _, _ = loop.apply(fake, b, Observed(), LOG, SETTINGS)
    assert ("POST", "/apis/batch/v1/namespaces/ml/jobs") not in fake.calls
    assert d.status["reason"] == "WaitingForWorkers"


def test_an_invalid_child_fails_the_job_with_the_api_message(fake):
    fake.refuse["demo-validate"] = (422, "spec.template.spec.containers[0].resources.requests: Invalid value")
    loop.apply(fake, body(), Observed(), LOG, SETTINGS)
    assert (fake.status["phase"], fake.status["reason"]) == ("Failed", "InvalidChildSpec")
    assert "Invalid value" in fake.status["message"]


def test_a_foreign_namesake_is_reported(fake):
    fake.objects["/apis/batch/v1/namespaces/ml/jobs/demo-validate"] = {"metadata": {
        "name": "demo-validate", "ownerReferences": [{"kind": "CronJob", "name": "nightly", "uid": "x"}]}}
    loop.apply(fake, body(), Observed(), LOG, SETTINGS)
    assert fake.status["reason"] == "ChildConflict" and "owned by CronJob nightly" in fake.status["message"]


def test_deletes_wait_for_the_status(fake):
    from .builders import job

    b = body()
    vj = job(children.validation_job(b["metadata"], FineTuneJobSpec.model_validate(b["spec"]),
                                    OperatorSettings(trainer_image="img")),
             finished="Complete")
    fake.objects[kube.object_path(vj)] = vj
    loop.apply(fake, b, Observed(validation_job=vj), LOG, SETTINGS)
    methods = [m for m, p in fake.calls if not p.endswith(("/configmaps", "/services", "/jobs"))]
    assert methods.index("PATCH") < methods.index("DELETE")


def test_orphaned_jobs_are_released():
    released = []

    class Api:
        def release(self, obj):
            released.append(obj["metadata"]["name"])

    mine = {"metadata": {"name": "a", "deletionTimestamp": "t", "ownerReferences": [{"uid": "live"}]}}
    orphan = {"metadata": {"name": "b", "deletionTimestamp": "t", "ownerReferences": [{"uid": "gone"}]}}
    loop.release_orphans(Api(), [mine, orphan], {"live"})
    assert released == ["b"]


def test_operator_metrics_are_exported(fake):
    loop.apply(fake, body(), Observed(), LOG, SETTINGS)
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
    assert 'kubetune_operator_finetunejobs{phase="Failed"} 0.0' in generate_latest(metrics.REGISTRY).decode()


def test_cli_scope():
    assert parse_args([]).namespace == []
    assert parse_args(["-n", "a", "-n", "b"]).namespace == ["a", "b"]
    with pytest.raises(SystemExit):
        parse_args(["-n", "a", "--all-namespaces"])


def test_the_supervisor_decides_from_its_own_write_until_the_watch_brings_it_back():
    """Else a reconcile woken by a child's event, before the FineTuneJob's own watch event arrives, would act
    on the status as it was before the last decision (resume workers that a hang restart just stopped)."""
    live = body(status={"phase": "Running"})
    supervisor = loop.Supervisor(kopf.Body(live), LOG, SETTINGS)
    supervisor.written = ({**live, "metadata": {**live["metadata"], "resourceVersion": "5"},
                           "status": {"phase": "Queued", "restartingWorkers": True}}, time.monotonic())
    assert supervisor.current()["status"]["restartingWorkers"] is True
    supervisor.seen("4")
    assert supervisor.current()["status"]["restartingWorkers"] is True
    supervisor.seen("5")  # the watch has caught up: kopf's live body is the newest again
    assert supervisor.current()["status"] == {"phase": "Running"}


def test_a_child_just_created_counts_as_observed_until_the_index_has_it():
    """controller-runtime's expectations: no second create (a 409) and no second validation attempt while the
    watch is behind the operator's own create."""
    b = body()
    created = {"apiVersion": "batch/v1", "kind": "Job", "spec": {}, "status": {}, "metadata": {
        "name": "demo-validate", "uid": "v1", "ownerReferences": [{"uid": b["metadata"]["uid"], "controller": True}]}}
    empty = loop.Indexes(jobs={}, pods={}, services={}, config_maps={}, workloads={})
    expected = {"demo-validate": created}
    assert empty.observe(b, expected).validation_job == created and expected
    key = ("ml", "demo")
    caught_up = loop.Indexes(jobs={key: [created]}, pods={}, services={}, config_maps={}, workloads={})
    assert caught_up.observe(b, expected).validation_job == created and expected == {}


def test_the_current_attempt_is_observed_and_the_earlier_ones_apart():
    """status.attempts.current names the training Job; earlier attempts' Jobs and workers (and a Job from before
    attempts, with no label) are the previous ones; a later one (a status write lost) is neither."""
    b = body(status={"attempts": {"current": 2}})
    owner = [{"uid": b["metadata"]["uid"], "controller": True}]

    def obj(name: str, uid: str, attempt: str | None, owners=owner) -> dict:
        labels = {children.LABEL_COMPONENT: "workers", **({children.LABEL_ATTEMPT: attempt} if attempt else {})}
        return {"kind": "Job", "metadata": {"name": name, "uid": uid, "labels": labels, "ownerReferences": owners}}

    jobs = [obj("demo-train", "j0", None), obj("demo-train-1", "j1", "1"), obj("demo-train-2", "j2", "2"),
            obj("demo-train-3", "j3", "3")]
    pods = [obj(f"{j['metadata']['name']}-0-x", f"p{i}", children.attempt_of(j) and str(children.attempt_of(j)),
                [{"uid": j["metadata"]["uid"], "controller": True}]) for i, j in enumerate(jobs)]
    key = ("ml", "demo")
    o = loop.Indexes(jobs={key: jobs}, pods={key: pods}, services={}, config_maps={}, workloads={}).observe(b, {})
    assert o.training_job["metadata"]["name"] == "demo-train-2" and [p["metadata"]["uid"] for p in
                                                                      o.training_pods] == ["p2"]
    assert [j["metadata"]["name"] for j in o.previous_jobs] == ["demo-train", "demo-train-1"]
    assert [p["metadata"]["uid"] for p in o.previous_pods] == ["p0", "p1"]


def test_apply_reads_the_other_finetunejobs_from_the_api_before_the_first_child(fake):
    """The output-prefix check reads the FineTuneJobs from the API server (not an index): a job on the prefix of
    an earlier unfinished one fails OutputInUse and creates nothing; once started, it lists nothing more."""
    first = body(name="first")
    first["metadata"].update(uid="uid-first", creationTimestamp="2026-01-01T10:00:00Z")
    fake.objects[kube.object_path(first)] = first
    b = body()
    b["metadata"]["creationTimestamp"] = "2026-01-01T11:00:00Z"
    d, _, created = loop.apply(fake, b, Observed(), LOG, SETTINGS)
    assert ("GET", "/apis/kubetune.io/v1alpha1/finetunejobs") in fake.calls
    assert created == [] and d.status["reason"] == "OutputInUse" and "FineTuneJob ml/first" in d.status["message"]
    fake.calls.clear()
    validating = {"type": "Validated", "status": "Unknown", "reason": "Validating",
                  "lastTransitionTime": "2026-01-01T11:00:00Z"}
    started = body(status={"phase": "Pending", "conditions": [validating]})
    loop.apply(fake, started, Observed(), LOG, SETTINGS)
    assert not [c for c in fake.calls if c[1].endswith("/finetunejobs")]


class GatedLists:
    """A LIST for SharedList that waits at a gate: the Nth call returns [{"list": N}] once gate N opens, or
    raises where `fail` says so."""

    def __init__(self, fail: set[int] = frozenset()):
        self.count, self.fail = 0, fail
        self.entered = {n: threading.Event() for n in range(1, 5)}
        self.gates = {n: threading.Event() for n in range(1, 5)}

    def __call__(self) -> list[dict]:
        self.count += 1
        n = self.count
        self.entered[n].set()
        assert self.gates[n].wait(10)
        if n in self.fail:
            raise kube.ApiError(504, "Timeout: request did not complete within the allotted timeout")
        return [{"list": n}]


def _callers(shared: loop.SharedList, fetch: GatedLists, n: int) -> tuple[list[threading.Thread], list]:
    results: list = [None] * n

    def call(i: int) -> None:
        try:
            results[i] = shared.get(fetch)
        except kube.ApiError as e:
            results[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def _waiting(shared: loop.SharedList, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(shared._changed._waiters) != n:  # CPython's Condition: the threads blocked in wait()
        assert time.monotonic() < deadline, f"{len(shared._changed._waiters)} callers wait, not {n}"
        time.sleep(0.01)


def test_a_shared_list_answers_each_caller_with_a_list_requested_after_it_asked():
    """Callers that ask while a LIST is in flight do not get it (a job created a moment before theirs could be
    missing from it): they share the next one, one LIST for all of them."""
    shared, fetch = loop.SharedList(), GatedLists()
    first, first_result = _callers(shared, fetch, 1)
    assert fetch.entered[1].wait(10)
    later, later_results = _callers(shared, fetch, 5)
    _waiting(shared, 5)
    fetch.gates[1].set()
    assert fetch.entered[2].wait(10)
    _waiting(shared, 4)  # one of them lists, the other four wait for its answer
    fetch.gates[2].set()
    for t in first + later:
        t.join(10)
    assert first_result == [[{"list": 1}]]
    assert later_results == [[{"list": 2}]] * 5
    assert fetch.count == 2 and shared._flight is None  # nothing kept


def test_a_failed_shared_list_fails_its_callers_and_the_next_caller_lists_again():
    shared, fetch = loop.SharedList(), GatedLists(fail={1})
    callers, results = _callers(shared, fetch, 1)
    assert fetch.entered[1].wait(10)
    fetch.gates[1].set()
    callers[0].join(10)
    assert isinstance(results[0], kube.ApiError) and results[0].status == 504
    fetch.gates[2].set()
    assert shared.get(fetch) == [{"list": 2}] and shared._flight is None
