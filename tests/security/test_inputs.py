"""Bad input can never loop or exhaust memory (issue 27.6).

The attacker writes the dataset (or a file in a prefix the job reads) to make the validator crash the same way on
every attempt: a gigabyte-long line, JSON nested past Python's recursion limit, a tiny PNG that decodes to
gigabytes, records that need more memory than the pod has. Each test checks the answer: a DatasetError (exit 65)
naming the file and line, or for the memory budget a ConfigError (exit 78) naming spec.validation.memory; all
permanent, so the operator does not retry them. What still fails transiently every time is retried a bounded number
of times: the last test runs the operator on the real control plane.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
from kubetune_api import EXIT_CONFIG_INVALID, DataFormat, TrainerConfig
from kubetune_trainer.data.records import MAX_RECORD_BYTES, load_records
from kubetune_trainer.errors import DatasetError

from tests.datafixtures import tiny_tokenizer
from tests.faults import FaultProxy
from tests.kube import get_json
from tests.operator_tests import test_e2e as e2e

crd, s3_inputs, fake_trainer, author_policy = e2e.crd, e2e.s3_inputs, e2e.fake_trainer, e2e.author_policy  # fixtures
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]

ROOT = Path(__file__).resolve().parents[2]
DEEP = 100_000  # levels of JSON nesting: far past Python's recursion limit (1000)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- a maximum record size -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "good", "huge"), [
    (".jsonl", b'{"text": "fine"}\n', b'{"text": "' + b"a" * (MAX_RECORD_BYTES + 1) + b'"}\n'),
    (".csv", b"text,label\nfine,a\n", b"x" * (MAX_RECORD_BYTES + 1) + b",b\n"),
    (".jsonl", b'{"text": "fine"}\n', b"a" * (MAX_RECORD_BYTES * 4)),  # no line break at all
])
def test_a_line_longer_than_the_record_cap_is_refused_naming_it(tmp_path, suffix, good, huge):
    """Attack: one line of a data file far longer than any record (gigabytes, in the real attack: a file with no
    line break at all). Answer: DatasetError naming the file and the line, having read at most 16 MiB of it."""
    path = write(tmp_path / f"train{suffix}", good + huge)
    line = 3 if suffix == ".csv" else 2
    with pytest.raises(DatasetError, match=rf"^s3://b/train{suffix}:{line}: the record is longer than 16 MiB"):
        list(load_records(path, f"s3://b/train{suffix}"))


def test_a_json_array_element_longer_than_the_record_cap_is_refused(tmp_path):
    """The same cap for a JSON array's elements (named by their place in the array)."""
    path = write(tmp_path / "train.json", b'[{"text": "fine"}, {"text": "' + b"a" * (MAX_RECORD_BYTES + 2) + b'"}]')
    with pytest.raises(DatasetError, match=r"train\.json:2: the record is longer than 16 MiB"):
        list(load_records(path))


# -- nesting and memory while parsing or checking --------------------------------------------------------------


def test_json_nested_past_the_recursion_limit_names_the_line(tmp_path):
    """Attack: a record of 100,000 nested arrays (a few hundred kilobytes), which makes Python's JSON decoder raise
    RecursionError. Answer: DatasetError naming the line, in the streaming validator (causal-lm) as in the
    record readers the classification tasks use (JSONL and JSON arrays)."""
    from kubetune_trainer.data import validate_dataset

    deep = b'{"text": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    jsonl = write(tmp_path / "train.jsonl", b'{"text": "fine"}\n' * 3 + deep + b"\n")
    with pytest.raises(DatasetError, match=r"train\.jsonl:4: the record is nested too deeply to read"):
        validate_dataset(jsonl, None, fmt=DataFormat.auto, tokenizer=tiny_tokenizer(), max_seq_length=64,
                         workers=1)
    with pytest.raises(DatasetError, match=r"train\.jsonl:4: the record is nested too deeply"):
        list(load_records(jsonl))
    array = write(tmp_path / "train.json", b'[{"text": "fine"}, ' + deep + b"]")
    with pytest.raises(DatasetError, match=r"train\.json:2: the record is nested too deeply"):
        list(load_records(array))


