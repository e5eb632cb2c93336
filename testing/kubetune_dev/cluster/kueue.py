"""The real Kueue (sigs.k8s.io/kueue, built by `hack/build-kueue`) against a running local control plane.

    with Kueue(kubeconfig, workdir) as kueue:
        kueue.cluster_queue("cluster-queue", {"nvidia.com/gpu": 2})
        kueue.local_queue("default", "user-queue", "cluster-queue")

`start()` installs Kueue's CRDs and webhook configurations from the pinned module's source tree, with a serving
certificate made here (the API server calls the webhooks at https://127.0.0.1:PORT, no Service or cert-manager
needed), runs the controller manager as a local process and waits until its webhooks answer. Only the `batch/job`
integration is on, and Kueue's Job webhooks only see Jobs labelled with a queue name (an objectSelector), so
nothing else in the cluster depends on Kueue running. `stop()` removes the webhook configurations (so that Jobs
can be created without Kueue) and stops the process; the CRDs and queues stay with the cluster.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from .controlplane import REPO_ROOT, ControlPlaneError, _die_with_parent, _get, cache_dir, free_port

TOOLS_GO_MOD = REPO_ROOT / "hack" / "kueue-tools" / "go.mod"
NAMESPACE = "kueue-system"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GROUP_VERSION = "kueue.x-k8s.io/v1beta2"
WEBHOOKS = re.compile(r"^/(mutate|validate)-(batch-v1-job|kueue-x-k8s-io-)")  # for batch/job and Kueue's own kinds
METRICS_CERTS = Path("/etc/kueue/metrics/certs")  # where Kueue's main.go reads them, unless it makes its own
CONFIGURATIONS = {"MutatingWebhookConfiguration": "kubetune-kueue-mutating",
                  "ValidatingWebhookConfiguration": "kubetune-kueue-validating"}


def kubectl(kubeconfig: str | Path, *args: str, stdin: str | None = None) -> str:
    """The venv's kubectl against `kubeconfig`; its stdout, or ControlPlaneError with its stderr."""
    venv = Path(sys.executable).parent
    found = shutil.which("kubectl", path=f"{venv}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        raise ControlPlaneError("kubectl not found (it comes with the venv: make venv)")
    out = subprocess.run([found, "--kubeconfig", str(kubeconfig), *args], input=stdin, capture_output=True,
                         text=True, timeout=180)
    if out.returncode:
        raise ControlPlaneError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def wait_served(kubeconfig: str | Path, definitions: list[dict], timeout: float = 60) -> None:
    """Until every CRD in `definitions` is Established and its resource is in the API server's discovery at each
    served version. Kueue maps its kinds through discovery when it starts and exits if one is missing ("no matches
    for kind Workload in version kueue.x-k8s.io/v1beta2"): the API server publishes a new CRD's discovery a moment
    after Established."""
    deadline = time.monotonic() + timeout
    wait_established(kubeconfig, [c["metadata"]["name"] for c in definitions], timeout)
    wanted = {(f"{c['spec']['group']}/{v['name']}", c["spec"]["names"]["plural"])
              for c in definitions for v in c["spec"]["versions"] if v.get("served", True)}
    while True:
        listed: dict[str, set[str]] = {}
        for group_version in {gv for gv, _ in wanted}:
            try:
                found = json.loads(kubectl(kubeconfig, "get", "--raw", f"/apis/{group_version}"))["resources"]
            except ControlPlaneError:  # 404: the group's version is not served yet
                found = []
            listed[group_version] = {r["name"] for r in found}
        missing = sorted(f"{plural} in {gv}" for gv, plural in wanted if plural not in listed[gv])
        if not missing:
            return
        if time.monotonic() > deadline:
            raise ControlPlaneError(f"not in the API server's discovery after {timeout:.0f} s: {', '.join(missing)}")
        time.sleep(0.2)


def wait_established(kubeconfig: str | Path, names: list[str], timeout: float = 60) -> None:
    """Until every named CRD is Established. Polled rather than `kubectl wait --for=condition=Established`: that
    fails at once ("accessor error") on a CRD whose status the API server has not filled in yet."""
    deadline = time.monotonic() + timeout
    pending = list(names)
    while pending:
        found = json.loads(kubectl(kubeconfig, "get", *(f"crd/{name}" for name in pending), "-o", "json"))
        established = {item["metadata"]["name"] for item in found.get("items", [found])  # one: not a List
                       if any(c.get("type") == "Established" and c.get("status") == "True"
                              for c in (item.get("status") or {}).get("conditions") or [])}
        pending = [name for name in pending if name not in established]
        if pending and time.monotonic() > deadline:
            raise ControlPlaneError(f"CRDs not established after {timeout:.0f} s: {', '.join(pending)}")
        if pending:
            time.sleep(0.2)


def pinned_version() -> str:
    m = re.search(r"^\s*sigs\.k8s\.io/kueue (v\S+)", TOOLS_GO_MOD.read_text(), re.M)
    if not m:
        raise ControlPlaneError(f"no sigs.k8s.io/kueue version in {TOOLS_GO_MOD}")
    return m.group(1)


def find_home() -> Path:
    """$KUBETUNE_KUEUE_HOME, else the cache directory of the pinned version: bin/kueue and config/."""
    home = Path(os.environ.get("KUBETUNE_KUEUE_HOME") or cache_dir() / f"kueue-{pinned_version()}")
    if not ((home / "bin" / "kueue").is_file() and (home / "config" / "webhook" / "manifests.yaml").is_file()):
        raise ControlPlaneError(f"Kueue not found in {home}: run `make kueue` (hack/build-kueue) to build it")
    return home


def serving_certificate(directory: Path) -> bytes:
    """A CA and, signed by it, a serving certificate for 127.0.0.1 (tls.crt, tls.key, as controller-runtime's
    webhook server reads them from its certDir); returns the CA's PEM, the caBundle of the webhooks."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("kubetune-kueue-ca")).issuer_name(name("kubetune-kueue-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name("kueue-webhook")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    os.chmod(directory / "tls.key", 0o600)
    return ca.public_bytes(serialization.Encoding.PEM)


def configuration(health: int, webhook: int, cert_dir: Path) -> dict:
    """Kueue's Configuration for a local process: loopback ports, no leader election, our own certificate."""
    return {"apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration", "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{health}"}, "metrics": {"bindAddress": "0"},
            "webhook": {"host": "127.0.0.1", "port": webhook, "certDir": str(cert_dir)},
            "leaderElection": {"leaderElect": False}, "internalCertManagement": {"enable": False},
            "manageJobsWithoutQueueName": False, "integrations": {"frameworks": ["batch/job"]}}


