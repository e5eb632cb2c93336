"""No credential or presigned URL leaves the trainer: not on stderr, not in a JSON event line, not in the
termination message (the FineTuneJob's status), not in the traceback of an exception nobody caught."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.credentials import Credentials, RefreshableCredentials
from kubetune_trainer import redact
from kubetune_trainer.cli import app
from typer.testing import CliRunner

KEY_ID = "AKIA" + uuid.uuid4().hex[:16].upper()
SECRET = f"canary/{uuid.uuid4().hex}+secret"  # a '/' and a '+', as AWS secret keys have: URL-encoding changes them
ENCODED = SECRET.replace("/", "%2F").replace("+", "%2B")
TOKEN = f"token-{uuid.uuid4().hex}"


@pytest.fixture
def credentials(monkeypatch) -> dict:
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def presigned(signature_version: str, **keys) -> str:
    client = boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                          config=Config(signature_version=signature_version), **keys)
    return client.generate_presigned_url("get_object", Params={"Bucket": "models", "Key": "base/model.bin"})


def assert_clean(text: str) -> None:
    for value in (KEY_ID, SECRET, TOKEN, ENCODED):
        assert value not in text, text


def test_credential_values_are_removed_as_written_url_encoded_or_json_escaped(credentials):
    text = redact.redact(f"env {SECRET} quoted {json.dumps(SECRET)} url {ENCODED} token={TOKEN} id {KEY_ID}")
    assert_clean(text)
    assert text.count("***") >= 5


@pytest.mark.parametrize("version", ["s3v4", "s3"])
def test_presigned_urls_keep_their_address_but_lose_their_signature(credentials, version):
    url = presigned(version, aws_access_key_id="AKIAOTHERKEY0000000X", aws_secret_access_key="another-secret",
                    aws_session_token="another-token")
    params = ("X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token") if version == "s3v4" else (
        "Signature", "AWSAccessKeyId", "x-amz-security-token")
    assert all(p in url for p in params), url
    text = redact.redact(f"GET {url} failed: 403")
    assert "http://127.0.0.1:9/models/base/model.bin?" in text and text.endswith(" failed: 403")
    for param in params:
        assert f"{param}=***" in text, text
    assert "another-token" not in text and "AKIAOTHERKEY0000000X" not in text
    assert_clean(text)


def test_headers_key_names_and_passwords_in_urls():
    header = ("Authorization: AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20250101/us-east-1/s3/aws4_request, "
              "SignedHeaders=host;x-amz-date, Signature=fe5f80f77d5fa3beca038a248ff027d0445342fe2855ddc96317663")
    text = redact.redact(header)
    assert "AKIAIOSFODNN7EXAMPLE" not in text and "fe5f80f7" not in text
    assert "SignedHeaders=host;x-amz-date" in text
    assert redact.redact("{'AWS_SECRET_ACCESS_KEY': 'wJalrXUtnFEMI/K7MDENG'}") == "{'AWS_SECRET_ACCESS_KEY': '***'}"
    assert redact.redact("aws_session_token = FwoGZXIvYXdzE") == "aws_session_token = ***"
    assert redact.redact("http://minio:hunter22@minio:9000/b") == "http://minio:***@minio:9000/b"
    assert redact.redact("x-amz-security-token: FwoGZXIv") == "x-amz-security-token: ***"


def test_ordinary_text_is_left_alone(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")  # a placeholder too short to be a key: not replaced everywhere
    text = ("s3://models/base/ at http://127.0.0.1:9000/models?prefix=base&max-keys=10, signed manifest, "
            "train.jsonl:2: invalid JSON (a signature of 3 lines), step x of 8")
    assert redact.redact(text) == text


def test_the_keys_of_watched_boto3_credentials_are_removed_without_refreshing_them(monkeypatch):
    for name in redact.CREDENTIAL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(redact, "_watched", [])
    static = Credentials("AKIASTATICKEY0000000", f"static-{uuid.uuid4().hex}")

    def refresh():  # a web identity's keys: fetched from STS, in no environment variable
        raise AssertionError("redaction must not refresh the credentials (a network call)")

    temporary = RefreshableCredentials("ASIATEMPORARYKEY0000", f"temporary-{uuid.uuid4().hex}",
                                       f"session-{uuid.uuid4().hex}", expiry_time=None, refresh_using=refresh,
                                       method="assume-role-with-web-identity")
    redact.watch(static)
    redact.watch(temporary)
    redact.watch(temporary)
    assert len(redact._watched) == 2
    text = redact.redact(f"{static.secret_key} {vars(temporary)['_secret_key']} {vars(temporary)['_token']}")
    assert text == "*** *** ***"


def test_an_unexpected_exception_holding_the_secret_is_redacted_on_stderr_and_in_the_termination_message(
        credentials, monkeypatch, tmp_path):
    import kubetune_trainer.validation as validation

    url = presigned("s3v4", aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, aws_session_token=TOKEN)

    def crash(config):
        raise RuntimeError(f"GET {url} failed; client built with key {SECRET} and token {TOKEN}")

    monkeypatch.setattr(validation, "validate_only", crash)
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                                  "metadata": {"name": "leaky"},
                                  "spec": {"baseModel": {"uri": "s3://models/base/"},
                                           "dataset": {"train": "s3://data/train.jsonl"},
                                           "output": {"uri": "s3://out/leaky/"}}}))
    termination = tmp_path / "termination-log"
    result = CliRunner().invoke(app, ["validate", "--config", str(config)],
                                env={"COLUMNS": "200", "KUBETUNE_TERMINATION_LOG": str(termination)})
    assert result.exit_code == 1, result.output
    message = termination.read_text()
    assert message.startswith("Unexpected: RuntimeError: GET http://127.0.0.1:9/models/base/model.bin?"), message
    assert "X-Amz-Signature=***" in message and "key *** and token ***" in message
    assert_clean(message)
    assert "Unexpected: RuntimeError" in result.output
    assert_clean(result.output)


def test_launch_failures_are_redacted_too(credentials, monkeypatch, tmp_path):
    import kubetune_trainer.launch as launch

    def crash(argv):
        raise ValueError(f"accelerate: cannot parse AWS_SECRET_ACCESS_KEY={SECRET}")

    monkeypatch.setattr(launch, "launch", crash)
    termination = tmp_path / "termination-log"
    result = CliRunner().invoke(app, ["launch", "-m", "kubetune_trainer", "train"],
                                env={"KUBETUNE_TERMINATION_LOG": str(termination)})
    assert result.exit_code == 1 and "Unexpected: ValueError" in termination.read_text()
    assert_clean(termination.read_text() + result.output)


def test_json_event_lines_are_redacted(credentials, capsys):
    from kubetune_trainer.identity import _log
    from kubetune_trainer.pipeline import json_reporter

    json_reporter({"event": "checkpoint_unusable", "uri": "s3://out/checkpoints/step-00000002/",
                   "error": f"403 for key {KEY_ID}: {SECRET}"})
    _log({"event": "output_will_move_aside", "error": TOKEN})
    out, err = capsys.readouterr()
    event = json.loads(out)
    assert event["error"] == "403 for key ***: ***" and event["uri"].startswith("s3://out/")
    assert json.loads(err)["error"] == "***"


def test_uncaught_exceptions_in_any_thread_print_redacted_tracebacks(credentials, tmp_path):
    """What neither fail() nor an event catches: Python's own traceback, of the main thread and of the others."""
    script = tmp_path / "crash.py"
    script.write_text(
        "import os, threading\n"
        "from kubetune_trainer import redact\n"
        "redact.install()\n"
        "secret = os.environ['AWS_SECRET_ACCESS_KEY']\n"
        "def metrics_thread():\n"
        "    raise OSError(f'metrics thread: {secret}')\n"
        "t = threading.Thread(target=metrics_thread, name='metrics'); t.start(); t.join()\n"
        "raise RuntimeError(f'main thread: {secret}')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env={**credentials, "PATH": "/usr/bin:/bin"}, cwd=Path(__file__).parent)
    assert done.returncode == 1
    assert "OSError: metrics thread: ***" in done.stderr and "RuntimeError: main thread: ***" in done.stderr
    assert "Exception in metrics" in done.stderr and "Traceback (most recent call last)" in done.stderr
    assert_clean(done.stderr + done.stdout)
