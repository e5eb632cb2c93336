"""`kubetune launch` keeps the trainer's exit code, which plain `accelerate launch` turns into 1."""

from __future__ import annotations

import subprocess
import sys

import pytest
from kubetune_trainer.errors import EXIT_CONFIG_INVALID, EXIT_DATA_INVALID, EXIT_RETRYABLE
from kubetune_trainer.launch import child_exit_code


def test_child_exit_code():
    assert child_exit_code([EXIT_RETRYABLE]) == EXIT_RETRYABLE
    assert child_exit_code([1, EXIT_DATA_INVALID]) == EXIT_DATA_INVALID  # a permanent code wins
    assert child_exit_code([0, EXIT_CONFIG_INVALID]) == EXIT_CONFIG_INVALID
    assert child_exit_code([-9]) == 137  # killed by SIGKILL
    assert child_exit_code([]) == 1


@pytest.mark.parametrize("code", [0, EXIT_DATA_INVALID, EXIT_RETRYABLE])
def test_launch_passes_the_child_exit_code_through(tmp_path, code):
    script = tmp_path / "child.py"
    script.write_text(f"import sys\nsys.exit({code})\n")
    done = subprocess.run([sys.executable, "-m", "kubetune_trainer", "launch", "--cpu", "--num_processes", "1",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr[-2000:]