def webhook_configurations(manifests: str, url: str, ca: bytes) -> list[dict]:
    """Kueue's webhook configurations, kept to batch/job and Kueue's own kinds, pointed at `url`. The Job
    webhooks only match Jobs with a queue name: Kueue leaves the others alone, and no Job depends on it."""
    out = []
    for doc in yaml.safe_load_all(manifests):
        if not doc or doc.get("kind") not in CONFIGURATIONS:
            continue
        doc = copy.deepcopy(doc)
        doc["metadata"] = {"name": CONFIGURATIONS[doc["kind"]]}
        hooks = []
        for hook in doc.get("webhooks") or []:
            path = hook["clientConfig"]["service"]["path"]
            if not WEBHOOKS.match(path):
                continue
            hook["clientConfig"] = {"url": f"{url}{path}", "caBundle": base64.b64encode(ca).decode()}
            if "batch-v1-job" in path:
                hook["objectSelector"] = {"matchExpressions": [{"key": QUEUE_LABEL, "operator": "Exists"}]}
            hooks.append(hook)
        doc["webhooks"] = hooks
        out.append(doc)
    return out


def crds(directory: Path, url: str, ca: bytes) -> list[dict]:
    """Kueue's CRDs; those the upstream kustomization patches with a conversion webhook convert through Kueue's
    /convert."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    converted = {re.sub(r"^patches/webhook_in_(\w+)\.yaml$", r"\1", p["path"]) for p in kustomization["patches"]
                 if p["path"].startswith("patches/webhook_in_")}
    out = []
    for path in sorted(directory.glob("kueue.x-k8s.io_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["plural"] in converted:
            crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
                "clientConfig": {"url": f"{url}/convert", "caBundle": base64.b64encode(ca).decode()},
                "conversionReviewVersions": ["v1"]}}
        out.append(crd)
    return out


class Kueue:
    """Kueue's controller manager on loopback, for the cluster whose admin kubeconfig is `kubeconfig`."""

    def __init__(self, kubeconfig: str | Path, workdir: str | Path | None = None):
        self.kubeconfig = Path(kubeconfig)
        self.home = find_home()
        self.version = pinned_version()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kubetune-kueue-"))
        self.log = self.workdir / "kueue.log"
        self.proc: subprocess.Popen | None = None
        self._made: list[Path] = []  # mount points made on the host, removed by stop()
        self._lock = threading.Lock()

    def __enter__(self) -> Kueue:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return kubectl(self.kubeconfig, *args, stdin=stdin)

    def apply(self, *objects: dict) -> None:
        self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=kubetune-cluster", "-f", "-",
                     stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))

    def start(self, timeout: float = 120) -> Kueue:
        """Install the CRDs and webhooks, start the manager, wait until its webhooks answer."""
        deadline = time.monotonic() + timeout
        health, webhook = free_port(), free_port()
        url = f"https://127.0.0.1:{webhook}"
        ca = serving_certificate(self.workdir / "certs")
        config = self.workdir / "config.yaml"
        config.write_text(yaml.safe_dump(configuration(health, webhook, self.workdir / "certs")))
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        definitions = crds(self.home / "config" / "crd", url, ca)
        self.apply(*definitions)
        wait_served(self.kubeconfig, definitions)
        args = [str(self.home / "bin" / "kueue"), f"--config={config}", "--feature-gates=VisibilityOnDemand=false",
                "--zap-log-level=info"]
        args = self._with_metrics_certs(args)
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        with open(self.log, "ab") as log:
            log.write(f"$ {' '.join(args)}\n".encode())
            log.flush()
            pdeath = _die_with_parent if threading.current_thread() is threading.main_thread() else None
            self.proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         cwd=self.workdir, start_new_session=True, preexec_fn=pdeath)
        try:
            self._wait("Kueue's /readyz", lambda: _get(f"http://127.0.0.1:{health}/readyz")[0] == 200, deadline)
            self.apply(*webhook_configurations((self.home / "config" / "webhook" / "manifests.yaml").read_text(),
                                               url, ca))
            flavor = {"apiVersion": GROUP_VERSION, "kind": "ResourceFlavor", "metadata": {"name": "probe"}}
            self._wait("Kueue's webhooks", lambda: self._dry_run(flavor), deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _with_metrics_certs(self, args: list[str]) -> list[str]:
        """Kueue reads its metrics server's certificate from METRICS_CERTS (a Secret volume in its Deployment):
        run it in a private mount namespace with the serving certificate bound there. A missing mount point is
        made on the host and removed by stop(), as the node agent does for pod volumes."""
        if not shutil.which("unshare") or os.geteuid() != 0:
            raise ControlPlaneError("running Kueue needs root and unshare(1) (util-linux): it reads its metrics "
                                    f"certificate from {METRICS_CERTS}, which is bound in a mount namespace")
        self._made = [p for p in (METRICS_CERTS, *METRICS_CERTS.parents) if not p.exists()]
        METRICS_CERTS.mkdir(parents=True, exist_ok=True)
        script = (f'mount --bind "$0" {METRICS_CERTS} && exec "$@"')
        return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script,
                str(self.workdir / "certs"), *args]

    def _dry_run(self, obj: dict) -> bool:
        try:
            self.kubectl("create", "--dry-run=server", "-f", "-", stdin=json.dumps(obj))
        except ControlPlaneError:
            return False
        return True

    def _wait(self, what: str, ready, deadline: float) -> None:
        while not ready():
            if self.proc.poll() is not None:
                raise ControlPlaneError(f"kueue exited ({self.proc.returncode}) while waiting for {what}; "
                                        f"{self.log}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"timed out waiting for {what}; {self.log}:\n{self.log_tail()}")
            time.sleep(0.25)

    def log_tail(self, lines: int = 25, width: int = 400) -> str:
        """The log's last lines, each cut at `width` characters (Kueue's errors print whole objects)."""
        tail = self.log.read_text(errors="replace").splitlines()[-lines:] if self.log.is_file() else []
        return "\n".join(line[:width] for line in tail)

    def stop(self, grace: float = 5, keep_log: Path | None = None) -> None:
        """Remove the webhook configurations, stop the manager, remove the work directory (its log copied to the
        directory `keep_log` first, if given)."""
        with self._lock:
            for kind, name in CONFIGURATIONS.items():
                try:
                    self.kubectl("delete", kind.lower(), name, "--ignore-not-found", "--wait=false")
                except ControlPlaneError:
                    pass  # the API server is gone too
            if self.proc and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(grace)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            for path in self._made:  # deepest first
                with contextlib.suppress(OSError):
                    path.rmdir()
            self._made = []
            if keep_log and self.log.is_file():
                keep_log.mkdir(parents=True, exist_ok=True)
                shutil.copy(self.log, keep_log / f"{self.workdir.name}.log")
                print(f"\nKueue's log kept in {keep_log / self.workdir.name}.log")
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ queues

    def resource_flavor(self, name: str = "default-flavor") -> None:
        self.apply({"apiVersion": GROUP_VERSION, "kind": "ResourceFlavor", "metadata": {"name": name}})

    def cluster_queue(self, name: str, quota: dict[str, str | int], namespaces: list[str] | None = None,
                      flavor: str = "default-flavor", preemption: bool = True) -> None:
        """A ClusterQueue with `quota` (resource -> nominal quota) in one flavor, for `namespaces` (else every
        namespace); with `preemption`, a workload may preempt lower-priority ones in it."""
        self.resource_flavor(flavor)
        selector = {} if namespaces is None else {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces}]}
        spec = {"namespaceSelector": selector, "resourceGroups": [{
            "coveredResources": list(quota),
            "flavors": [{"name": flavor, "resources": [{"name": r, "nominalQuota": str(q)}
                                                        for r, q in quota.items()]}]}]}
        if preemption:
            spec["preemption"] = {"withinClusterQueue": "LowerPriority"}
        self.apply({"apiVersion": GROUP_VERSION, "kind": "ClusterQueue", "metadata": {"name": name}, "spec": spec})

    def local_queue(self, namespace: str, name: str, cluster_queue: str) -> None:
        self.apply({"apiVersion": GROUP_VERSION, "kind": "LocalQueue",
                    "metadata": {"name": name, "namespace": namespace}, "spec": {"clusterQueue": cluster_queue}})
