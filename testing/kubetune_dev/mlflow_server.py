"""A real MLflow tracking server for the tests of spec.tracking.mlflow: `mlflow server` on loopback, sqlite backend.

The server needs the full `mlflow` package, which cannot share the project's venv (its pins differ: pyarrow), so it
gets a venv of its own, built once with uv and cached like the control plane:
`${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/mlflow-<version>/` (`make mlflow-server`, or the first test that needs it).

    python -m kubetune_dev.mlflow_server install       build (or reuse) the server's venv
    python -m kubetune_dev.mlflow_server serve [PORT]   run a server in the foreground (Ctrl-C stops it)

Pytest: `pytest_plugins = ["kubetune_dev.mlflow_server"]` gives the session fixture `mlflow_server` and the fixture
`unreachable_mlflow_uri`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import closing
from pathlib import Path

from filelock import FileLock

from .cluster.controlplane import cache_dir

VERSION = "3.17.2"  # the newest whose pins resolve beside the index's packages (3.18 is not served)
START_SECONDS = 120  # a cold start imports mlflow, runs the sqlite migrations and starts uvicorn on 2 cores
# The tracking API only. MLflow 3's server also starts a job runner and seven huey consumers by default (GenAI
# evaluation jobs, periodic tasks): eight more interpreters importing mlflow, 20 CPU-seconds in the first 20 s
# beside the tests on 2 cores (6 CPU-s for the server without them). Telemetry: nothing leaves this machine.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}


def home() -> Path:
    return cache_dir() / f"mlflow-{VERSION}"


def _uv() -> str:
    beside = Path(sys.executable).parent / "uv"  # `make venv` installs uv in the project's venv
    found = str(beside) if beside.is_file() else shutil.which("uv")
    if not found:
        raise RuntimeError("uv not found: run `make venv` (it installs uv), or install uv")
    return found


def install(log=print) -> Path:
    """The server venv's python, built on first use (under a file lock: parallel test workers build it once)."""
    venv = home()
    python = venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{venv}.lock"):
        if (venv / ".installed").is_file():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        log(f"[mlflow-server] building mlflow {VERSION} into {venv} (about a minute, once)")
        subprocess.run([_uv(), "venv", "-q", "--python", sys.executable, str(venv)], check=True)
        # --compile-bytecode: the server imports from .pyc files from its first start (a minute less on 2 cores)
        subprocess.run([_uv(), "pip", "install", "-q", "--compile-bytecode", "--python", str(python),
                        f"mlflow=={VERSION}"], check=True)
        (venv / ".installed").write_text(VERSION + "\n")
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1, its sqlite database and artifacts in a temporary folder; `uri` is its URL.
    Started in a session of its own, stopped by its process group id (uvicorn's workers are its children)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="kubetune-mlflow-"))
        self.process: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        python = install()
        # A new server's database as the first server on this version made it, copied rather than created again:
        # its tables and the Default experiment, nothing else (about 3 s and 1.5 CPU-s of the start on 2 cores).
        seed, db = home().with_name(f"{home().name}-empty.db"), self.workdir / "mlflow.db"
        if seed.is_file():
            shutil.copyfile(seed, db)
        log = (self.workdir / "server.log").open("wb")
        self.process = subprocess.Popen(
            [str(python), "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{db}",
             "--artifacts-destination", str(self.workdir / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir,
            env={**os.environ, **SERVER_ENV})
        deadline = time.monotonic() + START_SECONDS
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.log()
                self.stop()
                raise RuntimeError(f"mlflow server did not start; its log:\n{log[-3000:]}")
            time.sleep(0.2)
        if not seed.is_file():  # healthy: the server has made its database; nobody has used it yet
            with FileLock(f"{seed}.lock"):
                if not seed.is_file():
                    partial = seed.with_name(f"{seed.name}.{os.getpid()}")
                    with closing(sqlite3.connect(db)) as source, closing(sqlite3.connect(partial)) as copy:
                        source.backup(copy)  # consistent while the server has it open
                    partial.replace(seed)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def log(self) -> str:
        path = self.workdir / "server.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the server and its workers
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


try:
    import pytest
except ImportError:  # pragma: no cover - the kit's CLI without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def mlflow_server():
        """One real MLflow tracking server for the test session (see MlflowServer)."""
        with MlflowServer() as server:
            yield server

    @pytest.fixture
    def unreachable_mlflow_uri() -> str:
        """A loopback URL where no server listens (a free port, not bound)."""
        return f"http://127.0.0.1:{free_port()}"


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "install"
    if command == "install":
        print(install())
        return 0
    if command == "serve":
        with MlflowServer(int(argv[1]) if len(argv) > 1 else 5000) as server:
            print(f"MLflow tracking server at {server.uri} (Ctrl-C stops it)", flush=True)
            try:
                server.process.wait()
            except KeyboardInterrupt:
                pass
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
