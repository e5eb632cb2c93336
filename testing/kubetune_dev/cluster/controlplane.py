"""A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)
run as local processes on loopback ports, from the binaries that `hack/build-control-plane` builds.

    with ControlPlane() as cp:
        subprocess.run(["kubectl", "--kubeconfig", cp.kubeconfig, "get", "ns"])

Everything lives in one temporary directory (etcd data, certificates, keys, logs, kubeconfig) that
`stop()` removes. Each component runs in its own process group; `stop()` sends SIGTERM, then SIGKILL.
`stop()` also runs at interpreter exit; SIGTERM is turned into KeyboardInterrupt (so pytest tears its
fixtures down); the components get SIGKILL if this process dies without cleaning up (Linux parent-death
signal), and the next start removes directories whose owner is gone. No process or port is left behind.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
REPO_ROOT = Path(__file__).resolve().parents[3]
TOOLS_GO_MOD = REPO_ROOT / "hack" / "k8s-tools" / "go.mod"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


class ControlPlaneError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune")


def pinned_version() -> str | None:
    """The k8s.io/kubernetes version pinned in hack/k8s-tools/go.mod (None outside a checkout)."""
    if not TOOLS_GO_MOD.is_file():
        return None
    m = re.search(r"^\s*k8s\.io/kubernetes (v\S+)", TOOLS_GO_MOD.read_text(), re.M)
    return m.group(1) if m else None


def find_bin_dir() -> Path:
    """$KUBETUNE_K8S_BIN, else the cache directory of the pinned version (else the newest one)."""
    if os.environ.get("KUBETUNE_K8S_BIN"):
        candidates = [Path(os.environ["KUBETUNE_K8S_BIN"])]
    elif version := pinned_version():
        candidates = [cache_dir() / f"k8s-{version}" / "bin"]
    else:
        candidates = sorted(cache_dir().glob("k8s-v*/bin"), reverse=True) or [cache_dir() / "k8s-v*" / "bin"]
    for d in candidates:
        etcd = (d / "etcd").is_file() or shutil.which("etcd")  # Debian's etcd-server as a fallback
        if etcd and all((d / c).is_file() for c in COMPONENTS[1:]):
            return d
    raise ControlPlaneError(
        f"Kubernetes control-plane binaries not found in {candidates[0]}: run `make control-plane` "
        "(hack/build-control-plane) to build them")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the thread that started it dies (prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _get(url: str, token: str | None = None, timeout: float = 5) -> tuple[int, str]:
    """GET without verifying TLS (only used for health probes on loopback)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return 0, str(e)


