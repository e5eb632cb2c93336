"""The FineTuneJobs' output prefixes, for the output check before a new job's first child
(reconcile.output_taken, docs/security.md section 5), kept by a watch of the operator's own: no LIST per new job.

Why not kopf's index of FineTuneJobs: kopf updates it in each object's own worker, so a job created a moment
before the new one may be missing from it, and the check promises that such a job counts. A single watch stream
delivers every change in resourceVersion order (resourceVersions of one resource compare as integers: KEP-5504,
stable since Kubernetes 1.35), so once the stream has gone past the new job's resourceVersion, every FineTuneJob
created (or finished, or deleted) before it has been delivered: `others(body)` waits for that (it takes
milliseconds: the stream and kopf's watch see the job at about the same time), then answers with no request.

A `Stream` is LIST (in pages) then WATCH from the list's resourceVersion with bookmarks, in a thread; after
410 Gone it lists again at once, after any other error with a growing delay. It keeps per job only what the check
reads (reconcile.Output, a tuple of a few strings), never bodies. The operator lists every namespace where it may;
where it may not (403: an operator given its namespaces), one Stream per namespace asked about, as
kube.Kube.finetunejobs does. A reader that waits longer than `wait_seconds` (the stream far behind), or any reader
while the stream is broken (between an error and its next LIST), gets None, and loop.apply lists from the API
server instead: nothing is decided on an older view.

Started by a kopf startup handler (handlers.py: kopf runs only on the replica that holds the Lease), stopped by
its cleanup handler.
"""

from __future__ import annotations

import logging
import threading
import time

from . import GROUP, PLURAL, VERSION, kube
from .reconcile import Output, output_of

WAIT_SECONDS = 5.0  # how long a reader waits for the stream to deliver its job before loop.apply lists
ERROR_DELAYS = (1, 2, 5, 10, 30)  # before a relist after an error (not after 410 Gone: at once)
PAGE = 500  # FineTuneJobs per page of a LIST: the bodies of one page are decoded at a time
WATCH_SECONDS = 300  # the API server ends a watch after this long; it is resumed from the last resourceVersion

log = logging.getLogger(__name__)


def version(rv: str | None) -> int | None:
    """A resourceVersion as the integer it compares as (KEP-5504); None when it is not one."""
    return int(rv) if isinstance(rv, str) and rv.isdigit() else None


class Gone(Exception):
    """410 Gone: the stream's resourceVersion is no longer in the API server's history; list again."""


