"""The output check's own watch of the FineTuneJobs (outputs.py): against a fake API server that keeps a history
of resourceVersions and lets the stream lag on purpose, then against the real one.

What matters: a reader never gets a view older than its own job (a job created a moment before it is in it),
finished and deleted jobs stop counting, 410 Gone and errors make a new LIST, a reader that waits too long gets
None and loop.apply lists instead."""

from __future__ import annotations

import copy
import logging
import threading
import time
import uuid

import kubernetes
import pytest
from kubetune_api import FineTuneJobSpec
from kubetune_operator import kube, loop, outputs
from kubetune_operator.reconcile import output_taken

from tests.kube import kubectl
from tests.operator_tests import test_e2e as e2e

crd = e2e.crd  # fixture
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin"]

PATH = "/apis/kubetune.io/v1alpha1/finetunejobs"
SPEC = {"baseModel": {"uri": "s3://models/m/"}, "dataset": {"train": "s3://data/train.jsonl"}}


class FakeApiServer(kube.Kube):
    """FineTuneJobs and the history of their changes, by resourceVersion, as the API server keeps them. A watch
    delivers the changes after its resourceVersion in order, but only up to `released` (the stream's lag: the
    test lets them through); one from before `compacted` gets 410 Gone. `fail` holds errors for the next calls.
    As kube.Kube: `call` answers LISTs (in pages), `watch` streams."""

    def __init__(self):
        self.rv, self.released, self.compacted = 100, 0, 0
        self.objects: dict[str, dict] = {}  # uid -> body
        self.history: list[tuple[int, dict]] = []  # (resourceVersion, watch event)
        self.fail: list[Exception] = []  # raised by the next LISTs and watches, in turn
        self.forbidden: set[str] = set()  # paths that answer 403
        self.calls: list[tuple[str, dict]] = []  # ("list" | "watch", query)
        self.changed = threading.Condition()
        self.watching: list[threading.Event] = []  # set: that watch ends

    # -- what a user does ----------------------------------------------------------------------------------
    def create(self, name: str, uri: str, namespace: str = "ml", phase: str = "") -> dict:
        body = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}",
                             "creationTimestamp": f"2026-01-01T10:00:{self.rv - 100:02d}Z"},
                "spec": {**SPEC, "output": {"uri": uri}}, "status": {"phase": phase} if phase else {}}
        return self._write("ADDED", body)

    def modify(self, body: dict, **changes) -> dict:
        body = copy.deepcopy(self.objects[body["metadata"]["uid"]])
        for key, value in changes.items():
            (body["metadata"] if key == "deletionTimestamp" else body["status"])[key] = value
        return self._write("MODIFIED", body)

    def delete(self, body: dict) -> dict:
        return self._write("DELETED", self.objects[body["metadata"]["uid"]])

    def _write(self, kind: str, body: dict) -> dict:
        with self.changed:
            self.rv += 1
            body = copy.deepcopy(body)
            body["metadata"]["resourceVersion"] = str(self.rv)
            if kind == "DELETED":
                del self.objects[body["metadata"]["uid"]]
            else:
                self.objects[body["metadata"]["uid"]] = body
            self.history.append((self.rv, {"type": kind, "object": copy.deepcopy(body)}))
            return body

    def release(self, upto: int | None = None) -> None:
        """Let the watch deliver the changes up to `upto` (every one by default)."""
        with self.changed:
            self.released = self.rv if upto is None else upto
            self.changed.notify_all()

    def bookmark(self) -> None:
        with self.changed:
            self.history.append((self.rv, {"type": "BOOKMARK", "object": {
                "kind": "FineTuneJob", "metadata": {"resourceVersion": str(self.rv)}}}))

    # -- what kube.Kube answers --------------------------------------------------------------------------
    def _error(self, path: str) -> None:
        if path in self.forbidden:
            raise kube.ApiError(403, '{"message": "forbidden"}')
        if self.fail:
            raise self.fail.pop(0)

    def call(self, method: str, path: str, body=None, query=None, **_) -> dict:
        assert method == "GET", method
        query = dict(query or {})
        self.calls.append(("list", {**query, "path": path}))
        self._error(path)
        with self.changed:
            items = sorted((o for o in self.objects.values() if self._in(path, o)), key=lambda o: o["metadata"]["uid"])
            start = int(query.get("continue") or 0)
            page = items[start:start + int(query.get("limit") or len(items) + 1)]
            more = start + len(page) < len(items)
            meta = {"resourceVersion": str(self.rv), **({"continue": str(start + len(page))} if more else {})}
            return {"items": copy.deepcopy(page), "metadata": meta}

    def watch(self, path: str, query: dict, timeout: float, opened=lambda shutdown: None):
        self.calls.append(("watch", {**query, "path": path}))
        self._error(path)
        since = int(query["resourceVersion"])
        ended = threading.Event()
        self.watching.append(ended)

        def shutdown() -> None:
            with self.changed:
                ended.set()
                self.changed.notify_all()

        opened(shutdown)
        if since < self.compacted:
            yield {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version"}}
            return
        sent = since
        while not ended.is_set():
            with self.changed:
                ready = [(rv, e) for rv, e in self.history if sent < rv <= self.released]
                if not ready:
                    self.changed.wait(0.05)
                    continue
            for rv, event in ready:
                sent = max(sent, rv)
                if self._in(path, event["object"]) or event["type"] == "BOOKMARK":
                    yield copy.deepcopy(event)

    def end_watches(self) -> None:
        """The API server ends the watches (their timeoutSeconds): the stream watches again from where it is."""
        with self.changed:
            for ended in self.watching:
                ended.set()
            self.changed.notify_all()

    @staticmethod
    def _in(path: str, obj: dict) -> bool:
        return "/namespaces/" not in path or f"/namespaces/{obj['metadata'].get('namespace')}/" in path


@pytest.fixture
def api():
    return FakeApiServer()


@pytest.fixture
def running(api):
    started = []

    def start(wait_seconds: float = 5) -> outputs.Outputs:
        started.append(outputs.Outputs(api, wait_seconds).start())
        return started[-1]

    yield start
    for o in started:
        o.stop()


def names(found) -> list[str]:
    return sorted(o.name for o in found or [])


def eventually(what: str, check, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def taken(body: dict, found) -> str | None:
    return output_taken(body, FineTuneJobSpec.model_validate(body["spec"]), found)


def test_a_reader_waits_until_the_stream_has_delivered_its_own_job_and_so_every_earlier_one(api, running):
    """`first` is created a moment before `second`; the stream lags. A reader for `second` gets no answer while
    the stream has delivered neither, nor when it has delivered only `first`'s creation: only once it is past
    `second`'s resourceVersion, and then `first` is in the answer."""
    old = api.create("old", "s3://out/old/")
    api.release()
    cache = running()
    eventually("the LIST", lambda: cache.streams[None].position == api.rv)
    first = api.create("first", "s3://out/team/")
    second = api.create("second", "s3://out/team/v2/")
    answers: list = []
    reader = threading.Thread(target=lambda: answers.append(cache.others(second)))
    reader.start()
    time.sleep(0.2)
    assert not answers, "answered before the stream delivered second"
    api.release(int(first["metadata"]["resourceVersion"]))
    time.sleep(0.2)
    assert not answers, "answered with first but not yet second"
    api.release()
    reader.join(5)
    assert names(answers[0]) == ["first", "old", "second"]
    assert "FineTuneJob ml/first" in taken(second, answers[0])
    assert api.calls[0] == ("list", {"limit": outputs.PAGE, "path": PATH})  # one LIST, no request per reader
    assert [c for c, _ in api.calls] == ["list", "watch"]
    assert api.calls[1][1]["resourceVersion"] == old["metadata"]["resourceVersion"]
    assert api.calls[1][1]["allowWatchBookmarks"] == "true"


def test_finished_and_deleted_jobs_stop_counting(api, running):
    running_job = api.create("running", "s3://out/a/", phase="Running")
    finishing = api.create("finishing", "s3://out/a/", phase="Running")
    leaving = api.create("leaving", "s3://out/a/", phase="Running")
    gone = api.create("gone", "s3://out/a/", phase="Running")
    api.release()
    cache = running()
    new = api.create("new", "s3://out/a/")
    api.release()
    assert "is in use" in taken(new, cache.others(new))
    api.modify(finishing, phase="Succeeded")
    api.modify(leaving, deletionTimestamp="2026-01-01T11:00:00Z")
    api.delete(gone)
    api.delete(running_job)
    newer = api.create("newer", "s3://out/a/")
    api.release()
    found = cache.others(newer)
    assert names(found) == ["finishing", "leaving", "new", "newer"]  # gone and running deleted
    assert taken(newer, [o for o in found if o.name != "new"]) is None  # finished, being deleted: free


def test_410_gone_lists_again_and_the_watch_resumes_from_the_new_list(api, running):
    """The stream's watch ends; meanwhile the API server's history moved past the stream's resourceVersion: the
    next watch gets 410 Gone, the stream lists again at once and watches from the new LIST's version."""
    api.create("a", "s3://out/a/")
    api.release()
    stream = running(wait_seconds=5).streams[None]
    eventually("the first watch", lambda: [c for c, _ in api.calls] == ["list", "watch"])
    b = api.create("b", "s3://out/b/")  # not delivered by this watch
    api.compacted = api.rv
    api.end_watches()
    eventually("a second LIST", lambda: stream.lists == 2)
    assert names(stream.wait(int(b["metadata"]["resourceVersion"]), time.monotonic() + 5)) == ["a", "b"]
    eventually("the third watch", lambda: len(api.calls) == 5)
    assert [c for c, _ in api.calls] == ["list", "watch", "watch", "list", "watch"]
    assert api.calls[-1][1]["resourceVersion"] == b["metadata"]["resourceVersion"]  # from the new LIST's


def test_an_error_lists_again_after_a_delay_and_a_reader_gets_none_meanwhile(api, running):
    api.create("a", "s3://out/a/")
    api.release()
    api.fail = [kube.ApiError(504, '{"message": "timeout"}')]
    stream = outputs.Stream(api, delays=(0.3,)).start()
    try:
        rv = api.rv
        eventually("the failure", lambda: stream.broken)
        asked = time.monotonic()
        assert stream.wait(rv, asked + 5) is None  # broken: at once, no answer (loop.apply lists), no old view
        assert time.monotonic() - asked < 0.2
        eventually("the second LIST", lambda: not stream.broken)
        assert names(stream.wait(rv, time.monotonic() + 5)) == ["a"]
        assert stream.lists == 2
    finally:
        stream.stop()


def test_a_reader_that_waits_too_long_gets_none_and_apply_lists_instead(api, running, monkeypatch):
    """The stream lags by more than wait_seconds: loop.apply decides from a LIST, never from the older view."""
    api.create("first", "s3://out/team/")
    api.release()
    cache = running(wait_seconds=0.2)
    eventually("the LIST", lambda: cache.streams[None].position == api.rv)
    new = api.create("new", "s3://out/team/")  # not released: the stream stays before it
    assert cache.others(new) is None
    monkeypatch.setattr(outputs, "_running", [cache])
    monkeypatch.setattr(loop, "FINETUNEJOBS", {})
    lists = len([c for c, _ in api.calls if c == "list"])
    found = loop.other_outputs(api, new, logging.getLogger("test"))
    assert names(found) == ["first", "new"]
    assert len([c for c, _ in api.calls if c == "list"]) == lists + 1
    api.release()
    assert names(cache.others(new)) == ["first", "new"]  # once delivered: no request
    assert len([c for c, _ in api.calls if c == "list"]) == lists + 1


def test_an_operator_that_may_not_list_every_namespace_watches_the_jobs_namespace(api, running):
    api.forbidden.add(PATH)
    api.create("theirs", "s3://out/a/", namespace="other")
    api.create("first", "s3://out/a/")
    api.release()
    cache = running()
    new = api.create("new", "s3://out/a/")
    api.release()
    assert names(cache.others(new)) == ["first", "new"]  # as kube.Kube.finetunejobs: the job's namespace
    assert set(cache.streams) == {None, "ml"} and cache.streams[None].forbidden


def test_bookmarks_move_the_stream_on_a_watch_ended_resumes_and_stop_ends_it(api, running):
    api.release()
    cache = running()
    stream = cache.streams[None]
    eventually("the LIST", lambda: stream.position == api.rv)
    api.rv += 5  # changes to other resources
    api.bookmark()
    api.release()
    eventually("the bookmark", lambda: stream.position == api.rv)
    api.end_watches()  # the API server ends a watch after its timeoutSeconds: watched again, from there
    eventually("the next watch", lambda: len(api.calls) == 3)
    assert api.calls[2] == ("watch", {"resourceVersion": str(api.rv), "allowWatchBookmarks": "true",
                                      "timeoutSeconds": str(outputs.WATCH_SECONDS), "path": PATH})
    assert stream.lists == 1
    cache.stop()
    assert not stream._thread.is_alive()
    assert stream.wait(api.rv + 1, time.monotonic() + 5) is None  # stopped: at once
    assert cache.others(api.create("after", "s3://out/x/")) is None and not cache.streams  # none started again


def test_pages(api, running, monkeypatch):
    monkeypatch.setattr(outputs, "PAGE", 2)
    for i in range(5):
        api.create(f"j{i}", f"s3://out/{i}/")
    api.release()
    stream = running().streams[None]
    eventually("the LIST", lambda: stream.position == api.rv)
    assert names(stream.entries.values()) == [f"j{i}" for i in range(5)]
    assert [q.get("continue") for c, q in api.calls if c == "list"] == [None, "2", "4"]


# -- the real API server ---------------------------------------------------------------------------------

@pytest.mark.cluster
def test_against_the_api_server_every_job_created_before_is_in_the_answer(control_plane, crd):
    """40 FineTuneJobs created one after another, from two threads, on one prefix (or one inside it): each one's
    answer, read as
    soon as its create returns, holds every job whose create was answered before (lower resourceVersion), and
    output_taken refuses each that one created before it comes before; deleted ones leave it; stop ends the
    watch."""
    namespace = f"outputs-{uuid.uuid4().hex[:6]}"
    kubectl(control_plane, "create", "namespace", namespace)
    api = kube.Kube(kubernetes.config.new_client_from_config(config_file=str(control_plane.kubeconfig)))
    cache = outputs.Outputs(api).start()
    created: list[dict] = []
    try:
        def create(prefix: str, n: int) -> None:
            for i in range(n):
                body = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                        "metadata": {"name": f"{prefix}-{i}"},
                        "spec": {**SPEC, "output": {"uri": f"s3://shared/{namespace}/" + ("inner/" if i % 2 else "")}}}
                new = api.call("POST", f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs", body)
                found = cache.others(new)
                assert found is not None, "the watch did not deliver a job within 5 s"
                created.append((new, found))

        threads = [threading.Thread(target=create, args=(p, 20)) for p in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(created) == 40
        ours = created
        rv = {new["metadata"]["uid"]: int(new["metadata"]["resourceVersion"]) for new, _ in ours}  # of its create
        for new, found in ours:
            seen = {o.uid for o in found if o.namespace == namespace}
            before = {uid for uid, v in rv.items() if v <= rv[new["metadata"]["uid"]]}
            assert before <= seen, f"{new['metadata']['name']} missed {before - seen}"
        # refused: every job but the first created (all write to one prefix or one inside it), also where two
        # share a second of creationTimestamp: the watch saw the creates in order (Output.created_rv)
        first = min(rv, key=rv.get)
        assert {new["metadata"]["uid"] for new, found in ours if taken(new, found)} == set(rv) - {first}
        kubectl(control_plane, "delete", "finetunejobs", "--all", "-n", namespace, "--wait=true")
        last = api.call("POST", f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs",
                        {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "last"},
                         "spec": {**SPEC, "output": {"uri": f"s3://shared/{namespace}/"}}})
        found = cache.others(last)
        assert [o.name for o in found if o.namespace == namespace] == ["last"] and taken(last, found) is None
        assert cache.streams[None].lists == 1  # one LIST in all, the rest from the watch
        stream = cache.streams[None]
    finally:
        cache.stop()
        kubectl(control_plane, "delete", "namespace", namespace, "--wait=false")
    assert not stream._thread.is_alive(), "stop() ends the watch"