def sweep_stale_workdirs() -> None:
    """Remove work directories left by processes that were killed (SIGKILL) before they could clean up."""
    for d in Path(tempfile.gettempdir()).glob("kubetune-cp-*"):
        try:
            os.kill(int((d / "owner.pid").read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):  # no owner.pid yet, or not ours to judge
            pass


_live: set[ControlPlane] = set()


def _stop_all() -> None:
    for cp in list(_live):
        cp.stop()


def _on_sigterm(signum, frame) -> None:
    """Treat SIGTERM like Ctrl-C: unwind (pytest runs its fixture teardown), then atexit stops the rest."""
    raise KeyboardInterrupt(f"signal {signum}")


atexit.register(_stop_all)


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler on loopback ports.

    Attributes once started: `kubeconfig` (admin kubeconfig path), `api_url`, `admin_token`,
    `ca_file` (the API server's serving CA), `workdir`, `version` (from /version).
    """

    def __init__(self, bin_dir: str | Path | None = None, workdir: str | Path | None = None,
                 verbosity: int = 2, keep: bool | None = None,
                 extra_args: dict[str, list[str]] | None = None):
        self.bin_dir = Path(bin_dir) if bin_dir else find_bin_dir()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kubetune-cp-"))
        self.verbosity = verbosity
        self.keep = os.environ.get("KUBETUNE_KEEP_CONTROL_PLANE") == "1" if keep is None else keep
        self.extra_args = extra_args or {}
        self.admin_token = secrets.token_hex(16)
        self._pick_ports()
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.ca_file = self.workdir / "certs" / "apiserver.crt"
        self.logs = self.workdir / "logs"
        self.version: dict = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 180) -> ControlPlane:
        """Start every component and wait until the cluster is usable; on failure stop and raise.

        Ports are picked free but only taken when a component binds them, so when another process
        grabs one first ("address already in use"), it starts over on new ports (twice at most)."""
        _live.add(self)
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
        for attempt in range(3):
            try:
                self._start(time.monotonic() + timeout)
                return self
            except BaseException as e:
                report = self.log_tails()
                self._kill()
                if isinstance(e, ControlPlaneError) and "address already in use" in report and attempt < 2:
                    self._pick_ports()
                    for d in ("etcd", "certs", "logs"):
                        shutil.rmtree(self.workdir / d, ignore_errors=True)
                    continue
                self.stop()
                if isinstance(e, ControlPlaneError):
                    raise ControlPlaneError(f"{e}\n{report}") from None
                raise
        raise AssertionError("unreachable")

    def _start(self, deadline: float) -> None:
        self._prepare()
        etcd_health = f"http://127.0.0.1:{self.ports['etcd']}/health"
        self._spawn("etcd", self._etcd_args())
        self._wait("etcd", lambda: '"health":"true"' in _get(etcd_health)[1], deadline)
        self._spawn("kube-apiserver", self._apiserver_args())
        self._wait("kube-apiserver /readyz",
                   lambda: self._api("/readyz")[0] == 200 and self.ca_file.is_file(), deadline)
        self._write_kubeconfig()
        self._spawn("kube-controller-manager", self._controller_manager_args())
        self._spawn("kube-scheduler", self._scheduler_args())
        for name, port in (("kube-controller-manager", "kcm"), ("kube-scheduler", "scheduler")):
            url = f"https://127.0.0.1:{self.ports[port]}/healthz"
            self._wait(f"{name} /healthz", lambda url=url: _get(url)[0] == 200, deadline)
        default_sa = "/api/v1/namespaces/default/serviceaccounts/default"
        self._wait("the default service account", lambda: self._api(default_sa)[0] == 200, deadline)
        self.version = json.loads(self._api("/version")[1])

    def stop(self, grace: float = 5) -> None:
        """Terminate all components (SIGTERM, SIGKILL after `grace` s), remove the work directory."""
        with self._lock:
            self._kill(grace)
            _live.discard(self)
            if self._own_workdir and not self.keep:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _kill(self, grace: float = 5) -> None:
        """etcd goes last; the others go together (the API server's graceful shutdown can hang for a while,
        and nothing here needs it: the data is thrown away)."""
        etcd = self.procs.pop("etcd", None)
        self._terminate(list(self.procs.values()), grace)
        self._terminate([etcd] if etcd else [], grace)
        self.procs.clear()

    # ------------------------------------------------------------------ helpers for users

    def api_client(self):
        """A `kubernetes.client.ApiClient` authenticated as the cluster admin."""
        import kubernetes

        return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))

    def env(self) -> dict[str, str]:
        """os.environ with KUBECONFIG pointing at this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def log_tails(self, lines: int = 25) -> str:
        out = []
        for name in COMPONENTS:
            path = self.logs / f"{name}.log"
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(out)

    # ------------------------------------------------------------------ internals

    def _pick_ports(self) -> None:
        self.ports = {name: free_port() for name in ("etcd", "etcd-peer", "apiserver", "kcm", "scheduler")}
        self.api_url = f"https://127.0.0.1:{self.ports['apiserver']}"

    def _api(self, path: str) -> tuple[int, str]:
        return _get(f"{self.api_url}{path}", self.admin_token)

    def _prepare(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        if self._own_workdir:
            sweep_stale_workdirs()
            (self.workdir / "owner.pid").write_text(str(os.getpid()))
        for d in ("etcd", "certs", "logs"):
            (self.workdir / d).mkdir(mode=0o700, parents=True, exist_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (self.workdir / "sa.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
        (self.workdir / "tokens.csv").write_text(f'{self.admin_token},admin,admin,"system:masters"\n')
        for path in ("sa.key", "tokens.csv"):
            os.chmod(self.workdir / path, 0o600)

    def _spawn(self, name: str, args: list[str]) -> None:
        binary = self.bin_dir / name
        if name == "etcd" and not binary.is_file():
            binary = Path(shutil.which("etcd") or binary)  # Debian's etcd-server as a fallback
        args = [str(binary), *args, *self.extra_args.get(name, [])]
        log = open(self.logs / f"{name}.log", "ab")  # the child keeps its own copy
        with log:
            log.write(f"$ {' '.join(args)}\n".encode())
            log.flush()
            pdeath = _die_with_parent if threading.current_thread() is threading.main_thread() else None
            self.procs[name] = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                                cwd=self.workdir, start_new_session=True, preexec_fn=pdeath)

    def _wait(self, what: str, ready, deadline: float) -> None:
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ControlPlaneError(f"{name} exited ({proc.returncode}) while waiting for {what}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"timed out waiting for {what}")
            time.sleep(0.25)

    @staticmethod
    def _terminate(procs: list[subprocess.Popen], grace: float) -> None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, sig)
            deadline = time.monotonic() + wait
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(max(0.0, deadline - time.monotonic()))
        for proc in procs:  # stray children of a group, if any
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def _write_kubeconfig(self) -> None:
        ca = base64.b64encode(self.ca_file.read_bytes()).decode()
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "kubetune",
            "clusters": [{"name": "kubetune", "cluster": {"server": self.api_url,
                                                          "certificate-authority-data": ca}}],
            "users": [{"name": "admin", "user": {"token": self.admin_token}}],
            "contexts": [{"name": "kubetune", "context": {"cluster": "kubetune", "user": "admin"}}],
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))
        os.chmod(self.kubeconfig, 0o600)

    def _etcd_args(self) -> list[str]:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        return ["--name=kubetune", f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=kubetune={peer}", "--unsafe-no-fsync", "--log-level=warn"]

    def _apiserver_args(self) -> list[str]:
        w = self.workdir
        return [
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",  # it refuses a loopback address for the kubernetes Service
            f"--secure-port={self.ports['apiserver']}",
            f"--cert-dir={w / 'certs'}",  # a self-signed CA and serving cert (apiserver.crt/.key)
            f"--token-auth-file={w / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            "--service-cluster-ip-range=10.0.0.0/24",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={w / 'sa.key'}",
            f"--service-account-signing-key-file={w / 'sa.key'}",
            "--allow-privileged=true",
            f"--v={self.verbosity}",
        ]

    def _component_kubeconfig_args(self) -> list[str]:
        k = self.kubeconfig
        return [f"--kubeconfig={k}", f"--authentication-kubeconfig={k}", f"--authorization-kubeconfig={k}",
                "--bind-address=127.0.0.1", "--leader-elect=false", f"--v={self.verbosity}"]

    def _controller_manager_args(self) -> list[str]:
        return [
            *self._component_kubeconfig_args(), f"--secure-port={self.ports['kcm']}",
            f"--cert-dir={self.workdir / 'certs' / 'kcm'}",
            "--controllers=*", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={self.workdir / 'sa.key'}",
            f"--root-ca-file={self.ca_file}",
            "--service-cluster-ip-range=10.0.0.0/24",
        ]

    def _scheduler_args(self) -> list[str]:
        return [*self._component_kubeconfig_args(), f"--secure-port={self.ports['scheduler']}",
                f"--cert-dir={self.workdir / 'certs' / 'scheduler'}"]


def main() -> None:  # pragma: no cover - manual smoke test
    with ControlPlane() as cp:
        print(f"export KUBECONFIG={cp.kubeconfig}  # {cp.version.get('gitVersion')}; Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
