"""The trainer's heartbeat gauge: set where work completes (steps, evaluation batches, storage transfers), so the
operator can tell a hung trainer (no beats) from a slow one."""

from __future__ import annotations

import socket
import sys
import threading
import time
import urllib.request
from collections import Counter
from types import SimpleNamespace

import pytest
from kubetune_api import METRICS_LINGER_ENV, OPERATOR_SCRAPER, StorageEndpoint
from kubetune_dev.s3server import FAKE_CREDENTIALS
from kubetune_trainer import metrics as metrics_module
from kubetune_trainer.errors import TransientError
from kubetune_trainer.metrics import TrainerMetrics
from kubetune_trainer.pipeline import run
from kubetune_trainer.storage import Storage, publish, read_published

HEARTBEAT = "kubetune_trainer_heartbeat_timestamp_seconds"
MiB = 1024 * 1024


def heartbeat(m: TrainerMetrics) -> float | None:
    return m.registry.get_sample_value(HEARTBEAT, {"finetunejob": m.job})


class Recorder:
    """Stands in for TrainerMetrics.beat: records every call and its min_interval."""

    def __init__(self):
        self.calls: list[float] = []

    def __call__(self, min_interval: float = 0.0) -> None:
        self.calls.append(min_interval)

    @property
    def per_request(self) -> int:  # beats after a request or file completed
        return self.calls.count(0.0)

    @property
    def while_moving(self) -> int:  # rate-limited beats from boto3's transfer callback
        return self.calls.count(1.0)


def test_beat_sets_the_gauge_and_rate_limits(monkeypatch):
    clock = iter([1000.0, 1000.5, 1000.7, 1001.2, 1001.8, 500.0])
    m = TrainerMetrics("hb", "lora", "s3://models/tiny/")
    assert heartbeat(m) == pytest.approx(time.time(), abs=60)  # beats from the start (phase downloading)
    monkeypatch.setattr(metrics_module, "time", SimpleNamespace(time=lambda: next(clock)))  # this module only
    m.beat(min_interval=1.0)
    assert heartbeat(m) == 1000.0
    m.beat(min_interval=1.0)  # 0.5 s later: skipped
    assert heartbeat(m) == 1000.0
    m.beat()  # no limit: always
    assert heartbeat(m) == 1000.7
    m.beat(min_interval=1.0)  # 0.5 s after the last beat
    assert heartbeat(m) == 1000.7
    m.beat(min_interval=1.0)
    assert heartbeat(m) == 1001.8
    m.beat(min_interval=1.0)  # the clock stepped back: beat rather than stall
    assert heartbeat(m) == 500.0


def test_evaluation_gauges_carry_scalars_only_and_drop_stale_ones():
    m = TrainerMetrics("ev", "lora", "s3://models/tiny/")

    def evaluation() -> dict:
        return {(s.labels["split"], s.labels["model"], s.labels["metric"]): s.value
                for family in m.registry.collect() for s in family.samples if s.name == "kubetune_trainer_evaluation"}

    m.set_evaluation("test", "baseline", {"loss": 2.5, "accuracy": 0.3, "samples": 84})
    m.set_evaluation("validation", "finetuned", {"loss": 1.0, "f1": float("nan"), "ok": True, "per_class": {"a": {}},
                                                 "confusion_matrix": [[1, 0], [0, 1]], "accuracy": 0.5})
    assert evaluation() == {("test", "baseline", "loss"): 2.5, ("test", "baseline", "accuracy"): 0.3,
                            ("test", "baseline", "samples"): 84, ("validation", "finetuned", "loss"): 1.0,
                            ("validation", "finetuned", "accuracy"): 0.5}
    m.set_evaluation("validation", "finetuned", {"loss": 0.8, "accuracy": float("inf")})  # the next evaluation
    assert evaluation()[("validation", "finetuned", "loss")] == 0.8
    assert ("validation", "finetuned", "accuracy") not in evaluation()  # not the previous evaluation's value


def test_lingering_ends_once_a_scrape_has_read_the_final_values(monkeypatch):
    """KUBETUNE_METRICS_LINGER_SECONDS bounds the wait; a scrape after the run ends it (the image sets 30 s: a
    sweep's trial, whose result is the pod's termination message, would wait them out otherwise), but not the
    operator's. A process lingers once, at its end: each case has its own metrics (a scrape answered after one
    linger began would otherwise end the next one whenever the server closes it)."""
    def finished(name: str) -> tuple[TrainerMetrics, int]:
        m = TrainerMetrics(name, "lora", "s3://models/tiny/")
        port = m.serve(0)
        m.set_phase("done")
        return m, port

    m, port = finished("linger")
    monkeypatch.setenv(METRICS_LINGER_ENV, "0.5")
    started = time.monotonic()
    m.linger()  # nobody scrapes: the whole time
    assert 0.5 <= time.monotonic() - started < 1.5
    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()  # still served afterwards

    # the operator's scrapes (its progress, every few seconds) do not end it: Prometheus would miss the values
    m, port = finished("by-operator")
    monkeypatch.setenv(METRICS_LINGER_ENV, "1.5")
    operator = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"User-Agent": OPERATOR_SCRAPER})
    by_operator = threading.Timer(0.3, lambda: urllib.request.urlopen(operator, timeout=5).read())
    started = time.monotonic()
    by_operator.start()
    m.linger()
    assert time.monotonic() - started >= 1.5
    by_operator.join()

    m, port = finished("scraped")
    monkeypatch.setenv(METRICS_LINGER_ENV, "60")
    bodies: list[str] = []
    scraper = threading.Timer(0.5, lambda: bodies.append(
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()))
    started = time.monotonic()
    scraper.start()
    m.linger()  # until the scrape's response has gone out, then the process may exit
    assert time.monotonic() - started < 10
    scraper.join()
    assert 'kubetune_trainer_phase{finetunejob="scraped",phase="done"} 1.0' in bodies[0]


