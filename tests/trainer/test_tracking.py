"""MLflow tracking (tracking.py) with a fake client: what is logged, and that a slow, failing or unreachable server
never holds up the caller (asserted on the calls made, not on wall time). The real server: test_tracking_server.py."""

from __future__ import annotations

import threading
import time

import pytest
from kubetune_api import TrainerConfig
from kubetune_trainer import redact, tracking
from kubetune_trainer.errors import PeerLost, Preempted
from mlflow.exceptions import MlflowException, RestException

URI = "http://mlflow.example:5000"


def config(tmp_path, **extra) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "jobName": "support-bot", "runId": "uid-1234567890", "baseModel": {"uri": "s3://models/tiny/"},
        "dataset": {"train": "s3://data/train.jsonl", "test": "s3://data/test.jsonl"},
        "output": {"uri": "s3://adapters/support-bot/"}, "workDir": str(tmp_path),
        "tracking": {"mlflow": {"uri": URI, "experiment": "support", "secretRef": {"name": "mlflow-token"}}},
        **extra})


class Run:
    def __init__(self, run_id: str):
        self.info = type("Info", (), {"run_id": run_id})()


class FakeClient:
    """MlflowClient's calls as records. `gate`: each call waits for it (a server that hangs); `failures`: the next
    calls raise it (a server that is down)."""

    def __init__(self, existing: str | None = None):
        self.calls: list[tuple] = []
        self.existing = existing
        self.gate: threading.Event | None = None
        self.failures: list[Exception] = []
        self.entered = threading.Event()

    def _call(self, name: str, *args):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)
        self.calls.append((name, *args))

    def get_experiment_by_name(self, name):
        self._call("get_experiment_by_name", name)
        return None

    def create_experiment(self, name):
        self._call("create_experiment", name)
        return "7"

    def search_runs(self, experiment_ids, filter_string, max_results):
        self._call("search_runs", tuple(experiment_ids), filter_string)
        return [Run(self.existing)] if self.existing else []

    def create_run(self, experiment_id, run_name, tags):
        self._call("create_run", experiment_id, run_name, tags)
        return Run("r-1")

    def update_run(self, run_id, status):
        self._call("update_run", run_id, status)

    def log_batch(self, run_id, metrics=(), params=()):
        self._call("log_batch", run_id, {m.key: (m.value, m.step) for m in metrics} or
                   {p.key: p.value for p in params})

    def log_artifact(self, run_id, path):
        self._call("log_artifact", run_id, path)

    def set_terminated(self, run_id, status):
        self._call("set_terminated", run_id, status)

    def named(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]


def tracker(tmp_path, client: FakeClient, warnings: list, **kwargs) -> tracking.MlflowTracker:
    kwargs.setdefault("backoff", (0.001, 0.002))
    kwargs.setdefault("flush_seconds", 10)
    return tracking.MlflowTracker(config(tmp_path), warnings.append, client=lambda uri: client,
                                  clock=lambda: 1000.0, **kwargs)


