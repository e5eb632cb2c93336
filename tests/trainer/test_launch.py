"""`kubetune launch` keeps the trainer's exit code, which plain `accelerate launch` turns into 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kubetune_api import EXIT_CONFIG_INVALID, EXIT_DATA_INVALID, EXIT_OUTPUT_IN_USE, EXIT_PEER_LOST, EXIT_RETRYABLE
from kubetune_trainer.launch import child_exit_code


def test_child_exit_code():
    assert child_exit_code([EXIT_RETRYABLE]) == EXIT_RETRYABLE
    assert child_exit_code([1, EXIT_DATA_INVALID]) == EXIT_DATA_INVALID  # a permanent code wins
    assert child_exit_code([0, EXIT_CONFIG_INVALID]) == EXIT_CONFIG_INVALID
    assert child_exit_code([-9]) == 137  # killed by SIGKILL
    assert child_exit_code([]) == 1
    assert child_exit_code([EXIT_PEER_LOST, 1]) == 1  # this pod's own failure, not the peer's, is charged
    assert child_exit_code([0, EXIT_PEER_LOST]) == EXIT_PEER_LOST
    assert child_exit_code([EXIT_PEER_LOST, EXIT_OUTPUT_IN_USE]) == EXIT_OUTPUT_IN_USE


@pytest.mark.parametrize("code", [0, EXIT_DATA_INVALID])  # EXIT_RETRYABLE: the SIGTERM test below
def test_launch_passes_the_child_exit_code_through(tmp_path, code):
    script = tmp_path / "child.py"
    script.write_text(f"import sys\nsys.exit({code})\n")
    done = subprocess.run([sys.executable, "-m", "kubetune_trainer", "launch", "--cpu", "--num_processes", "1",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr[-2000:]


def test_sigterm_reaches_the_trainer_which_decides_the_exit_code(tmp_path):
    """Kubernetes signals only the container's first process (the launcher): the trainer must get it too, and
    the pod must exit with the trainer's code (75 after its checkpoint), not die with the launcher. It is also the
    exit code test's EXIT_RETRYABLE case: the trainer's sys.exit(75), passed through (one launcher less, each
    importing torch and accelerate)."""
    import signal
    import time

    script = tmp_path / "child.py"
    script.write_text("import signal, sys, time\n"
                      "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
                      "print('ready', flush=True)\n"
                      "time.sleep(60)\nsys.exit(3)\n")
    launcher = subprocess.Popen([sys.executable, "-m", "kubetune_trainer", "launch", "--cpu", "--num_processes",
                                 "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                 str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == EXIT_RETRYABLE, launcher.stderr.read()[-2000:]
    finally:
        launcher.kill()


def test_an_error_message_with_brackets_is_printed_as_it_is():
    """A gloo error names its source file in brackets, which rich would read as markup (and crash, exit 1)."""
    import typer
    from kubetune_trainer.cli import fail
    from kubetune_trainer.errors import PeerLost

    with pytest.raises(typer.Exit) as done:
        fail(PeerLost("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Connection closed by peer"))
    assert done.value.exit_code == EXIT_PEER_LOST


def _launch_cpu(script, threads: int | None = None) -> subprocess.Popen:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    return subprocess.Popen([sys.executable, "-m", "kubetune_trainer", "launch", "--cpu", "--num_processes", "1",
                             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_one_process_runs_in_the_launchers_process_with_accelerates_environment(tmp_path):
    """A pod with one process (a CPU worker): no second interpreter that imports torch and accelerate again; the
    trainer sees what accelerate's simple launcher would have given it."""
    script = tmp_path / "child.py"
    script.write_text("import json, os, sys\n"
                      "print(json.dumps({'pid': os.getpid(), 'argv': sys.argv,\n"
                      "                  'cpu': os.environ.get('ACCELERATE_USE_CPU'),\n"
                      "                  'precision': os.environ.get('ACCELERATE_MIXED_PRECISION')}))\n")
    launcher = _launch_cpu(script)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, err[-2000:]
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {"pid": launcher.pid, "argv": [str(script)], "cpu": "True", "precision": "no"}


def _threads(pid: int) -> str:
    """Each thread's state, blocked and pending signals and where it sleeps: what a hang needs explained."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        fields = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
        wchan = (task / "wchan").read_text() if (task / "wchan").exists() else "?"
        lines.append(f"{task.name} {fields['Name'].strip()} state={fields['State'].strip()} "
                     f"blocked={fields['SigBlk'].strip()} pending={fields['SigPnd'].strip()}/"
                     f"{fields['ShdPnd'].strip()} wchan={wchan}")
    return "\n".join(lines)


def test_only_the_main_thread_takes_sigterm_which_ends_the_pod_before_the_trainer_has_a_handler(tmp_path):
    """The kernel gives a process's signal to any thread that does not block it, and only the main thread runs
    Python's handlers: a SIGTERM taken by torch's thread would wait until the main thread's sleep or read returned
    (the SIGTERM below, once in a while, without this). Every other thread blocks it.

    And the container's first process ignores signals it has no handler for: until the trainer installs its own
    (once training starts), the launcher's handler ends the process with 143, as a signalled child would. (One
    launcher for both: with torch's second thread, the case the mask is for.)"""
    import signal

    script = tmp_path / "child.py"
    script.write_text("import time\nprint('ready', flush=True)\ntime.sleep(3600)\n")
    launcher = _launch_cpu(script, threads=2)  # torch's pool: a thread besides the main one (the suite sets 1)
    try:
        assert launcher.stdout.readline().strip() == "ready"
        masks = {}
        for task in Path(f"/proc/{launcher.pid}/task").iterdir():
            status = (task / "status").read_text()
            masks[int(task.name)] = int(status.split("SigBlk:")[1].split()[0], 16)
        sigterm = 1 << (signal.SIGTERM - 1)
        assert len(masks) > 1, "torch starts a thread at import: the test no longer shows what it is about"
        assert not masks.pop(launcher.pid) & sigterm
        assert all(mask & sigterm for mask in masks.values()), masks

        launcher.send_signal(signal.SIGTERM)
        try:
            code = launcher.wait(timeout=120)  # generous: CI runs this beside the cluster tests
        except subprocess.TimeoutExpired:
            pytest.fail(f"SIGTERM did not end the launcher; its threads:\n{_threads(launcher.pid)}")
        assert code == 128 + signal.SIGTERM
    finally:
        launcher.kill()
