"""MLflow tracking (spec.tracking.mlflow): rank 0 also logs the run to a team's MLflow tracking server.

What it logs, through MLflow's client (mlflow-skinny's `MlflowClient`):
* one MLflow run per Kubetune run, found again by its `kubetune.run_id` tag, so that a preempted or resumed run
  continues the same MLflow run (its status goes back to RUNNING); named `<job>-<run id>`, tagged with the job,
  the namespace, the run id and the output URI;
* the parameters: task, objective, method, base model, dataset URIs and hyperparameters (dotted names);
* the metrics as the pipeline reports them (`Tracker.observe`, one call per event): `train/*` at every logging
  step, `validation/*` at every evaluation, `test/*` at the published step, `baseline/test/*` at step 0;
* at the end, the output folder's model card (README.md) and plots (*.png) as artifacts, and the status: FINISHED,
  KILLED (stopped to resume later: the resumed run sets it RUNNING again) or FAILED.

The server never fails or slows training: every call goes into a bounded queue that a daemon thread sends, in
order, retrying with backoff. A full queue drops its oldest update (one warning); an outage is one warning, and
one line when the server answers again; an update the server refuses (a 4xx answer) is dropped, with one warning
per kind of refusal.
The end waits for the queue at most FLUSH_SECONDS, and gives up at the first failure then.

Credentials: MLflow's client reads MLFLOW_TRACKING_TOKEN (or MLFLOW_TRACKING_USERNAME and _PASSWORD) from the
environment, where the operator puts tracking.mlflow.secretRef's keys; nothing here reads them, and redact.py
masks them in everything the trainer prints.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from numbers import Real
from pathlib import Path
from typing import Any

from kubetune_api import TrainerConfig

from .errors import PeerLost, Preempted
from .identity import RunIdentity

Reporter = Callable[[dict], None]
Call = Callable[[Any, str], None]  # (client, MLflow run id) -> None: one update of the run

RUN_ID_TAG = "kubetune.run_id"
MAX_QUEUE = 10_000  # updates waiting to be sent (a logging step's metrics are one)
BACKOFF = (1.0, 60.0)  # seconds: the first retry, and the longest wait between two
FLUSH_SECONDS = 30.0  # the end waits at most this long for the queue to be sent
MAX_PARAM = 500  # characters of a parameter's value (the limit of older MLflow servers)
PARAM_SECTIONS = ("task", "objective", "objectiveParams", "baseModel", "dataset", "method", "hyperparameters",
                  "evaluation", "output")
ARTIFACTS = ("README.md", "*.png")  # the output's model card and plots
# MLflow's own HTTP retries would keep one call (and the end's flush) waiting for minutes; the queue retries.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


class Sender:
    """Runs queued calls on a daemon thread, oldest first; `warn` tells a person (at most once per outage), each
    warning starting with `name`."""

    def __init__(self, name: str, send: Callable[[Call], None], warn: Callable[[str], None],
                 max_queue: int = MAX_QUEUE, backoff: tuple[float, float] = BACKOFF):
        self._send, self._backoff = send, backoff
        self._warn = lambda message: warn(f"{name}: {message}")
        self._queue: deque[Call] = deque()
        self._max = max_queue
        self._cond = threading.Condition()
        self._closing = False
        self._closed = threading.Event()  # cuts a backoff short (a new update does not: that would retry at once)
        self._dropped_warned = False
        self._refusals: set[str] = set()  # each kind of refusal is told once (a wrong token refuses every update)
        self._thread = threading.Thread(target=self._run, name="mlflow-tracking", daemon=True)
        self._thread.start()

    def put(self, call: Call) -> None:
        """Queue a call; never blocks. A full queue drops its oldest call."""
        with self._cond:
            if len(self._queue) >= self._max:
                self._queue.popleft()
                if not self._dropped_warned:
                    self._dropped_warned = True
                    self._warn(f"more than {self._max} updates waiting for the server; the oldest "
                               "are dropped from the MLflow run (the output's manifest keeps the whole history)")
            self._queue.append(call)
            self._cond.notify()

    def close(self, timeout: float) -> None:
        """Send what is queued, for at most `timeout` seconds, giving up at the first failure."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._closed.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._warn(f"the server did not take the last updates within {timeout:g} s; "
                       "the run ends without them")

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def _run(self) -> None:
        delay, outage = self._backoff[0], False
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                call = self._queue[0]
            try:
                self._send(call)
            except Exception as e:  # noqa: BLE001 - whatever the server or the network does, training goes on
                if is_refusal(e):  # the server answered no: retrying would not change its answer
                    if describe(e) not in self._refusals:
                        self._refusals.add(describe(e))
                        self._warn(f"the server refused an update, which is dropped ({describe(e)})")
                    self._pop(call)
                    continue
                if not outage:
                    outage = True
                    self._warn(f"the server is unreachable ({describe(e)}); training goes on, "
                               "the updates are kept and retried in the background")
                with self._cond:
                    if self._closing:
                        n, self._queue = len(self._queue), deque()
                        self._warn(f"{n} updates not sent: the server is still unreachable")
                        return
                self._closed.wait(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            self._pop(call)
            if outage:
                self._warn("the server answers again; the kept updates are being sent")
            delay, outage = self._backoff[0], False

    def _pop(self, call: Call) -> None:
        with self._cond:
            if self._queue and self._queue[0] is call:  # unless put() dropped it meanwhile
                self._queue.popleft()


def is_refusal(e: BaseException) -> bool:
    """An answer of the server that a retry would not change (HTTP 4xx but 429), as MLflow's client raises it."""
    status = getattr(e, "get_http_status_code", lambda: None)()
    return isinstance(status, int) and 400 <= status < 500 and status != 429


def describe(e: BaseException) -> str:
    """One line: the exception's type and the first line of its message, shortened."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def scalars(values: dict, prefix: str) -> dict[str, float]:
    """The finite numbers of an event (nested values, booleans and text left out), named `prefix` + key."""
    return {prefix + k: float(v) for k, v in values.items()
            if isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)}


TRAIN_SKIP = ("step", "total_steps", "eta_seconds")  # the x axis and what only a progress bar needs


def event_metrics(event: dict) -> tuple[int, dict[str, float]] | None:
    """The step and the metrics of a pipeline event that carries some (train, validation, test, baseline)."""
    kind = event.get("event")
    if kind == "train":
        return event["step"], scalars({k: v for k, v in event.items() if k not in TRAIN_SKIP}, "train/")
    if kind in ("validation", "test") and "step" in event:
        return event["step"], scalars({k: v for k, v in event.items() if k != "step"}, f"{kind}/")
    if kind == "baseline":
        return 0, scalars(event, f"baseline/{event.get('split', 'test')}/")
    return None


def flatten(doc: dict, prefix: str = "") -> dict[str, str]:
    """Nested sections as dotted parameter names; lists joined with commas; values cut to MAX_PARAM characters."""
    out: dict[str, str] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            out[prefix + key] = text if len(text) <= MAX_PARAM else text[:MAX_PARAM - 1] + "…"
    return out


def run_params(config: TrainerConfig) -> dict[str, str]:
    """What the run trains, as MLflow parameters."""
    doc = config.dump()
    doc["output"] = {k: v for k, v in doc["output"].items() if k != "uri"}  # a tag
    doc["dataset"].pop("labels", None)  # up to 1024 names: the data report has them
    return flatten({k: doc[k] for k in PARAM_SECTIONS if k in doc})


def mlflow_client(uri: str):
    """MLflow's client for `uri` (imported here: it takes seconds, on the sender's thread)."""
    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class MlflowTracker:
    """Logs one Kubetune run to MLflow from rank 0 (see the module's docstring). `client` makes the client, on the
    sender's thread; `warn` prints a warning for people."""

    def __init__(self, config: TrainerConfig, warn: Callable[[str], None], client: Callable[[str], Any] = mlflow_client,
                 clock: Callable[[], float] = time.time, max_queue: int = MAX_QUEUE,
                 backoff: tuple[float, float] = BACKOFF, flush_seconds: float = FLUSH_SECONDS):
        spec = config.tracking.mlflow
        self.config, self.spec, self.clock, self.flush_seconds = config, spec, clock, flush_seconds
        self.uid = RunIdentity.of(config).uid
        self.output_dir = Path(config.work_dir) / config.job_name / "output"  # where the pipeline saves it
        self._make_client, self._client, self._run_id = client, None, None
        self.sender = Sender(f"MLflow tracking ({spec.uri})", self._send, warn, max_queue, backoff)
        self.sender.put(lambda client, run_id: None)  # open the MLflow run now: its parameters show from the start

    # -- what the pipeline calls ------------------------------------------------------------------------------

    def observe(self, event: dict) -> None:
        """A pipeline event: its metrics are queued; `published` queues the card and plots."""
        found = event_metrics(event)
        if found and found[1]:
            step, values = found
            timestamp = int(self.clock() * 1000)
            self.sender.put(lambda client, run_id: client.log_batch(run_id, metrics=[
                _metric(name, value, timestamp, step) for name, value in values.items()]))
        elif event.get("event") == "published":
            for path in self._artifacts():
                self.sender.put(lambda client, run_id, path=path: client.log_artifact(run_id, str(path)))

    def finish(self, status: str) -> None:
        """End the MLflow run with `status` (FINISHED, KILLED, FAILED) and flush, for at most flush_seconds."""
        self.sender.put(lambda client, run_id: client.set_terminated(run_id, status))
        self.sender.close(self.flush_seconds)

    # -- on the sender's thread -------------------------------------------------------------------------------

    def _send(self, call: Call) -> None:
        if self._client is None:
            self._client = self._make_client(self.spec.uri)
        if self._run_id is None:
            self._run_id = self._open(self._client)
        call(self._client, self._run_id)

    def _open(self, client) -> str:
        """This Kubetune run's MLflow run: found by its run-id tag (a resumed run: RUNNING again) or created, with
        its tags and parameters. Returns its id."""
        experiment = client.get_experiment_by_name(self.spec.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.spec.experiment)
        found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{self.uid}'",
                                   max_results=1)
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            return run_id
        run = client.create_run(experiment_id, run_name=f"{self.config.job_name}-{self.uid[:8]}", tags=self._tags())
        params = [_param(k, v) for k, v in run_params(self.config).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 parameters
            client.log_batch(run.info.run_id, params=params[i:i + 100])
        return run.info.run_id

    def _tags(self) -> dict[str, str]:
        tags = {"kubetune.job": self.config.job_name, RUN_ID_TAG: self.uid,
                "kubetune.output_uri": self.config.output.uri}
        if os.environ.get("KUBETUNE_NAMESPACE"):  # the operator sets it
            tags["kubetune.namespace"] = os.environ["KUBETUNE_NAMESPACE"]
        return tags

    def _artifacts(self) -> list[Path]:
        return sorted({p for pattern in ARTIFACTS for p in self.output_dir.glob(pattern) if p.is_file()})


def _metric(name: str, value: float, timestamp: int, step: int):
    from mlflow.entities import Metric

    return Metric(name, value, timestamp, step)


def _param(name: str, value: str):
    from mlflow.entities import Param

    return Param(name, value)


def status_of(error: BaseException | None) -> str:
    """The MLflow run status for how the pipeline ended: stopped to resume (SIGTERM, a peer lost) is KILLED."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, (Preempted, PeerLost, KeyboardInterrupt)) else "FAILED"


def is_rank_zero() -> bool:
    """Rank 0 of the run, before accelerate starts: torchrun and the operator set RANK; a single process has none."""
    return int(os.environ.get("RANK") or 0) == 0


@contextmanager
def tracked(config: TrainerConfig, report: Reporter, make=MlflowTracker) -> Iterator[Reporter]:
    """The pipeline's reporter, also feeding the run's tracker (rank 0 with spec.tracking.mlflow); the MLflow run
    ends with the pipeline's outcome. Warnings go to `report` as `tracking` events."""
    if config.tracking.mlflow is None or not is_rank_zero():
        yield report
        return
    tracker = make(config, lambda message: report({"event": "tracking", "warning": message}))

    def reporting(event: dict) -> None:
        report(event)
        tracker.observe(event)

    try:
        yield reporting
    except BaseException as e:
        tracker.finish(status_of(e))
        raise
    tracker.finish(status_of(None))