def until(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


TRAIN = {"event": "train", "step": 4, "total_steps": 8, "epoch": 0.5, "loss": 2.5, "learning_rate": 1e-3,
         "grad_norm": 0.7, "tokens_per_second": 900.0, "samples_per_second": 3.0, "eta_seconds": 10.0}


def test_the_run_gets_its_tags_parameters_metrics_artifacts_and_status(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_NAMESPACE", "team-a")
    out = tmp_path / "support-bot" / "output"
    out.mkdir(parents=True)
    for name in ("README.md", "loss.png", "adapter_model.safetensors"):
        (out / name).write_text("x")
    client, warnings = FakeClient(), []
    t = tracker(tmp_path, client, warnings)
    for event in (
        {"event": "baseline", "split": "test", "loss": 3.0, "per_class": {"a": {"f1": 0.5}}},
        TRAIN,
        {"event": "validation", "step": 8, "loss": 2.0, "accuracy": float("nan"), "early": True},
        {"event": "test", "step": 8, "loss": 1.9, "perplexity": 6.7},
        {"event": "published", "uri": "s3://adapters/support-bot/"},
    ):
        t.observe(event)
    t.finish("FINISHED")

    names = [c[0] for c in client.calls]
    assert names[:4] == ["get_experiment_by_name", "create_experiment", "search_runs", "create_run"]
    assert client.named("search_runs")[0][2] == "tags.`kubetune.run_id` = 'uid-1234567890'"
    _, experiment, run_name, tags = client.named("create_run")[0]
    assert (experiment, run_name) == ("7", "support-bot-uid-1234")
    assert tags == {"kubetune.job": "support-bot", "kubetune.run_id": "uid-1234567890",
                    "kubetune.output_uri": "s3://adapters/support-bot/", "kubetune.namespace": "team-a"}
    params = client.named("log_batch")[0][2]
    assert params["baseModel.uri"] == "s3://models/tiny/" and params["dataset.test"] == "s3://data/test.jsonl"
    assert params["hyperparameters.learningRate"] == "0.0002" and params["method.type"] == "lora"
    assert params["method.lora.targetModules"] == "all-linear"
    assert not [k for k in params if k.startswith(("tracking", "storage", "output.uri"))]
    metrics = [c[2] for c in client.named("log_batch")[1:]]
    assert metrics == [
        {"baseline/test/loss": (3.0, 0)},
        {"train/epoch": (0.5, 4), "train/loss": (2.5, 4), "train/learning_rate": (1e-3, 4),
         "train/grad_norm": (0.7, 4), "train/tokens_per_second": (900.0, 4), "train/samples_per_second": (3.0, 4)},
        {"validation/loss": (2.0, 8)},  # NaN and booleans left out
        {"test/loss": (1.9, 8), "test/perplexity": (6.7, 8)},
    ]
    assert [c[2] for c in client.named("log_artifact")] == [str(out / "README.md"), str(out / "loss.png")]
    assert client.calls[-1] == ("set_terminated", "r-1", "FINISHED")
    assert warnings == []


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    """The run-id tag finds the MLflow run of the first start: RUNNING again, no new run, no parameters again."""
    client = FakeClient(existing="r-first")
    t = tracker(tmp_path, client, [])
    t.observe(TRAIN)
    t.finish("KILLED")
    assert [c[0] for c in client.calls] == ["get_experiment_by_name", "create_experiment", "search_runs",
                                            "update_run", "log_batch", "set_terminated"]
    assert client.named("update_run") == [("update_run", "r-first", "RUNNING")]
    assert client.named("log_batch")[0][1] == "r-first"


def test_a_hanging_server_never_holds_up_the_training_loop(tmp_path):
    """The server takes the first call and never answers: a loop of 2,000 logging steps still runs to its end,
    while the sender waits in that one call; the updates are kept (up to the queue's bound) and sent once it
    answers."""
    client, warnings = FakeClient(), []
    client.gate = threading.Event()
    t = tracker(tmp_path, client, warnings, max_queue=500)
    assert client.entered.wait(10)  # the sender is inside its first call
    for step in range(1, 2001):
        t.observe({**TRAIN, "step": step})
    assert client.calls == []  # nothing answered, and yet the loop is done
    assert len(warnings) == 1 and "oldest are dropped" in warnings[0]
    client.gate.set()
    t.finish("FINISHED")
    steps = [next(iter(c[2].values()))[1] for c in client.named("log_batch")[1:]]
    assert steps == list(range(1502, 2001))  # the newest 499 (with set_terminated: 500 queued)
    assert client.calls[-1][0] == "set_terminated"


def test_an_outage_is_one_warning_and_the_updates_arrive_in_order(tmp_path):
    client, warnings = FakeClient(), []
    client.failures = [MlflowException("API request to http://mlflow.example:5000 failed: Connection refused")] * 5
    t = tracker(tmp_path, client, warnings)
    for step in (4, 8, 12):
        t.observe({**TRAIN, "step": step})
    assert until(lambda: len(client.named("log_batch")) == 4)  # retried in the background, before the end
    t.finish("FINISHED")
    assert [next(iter(c[2].values()))[1] for c in client.named("log_batch")[1:]] == [4, 8, 12]
    assert len(warnings) == 2, warnings
    assert "unreachable" in warnings[0] and "training goes on" in warnings[0] and URI in warnings[0]
    assert "answers again" in warnings[1]


def test_retries_back_off_whatever_the_loop_logs(tmp_path):
    """While the server is down, new updates wait their turn: the sender retries on its backoff, not at each
    logging step."""
    client, warnings = FakeClient(), []
    client.failures = [MlflowException("Connection refused")] * 1000
    t = tracker(tmp_path, client, warnings, backoff=(3600.0, 3600.0))
    assert until(lambda: len(client.failures) == 999)  # the first attempt failed; the next is an hour away
    for step in range(1, 101):
        t.observe({**TRAIN, "step": step})
    time.sleep(0.2)
    assert len(client.failures) == 999 and t.sender.pending() == 101
    assert len(warnings) == 1
    t.finish("FAILED")  # one more try, then given up: the sender's thread ends
    assert not t.sender._thread.is_alive()


def test_parameters_are_flat_and_short():
    params = tracking.flatten({"a": {"b": 1, "c": ["x", "y"]}, "d": "z" * 600})
    assert params["a.b"] == "1" and params["a.c"] == "x,y"
    assert len(params["d"]) == tracking.MAX_PARAM and params["d"].endswith("…")


def test_an_update_the_server_refuses_is_dropped_with_a_warning(tmp_path):
    client, warnings = FakeClient(), []
    t = tracker(tmp_path, client, warnings)
    assert until(lambda: client.named("log_batch"))  # the run is open (its parameters logged)
    refusal = RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "metric name too long"})
    client.failures = [refusal, refusal]
    for step in (4, 8, 12):
        t.observe({**TRAIN, "step": step})
    t.finish("FINISHED")
    assert [w for w in warnings if "refused" in w and "metric name too long" in w] == warnings, warnings
    assert len(warnings) == 1  # told once
    assert [next(iter(c[2].values()))[1] for c in client.named("log_batch")[1:]] == [12]
    assert client.calls[-1] == ("set_terminated", "r-1", "FINISHED")


