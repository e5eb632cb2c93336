"""`kubetune checkpoints` (issue 31): a run's checkpoints as a table, from its manifest or the FineTuneJob's
status."""

from __future__ import annotations

import json
import os
import stat

import pytest
from kubetune_trainer import cli
from kubetune_trainer.cli import app
from rich.console import Console
from typer.testing import CliRunner

CHECKPOINTS = [
    {"step": 8, "uri": "s3://out/x/checkpoints/step-00000008/", "time": "2026-12-06T15:00:00.000Z",
     "validation": {"loss": 1.25, "accuracy": 0.5}, "kept": False},
    {"step": 16, "uri": "s3://out/x/checkpoints/step-00000016/", "time": "2026-12-06T15:01:00.000Z",
     "validation": {"loss": 0.75, "accuracy": 0.875}, "kept": True, "published": True},
]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """The CLI's console took its width from COLUMNS when the module was imported (rich reads it once), maybe by
    another test in this process: the table gets the width of a wide terminal here, whoever imported it first."""
    monkeypatch.setattr(cli, "out", Console(width=200))


def _run(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, ["checkpoints", *args], env={"COLUMNS": "200", **(env or {})})


def test_an_output_uri_lists_every_checkpoint_of_its_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "FineTuneResult", "checkpoints": CHECKPOINTS}))
    result = _run(str(tmp_path))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "checkpoints of" in result.output and "validation split's" in result.output
    (row8,) = [line for line in lines if "step-00000008" in line]
    assert "2026-12-06 15:00:00" in row8 and "1.25" in row8 and "pruned" in row8
    (row16,) = [line for line in lines if "step-00000016" in line]
    assert "0.875" in row16 and "published" in row16
    assert "{" not in result.output and "None" not in result.output  # for people: no reprs


def test_an_output_without_a_manifest_is_a_clear_error(tmp_path):
    result = _run(str(tmp_path))
    assert result.exit_code == 78 and "no manifest.json there" in result.output


def test_a_job_name_reads_its_status_with_kubectl(tmp_path):
    kubectl = tmp_path / "kubectl"
    status = {"status": {"phase": "Succeeded", "checkpoints": CHECKPOINTS[1:]}}
    kubectl.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\ncat <<'EOF'\n{json.dumps(status)}\nEOF\n")
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)
    result = _run("support-lora", "-n", "ml", env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert result.exit_code == 0, result.output
    assert "FineTuneJob support-lora" in result.output and "published" in result.output
    assert (tmp_path / "args").read_text().split() == ["get", "finetunejob", "support-lora", "-o", "json", "-n", "ml"]
    status["status"] = {"phase": "Running"}
    kubectl.write_text(f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(status)}\nEOF\n")
    result = _run("support-lora", env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert result.exit_code == 78 and "has no checkpoints in its status (phase Running)" in result.output