class Stream:
    """The Outputs of every FineTuneJob in `namespace` (None: every namespace), and the resourceVersion up to
    which the watch has delivered them. Thread-safe: one thread writes (`run`), readers wait in `wait`."""

    def __init__(self, api: kube.Kube, namespace: str | None = None,
                 delays: tuple[float, ...] = ERROR_DELAYS):
        self.api, self.delays = api, delays
        base = f"/apis/{GROUP}/{VERSION}"
        self.path = f"{base}/namespaces/{namespace}/{PLURAL}" if namespace else f"{base}/{PLURAL}"
        self.entries: dict[str, Output] = {}  # uid -> what the check reads
        self.position = 0  # every change up to this resourceVersion is in `entries`
        self.forbidden = False  # the LIST answered 403: this operator may not list this scope
        self.broken = False  # failed, waiting to list again: readers do not wait for it meanwhile
        self.lists = 0  # LISTs made (the first, and each relist)
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shutdown = lambda: None  # ends the current watch from another thread (stop)

    def start(self) -> Stream:
        self._thread = threading.Thread(target=self.run, name=f"outputs:{self.path}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2) -> None:
        """Stop the thread: its watch is shut down, so a read blocked in it returns."""
        self._stop.set()
        self._shutdown()
        with self._changed:
            self._changed.notify_all()
        if self._thread:
            self._thread.join(timeout)

    def wait(self, rv: int, deadline: float) -> list[Output] | None:
        """Every Output once the stream has delivered all changes up to `rv`; None at `deadline` (time.monotonic),
        or at once when the stream cannot get there soon (forbidden, broken, stopped)."""
        with self._changed:
            while self.position < rv:
                left = deadline - time.monotonic()
                if left <= 0 or self.forbidden or self.broken or self._stop.is_set():
                    return None
                self._changed.wait(left)
            return list(self.entries.values())

    def run(self) -> None:
        errors, listed = 0, False
        while not self._stop.is_set():
            try:
                if not listed:
                    self._list()
                    errors, listed = 0, True
                self._watch()  # the API server ended it (timeoutSeconds): watch again from where it got
            except Gone:
                listed = False  # a newer LIST at once, as client-go's reflector does
            except kube.ApiError as e:
                if e.status == 403:
                    log.info("may not list FineTuneJobs at %s: the output check reads a namespace at a time", self.path)
                    with self._changed:
                        self.forbidden = True
                        self._changed.notify_all()
                    return
                errors, listed = errors + 1, False
                self._failed(e, errors)
            except Exception as e:  # noqa: BLE001 -- the API server away, a broken stream: list again, later
                errors, listed = errors + 1, False
                self._failed(e, errors)

    def _failed(self, error: Exception, errors: int) -> None:
        if self._stop.is_set():  # stop() shut the watch down
            return
        with self._changed:
            self.broken = True
            self._changed.notify_all()
        delay = self.delays[min(errors, len(self.delays)) - 1]
        log.warning("the output check's watch of %s failed (list again in %ss; meanwhile new jobs list): %s: %s",
                    self.path, delay, type(error).__name__, error)
        self._stop.wait(delay)

    def _list(self) -> None:
        """A consistent LIST, in pages (one snapshot: the continue token keeps its resourceVersion)."""
        entries, query = {}, {"limit": PAGE}
        self.lists += 1
        while True:
            page = self.api.call("GET", self.path, query=query)
            for body in page.get("items") or []:  # a relist keeps where the watch saw each create
                uid = body["metadata"]["uid"]
                entries[uid] = output_of(body, getattr(self.entries.get(uid), "created_rv", 0))
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                break
            query = {"limit": PAGE, "continue": meta["continue"]}
        with self._changed:
            self.entries, self.position = entries, version(meta.get("resourceVersion")) or 0
            self.broken = False
            self._changed.notify_all()

    def _watch(self) -> None:
        query = {"resourceVersion": str(self.position), "allowWatchBookmarks": "true",
                 "timeoutSeconds": str(WATCH_SECONDS)}

        def opened(shutdown) -> None:
            self._shutdown = shutdown
            if self._stop.is_set():  # stopped while it was opening
                shutdown()

        for event in self.api.watch(self.path, query, timeout=WATCH_SECONDS + 30, opened=opened):
            if self._stop.is_set():
                return
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Gone(obj.get("message"))
                raise kube.ApiError(obj.get("code") or 500, str(obj.get("message")))
            meta = obj.get("metadata") or {}
            rv = version(meta.get("resourceVersion"))
            with self._changed:
                if kind == "DELETED":
                    self.entries.pop(meta.get("uid"), None)
                elif kind in ("ADDED", "MODIFIED"):  # ADDED: created now, at rv (KEP-5504's order)
                    known = self.entries.get(meta["uid"])
                    created_rv = known.created_rv if known else (rv or 0) if kind == "ADDED" else 0
                    self.entries[meta["uid"]] = output_of(obj, created_rv)
                if rv:  # BOOKMARK too: nothing changed up to there
                    self.position = max(self.position, rv)
                self._changed.notify_all()


class Outputs:
    """The check's view of the other FineTuneJobs: a Stream of every namespace, or where the operator may not
    list them all, a Stream per namespace asked about (started on the first job there)."""

    def __init__(self, api: kube.Kube, wait_seconds: float = WAIT_SECONDS):
        self.api, self.wait_seconds = api, wait_seconds
        self.streams: dict[str | None, Stream] = {}  # None: every namespace
        self.stopped = False
        self._lock = threading.Lock()

    def start(self) -> Outputs:
        self._stream(None)
        return self

    def stop(self) -> None:
        with self._lock:
            streams, self.streams, self.stopped = list(self.streams.values()), {}, True
        for stream in streams:
            stream.stop()

    def _stream(self, namespace: str | None) -> Stream | None:
        with self._lock:
            if self.stopped:  # a reconcile still running as the operator stops: it lists
                return None
            if namespace not in self.streams:
                self.streams[namespace] = Stream(self.api, namespace).start()
            return self.streams[namespace]

    def others(self, body: dict) -> list[Output] | None:
        """The Outputs of the FineTuneJobs as of `body`'s resourceVersion or later (so every job created before
        it is in, `body` too); None when the stream has not got there within `wait_seconds`: list instead."""
        meta = body["metadata"]
        rv = version(meta.get("resourceVersion"))
        if rv is None:
            return None
        deadline = time.monotonic() + self.wait_seconds
        every = self._stream(None)
        found = every.wait(rv, deadline) if every else None
        if found is None and every and every.forbidden:
            mine = self._stream(meta["namespace"])
            found = mine.wait(rv, deadline) if mine else None
        return found


_running: list[Outputs] = []  # the operator's, while it runs (start / stop)


def start(api: kube.Kube) -> Outputs:
    outputs = Outputs(api).start()
    _running.append(outputs)
    return outputs


def stop() -> None:
    while _running:
        _running.pop().stop()


def current() -> Outputs | None:
    """The running Outputs, if any (none in unit tests of loop.apply, nor before the operator starts)."""
    return _running[-1] if _running else None
