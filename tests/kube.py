"""Helpers shared by the tests that talk to the local control plane: kubectl, polling, free ports."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

KUBECTL = shutil.which("kubectl", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def kubectl(cp, *args: str, stdin: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """The real kubectl against the control plane `cp`; with check, a failure raises with its stderr."""
    out = subprocess.run([KUBECTL, "--kubeconfig", str(cp.kubeconfig), *args], input=stdin,
                         capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {out.stderr}")
    return out


def get_json(cp, *args: str) -> dict:
    return json.loads(kubectl(cp, "get", *args, "-o", "json").stdout)


def wait_for(what: str, predicate, timeout: float = 180, every: float = 0.5):
    """Poll until predicate() is truthy and return its value; fail naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def stop_process(proc: subprocess.Popen, kill: bool = False, grace: float = 20) -> None:
    """SIGTERM (or SIGKILL at once), wait up to `grace` seconds, then SIGKILL."""
    if kill:
        proc.kill()
    else:
        proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> tuple[int, str]:
    """(status, body), or (0, "") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status, resp.read().decode()
    except OSError:
        return 0, ""