def test_lingering_ends_when_the_final_values_have_been_sent_not_before():
    """The wait ends when the server has written a final scrape's response (it closes the body then, PEP 3333), not
    when the values were collected (the process would exit while the response is still being written) nor after a
    fixed time; a scrape that collected before the values were final does not end it, nor does the operator's."""
    m = TrainerMetrics("sent", "lora", "s3://models/tiny/")
    app = m.wsgi_app()

    def scrape(agent: str = "Prometheus/3.0"):
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": "", "HTTP_USER_AGENT": agent}
        return app(environ, lambda status, headers: None)

    early = scrape()  # collected while training
    m._final = True  # what linger() sets first
    operators, final = scrape(OPERATOR_SCRAPER), scrape()
    assert b'kubetune_trainer_phase{finetunejob="sent",phase="downloading"} 1.0' in b"".join(final)
    assert len(final) == 1 and not m._scraped.is_set()  # collected (one block: Content-Length), not yet sent
    for body in (early, operators):
        getattr(body, "close", lambda: None)()
    assert not m._scraped.is_set()
    final.close()  # the server has written the body
    assert m._scraped.is_set()


def test_storage_beats_per_file_and_while_bytes_move(s3, tmp_path):
    storage = Storage(StorageEndpoint(endpoint=s3.endpoint), multipart_threshold=5 * MiB,
                      multipart_chunksize=5 * MiB, max_concurrency=2)
    beats = Recorder()
    beating = storage.with_heartbeat(beats)
    assert storage.heartbeat is None and beating.heartbeat is beats  # a copy; the original stays silent

    big = tmp_path / "out" / "adapter_model.safetensors"
    big.parent.mkdir()
    big.write_bytes(b"\1" * (11 * MiB))  # 3 parts
    (tmp_path / "out" / "adapter_config.json").write_text("{}")
    (tmp_path / "out" / "tokenizer.json").write_text("{}")
    publish(beating, tmp_path / "out", "s3://adapters/heartbeat/", {"kind": "test"})
    assert beats.while_moving >= 3, beats.calls  # the multipart upload beat as its parts went up
    assert beats.per_request >= 3 + 1, beats.calls  # each file, and the manifest

    beats.calls.clear()
    read_published(beating, "s3://adapters/heartbeat/", tmp_path / "back")
    assert beats.while_moving >= 1 and beats.per_request >= 3, beats.calls
    assert (tmp_path / "back" / big.name).stat().st_size == 11 * MiB

    beats.calls.clear()
    publish(Storage().with_heartbeat(beats), tmp_path / "out", str(tmp_path / "local"), {"kind": "test"})
    assert beats.per_request >= 3, beats.calls  # local copies beat per file too


def test_storage_that_moves_nothing_does_not_beat(tmp_path, monkeypatch):
    for name, value in FAKE_CREDENTIALS.items():  # signed requests, as to any server (no S3 server started here)
        monkeypatch.setenv(name, value)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = Storage(StorageEndpoint(endpoint=f"http://127.0.0.1:{port}"), max_attempts=1, connect_timeout=1)
    beats = Recorder()
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1024)
    with pytest.raises(TransientError):
        dead.with_heartbeat(beats).upload_file(src, "s3://adapters/f.bin")
    assert beats.calls == []


@pytest.mark.slow
def test_a_tiny_run_beats_at_every_step_and_through_uploads(make_config, monkeypatch):
    instances: list[TrainerMetrics] = []
    callers: Counter[str] = Counter()
    original = TrainerMetrics.beat

    def spy(self, min_interval: float = 0.0) -> None:
        if not instances:
            instances.append(self)
        callers[sys._getframe(1).f_code.co_name] += 1
        original(self, min_interval)

    monkeypatch.setattr(TrainerMetrics, "beat", spy)
    seen: list[tuple[str, float]] = []

    def report(event: dict) -> None:
        if instances:
            seen.append((event["event"], heartbeat(instances[0])))
        if event["event"] == "published":  # the endpoint exports it, labelled like the other gauges
            port = instances[0].port
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            assert f'{HEARTBEAT}{{finetunejob="heartbeat-lora"}}' in text

    started = time.time()
    config = make_config("heartbeat-lora", hyperparameters={"maxSteps": 8}, evaluation={"everySteps": 4},
                         checkpoint={"everySteps": 4, "keep": 1})
    manifest = run(config, report=report)
    assert manifest["steps"] == 8

    values = [v for _, v in seen]
    assert values == sorted(values), seen  # never goes back
    train_values = [v for e, v in seen if e == "train"]
    assert len(train_values) == 2 and train_values[0] < train_values[1]  # advances step by step
    assert started <= values[0] and values[-1] <= time.time()
    assert heartbeat(instances[0]) >= values[-1]

    assert callers["_train"] == 8, callers  # once per optimizer step (train's loop)
    assert callers["evaluate"] >= 3, callers  # per batch: validation at steps 4 and 8, then test
    assert callers["_checkpoint"] == 2, callers  # the checkpoint at step 4, around its local save
    assert callers["_beat"] > 10, callers  # storage: fetch, resume check, checkpoint and adapter uploads
    assert callers["<lambda>"] >= 1, callers  # boto3's transfer callback while bytes moved
    assert callers["tree_sha256"] >= 2 and callers["validate_splits"] == 3, callers
    assert callers["sink"] == 3, callers  # per chunk of records validated and tokenized (one per split here)