def test_the_end_gives_up_at_once_on_a_server_still_down(tmp_path):
    """The flush at the end tries once more and drops the rest: the run's end waits for one failing call, not
    for the backoff or the flush bound."""
    client, warnings = FakeClient(), []
    client.failures = [MlflowException("Connection refused")] * 1000
    t = tracker(tmp_path, client, warnings, backoff=(3600.0, 3600.0), flush_seconds=3600)
    for step in range(1, 11):
        t.observe({**TRAIN, "step": step})
    attempts_before = 1000 - len(client.failures)
    t.finish("FAILED")
    assert not t.sender._thread.is_alive()
    assert 1000 - len(client.failures) - attempts_before <= 1  # one more try at most, then given up
    assert "unreachable" in warnings[0] and "updates not sent" in warnings[-1]


@pytest.mark.parametrize(("error", "status"), [
    (None, "FINISHED"), (Preempted("SIGTERM"), "KILLED"), (PeerLost("peer"), "KILLED"),
    (ValueError("bad"), "FAILED"),
])
def test_status_of_how_the_pipeline_ended(error, status):
    assert tracking.status_of(error) == status


def test_tracked_ends_the_mlflow_run_with_the_pipelines_outcome(tmp_path, monkeypatch):
    ended, events = [], []

    class Recorder:
        def __init__(self, config, warn):
            self.observed = []

        def observe(self, event):
            self.observed.append(event)

        def finish(self, status):
            ended.append(status)

    with pytest.raises(Preempted):
        with tracking.tracked(config(tmp_path), events.append, make=Recorder) as report:
            report(TRAIN)
            raise Preempted("SIGTERM")
    assert ended == ["KILLED"] and events == [TRAIN]
    monkeypatch.setenv("RANK", "1")  # another rank: the reporter as it was, no tracker
    with tracking.tracked(config(tmp_path), events.append, make=Recorder) as report:
        assert report == events.append
    monkeypatch.delenv("RANK")
    without = config(tmp_path, tracking={})
    with tracking.tracked(without, events.append, make=Recorder) as report:
        assert report == events.append
    assert ended == ["KILLED"]


def test_refusals_and_outages_are_told_apart():
    assert tracking.is_refusal(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "x"}))
    assert not tracking.is_refusal(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "x"}))
    assert not tracking.is_refusal(MlflowException("API request failed with exception ConnectionError"))
    assert not tracking.is_refusal(ConnectionError("refused"))


def test_kubetune_run_shows_a_tracking_warning_as_one_line():
    from tests.trainer.test_cli_output import printed

    warning = f"MLflow tracking ({URI}): the server is unreachable (MlflowException: refused); training goes on"
    assert printed([{"event": "tracking", "warning": warning}]).splitlines() == [f"tracking {warning}"]


def test_the_tracking_token_is_redacted(monkeypatch):
    token = "mlflow-canary-0123456789abcdef"
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-canary-42")
    text = redact.redact(f"headers {{'Authorization': 'Bearer {token}'}} password=pw-canary-42 "
                         f"MLFLOW_TRACKING_TOKEN={token}")
    assert token not in text and "pw-canary-42" not in text
    assert redact.redact("Authorization: Bearer abcdefgh12345678") == "Authorization: Bearer ***"