def test_a_record_too_deep_for_the_checks_names_the_line(tmp_path, monkeypatch):
    """A record that parses but is nested too deeply (or is too large) for the checks that walk it: the
    RecursionError or MemoryError there is the record's DatasetError too, not a crash of the validator."""
    from kubetune_trainer.data import stream, validate_dataset

    jsonl = write(tmp_path / "train.jsonl", b'{"text": "fine"}\n{"text": "boom"}\n')
    real = stream.check_record

    for error in (RecursionError, MemoryError):
        def check(value, fmt, error=error):
            if value.get("text") == "boom":
                raise error()
            return real(value, fmt)

        monkeypatch.setattr(stream, "check_record", check)
        expected = "is nested too deeply" if error is RecursionError else "does not fit in the memory"
        with pytest.raises(DatasetError, match=rf"train\.jsonl:2: the record {expected}"):
            validate_dataset(jsonl, None, fmt=DataFormat.auto, tokenizer=tiny_tokenizer(), max_seq_length=64,
                             workers=1)


# -- images that decode to gigabytes ---------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """The first bytes of a PNG claiming width x height pixels: all Pillow needs to know its size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    from kubetune_dev.tiny_vision import make_tiny_vit

    return make_tiny_vit(tmp_path_factory.mktemp("vit"), image_size=32, patch_size=8, hidden_size=32, layers=2,
                         heads=2)


def image_config(tmp_path: Path, model: Path, train: Path) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "jobName": "inputs", "task": "image-classification", "baseModel": {"uri": str(model)},
        "dataset": {"train": str(train)}, "output": {"uri": str(tmp_path / "out")}, "metrics": {"port": 0},
        "workDir": str(tmp_path / "work")})


def test_a_decompression_bomb_is_refused_naming_the_image_and_line(tmp_path, vit):
    """Attack: a 60-megapixel PNG of a few bytes (Pillow itself only warns below 89 Mpx and decodes it). Answer:
    the image is refused on open, before a pixel is decoded: DatasetError naming the record's line and the image,
    and what to do."""
    from kubetune_trainer.images import MAX_IMAGE_PIXELS, decode_problem
    from kubetune_trainer.validation import validate_only
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "ok.png")
    Image.new("RGB", (32, 32), "white").save(tmp_path / "images" / "ok2.png")  # not a repeat: the checks keep it
    write(tmp_path / "images" / "bomb.png", png_header(10_000, 6_000))
    assert 10_000 * 6_000 > MAX_IMAGE_PIXELS
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"image": f"images/{name}", "label": label}) + "\n"
                             for name, label in [("ok.png", "a"), ("ok2.png", "b"), ("bomb.png", "a")]))
    config = image_config(tmp_path, vit, train)
    with pytest.raises(DatasetError, match=rf"{train}:3: image .*bomb\.png cannot be decoded \(it is too large to "
                                           r"decode .*60000000 pixels.*\) \(resize the image below 50 megapixels"):
        validate_only(config)
    assert decode_problem(tmp_path / "images" / "ok.png") is None


# -- the validator's memory budget ---------------------------------------------------------------------------


def test_the_watchdog_reports_once_past_the_budget():
    """The budget's watchdog calls back once when the use passes 90% of the limit, with what to change."""
    from kubetune_trainer import memory

    used = [100]
    told: list[str] = []
    done = threading.Event()
    stop = memory.watch(lambda m: (told.append(m), done.set()), limit=1000 * memory.MiB,
                        usage=lambda: used[0] * memory.MiB)
    assert stop is not None and not done.wait(3 * memory.POLL_SECONDS)
    used[0] = 950
    assert done.wait(5) and len(told) == 1
    assert told[0].startswith("validation used 950 MiB of its 1000 MiB memory limit")
    assert "raise spec.validation.memory" in told[0]
    stop.set()


def test_the_limit_comes_from_the_environment_or_the_cgroup(tmp_path):
    from kubetune_trainer.memory import limit_bytes, usage_bytes

    (tmp_path / "memory.max").write_text("max\n")
    assert limit_bytes({}, tmp_path) is None
    assert limit_bytes({"KUBETUNE_MEMORY_LIMIT": "1073741824"}, tmp_path) == 1 << 30
    (tmp_path / "memory.max").write_text("536870912\n")
    (tmp_path / "memory.current").write_text("300000000\n")
    (tmp_path / "memory.stat").write_text("anon 200000000\ninactive_file 100000000\n")
    assert limit_bytes({}, tmp_path) == 512 << 20
    assert usage_bytes(tmp_path) == 200_000_000  # the working set: page cache that can go is not counted
    assert usage_bytes(tmp_path / "none") > 0  # no cgroup limit: this process's own memory


def test_validation_over_its_memory_limit_stops_clearly_instead_of_an_oom_kill(tmp_path, vit):
    """Attack: data that needs more memory than the validation pod has (here: a limit of 64 MiB, which the
    validator's own libraries pass). Answer: `kubetune validate` stops itself with exit 78 (ConfigInvalid, not
    retried) and a termination message naming the limit and spec.validation.memory, rather than being
    OOMKilled (a failure with no reason, retried)."""
    import yaml

    (tmp_path / "train.jsonl").write_text(json.dumps({"image": "x.png", "label": "a"}) + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(image_config(tmp_path, vit, tmp_path / "train.jsonl").dump()))
    termination = tmp_path / "termination-log"
    env = {**os.environ, "KUBETUNE_MEMORY_LIMIT": str(64 << 20), "KUBETUNE_TERMINATION_LOG": str(termination),
           "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("api", "operator", "trainer-image", "testing"))}
    done = subprocess.run([sys.executable, "-m", "kubetune_trainer", "validate", "--config", str(config)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_CONFIG_INVALID, done.stderr
    message = termination.read_text()
    assert message.startswith("ConfigInvalid: validation used ") and "of its 64 MiB memory limit" in message
    assert "raise spec.validation.memory" in message and "memory limit" in done.stderr


# -- validation that fails every time ends -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def impatient_operator(control_plane, crd, author_policy, tmp_path_factory):
    """The operator, trying validation twice (the chart's validation.maxAttempts: 2), with the admission policy in
    force (the job names a Secret of its namespace for an endpoint of its own)."""
    yield from e2e.run_operator(tmp_path_factory, e2e.operator_env(
        control_plane, KUBETUNE_VALIDATION_MAX_ATTEMPTS="2", KUBETUNE_POLICY_BINDING=author_policy))


@pytest.mark.cluster
@pytest.mark.e2e
def test_validation_that_fails_every_time_ends_failed_not_retried_forever(control_plane, node_agent, namespace,
                                                                          impatient_operator, s3_inputs,
                                                                          fake_trainer):
    """Attack: a job whose validation fails transiently on every attempt (here: its storage answers 503 forever;
    a crash or an OOM kill would do the same), which used to make a new validation Job, pod and Warning Event
    forever. Answer: after validation.maxAttempts Jobs (counted in status.validationAttempts) the job is Failed
    with reason ValidationFailed and the last failure's message, no training Job is created, and the operator's
    failure metric counts it under ValidationFailed."""
    import urllib.request

    e2e.credentials(control_plane, namespace)
    with FaultProxy(s3_inputs["endpoint"]) as proxy:
        proxy.inject("*", "", "status", status=503, times=None)  # storage down, for good
        spec = e2e.training_spec(s3_inputs, fake_trainer, hyperparameters={"maxSteps": 3})
        spec["storage"]["endpoint"] = proxy.endpoint
        e2e.submit(control_plane, namespace, "storage-down", spec)
        status = e2e.wait_phase(control_plane, namespace, "storage-down", ("Succeeded", "Failed"),
                                timeout=420)["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "ValidationFailed"), status
    assert status["validationAttempts"] == 2
    assert status["message"].startswith("validation failed 2 times, as many as the operator tries "
                                        "(validation.maxAttempts); the last: "), status["message"]
    assert "StorageUnavailable" in status["message"], status["message"]
    reasons = [e["reason"] for e in e2e.events_of(control_plane, namespace, "storage-down",
                                                  {"ValidationRetrying": 1, "ValidationFailed": 1})]
    assert reasons.count("ValidationRetrying") == 1 and reasons.count("ValidationFailed") == 1, reasons
    jobs = [j["metadata"]["name"] for j in get_json(control_plane, "jobs", "-n", namespace)["items"]]
    assert "storage-down-train" not in jobs
    metrics = urllib.request.urlopen(impatient_operator.metrics, timeout=10).read().decode()
    assert 'kubetune_operator_finetunejob_failures_total{reason="ValidationFailed"} 1.0' in metrics
