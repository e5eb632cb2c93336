"""The kubetune node agent: a "process kubelet" for the local control plane.

It registers a Node (capacity incl. `nvidia.com/gpu`, labels, taints), keeps it Ready and its Lease
fresh, and runs the pods the real kube-scheduler binds to it as local processes (see agent_pod.py).
Every pod gets its own loopback address (in a 127.x.y.0/20 block per cluster and node, reported as
status.podIP), its own
hostname and a private /etc/hosts listing the pods and services of the cluster, so pods of one Job
reach each other as `<hostname>.<subdomain>` the way they would through cluster DNS.

    python -m kubetune_dev.cluster.agent --kubeconfig KUBECONFIG [--node-name N] [--gpus 2] ...

See docs/node-agent.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import logging
import os
import platform
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import yaml

from .agent_http import LogServer
from .agent_kube import ApiError, Kube
from .agent_pod import TERMINAL, PodWorker, load_image_map, now

log = logging.getLogger("kubetune.agent")

GPU = "nvidia.com/gpu"
NOT_READY_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def micro_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def default_capacity() -> dict[str, str]:
    mem_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    return {"cpu": str(os.cpu_count() or 1), "memory": f"{mem_kib}Ki", "pods": "110",
            "ephemeral-storage": f"{shutil.disk_usage('/').total // 1024}Ki"}


def default_pod_cidr(api_url: str, node_name: str) -> str:
    """A 127.x.y.0/20 block derived from the cluster and node: stable across agent restarts, and
    agents of different clusters on one machine (parallel test sessions) rarely share one."""
    digest = hashlib.sha256(f"{api_url}/{node_name}".encode()).digest()
    return f"127.{16 + digest[0] % 224}.{digest[1] % 16 * 16}.0/20"


def state_home() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "kubetune"


def read_logs(state_dir: str | Path, namespace: str, pod: str, container: str | None = None,
              previous: bool = False) -> str:
    """A container's log as kept by the agent (the only container's if `container` is None)."""
    folder = Path(state_dir) / "logs" / namespace / pod
    if not folder.is_dir():
        raise FileNotFoundError(f"no logs for {namespace}/{pod} under {Path(state_dir) / 'logs'}: "
                                "not a pod this node agent ran (check the name, -n and --state-dir)")
    if container is None:
        names = sorted(p.name[:-4] for p in folder.glob("*.log") if not p.name.endswith(".previous.log"))
        if len(names) != 1:
            raise ValueError(f"pod {namespace}/{pod}: choose a container among {names}")
        container = names[0]
    path = folder / f"{container}{'.previous' if previous else ''}.log"
    if not path.exists():
        raise FileNotFoundError(f"no logs for {namespace}/{pod}/{container} under {folder}")
    return path.read_text(errors="replace")


class IPPool:
    """Per-pod loopback addresses, handed out round-robin so a recent address is reused last."""

    def __init__(self, cidr: str):
        self.net = ipaddress.ip_network(cidr)
        self.used: dict[str, str] = {}
        self.next = 2
        self.lock = threading.Lock()

    def allocate(self, uid: str, preferred: str | None = None) -> str:
        with self.lock:
            if uid in self.used:
                return self.used[uid]
            taken = set(self.used.values())
            if preferred and ipaddress.ip_address(preferred) in self.net and preferred not in taken:
                self.used[uid] = preferred
                return preferred
            for _ in range(self.net.num_addresses):
                ip = str(self.net[self.next])
                self.next = self.next + 1 if self.next + 2 < self.net.num_addresses else 2
                if ip not in taken and not ip.endswith(".0") and not ip.endswith(".255"):
                    self.used[uid] = ip
                    return ip
            raise RuntimeError(f"pod network {self.net} is full")

    def release(self, uid: str) -> None:
        with self.lock:
            self.used.pop(uid, None)


class DevicePool:
    """GPU indices (0..n-1) handed to pods through CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES."""

    def __init__(self, count: int):
        self.free = [str(i) for i in range(count)]
        self.used: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def allocate(self, uid: str, count: int) -> list[str]:
        with self.lock:
            if uid not in self.used:
                self.used[uid], self.free = self.free[:count], self.free[count:]
            return self.used[uid]

    def release(self, uid: str) -> None:
        with self.lock:
            self.free = sorted(self.free + self.used.pop(uid, []), key=int)


class NodeAgent:
    def __init__(self, kubeconfig: str, node_name: str = "kubetune-node", capacity: dict | None = None,
                 labels: dict | None = None, taints: list | None = None, state_dir: str | None = None,
                 image_map=None, pod_cidr: str | None = None, host_ip: str = "127.0.0.1",
                 cluster_domain: str = "cluster.local", backoff_s: float = 10.0, heartbeat_s: float = 10.0,
                 isolate: bool | None = None):
        self.kube = Kube(kubeconfig)
        self.node_name, self.host_ip, self.cluster_domain = node_name, host_ip, cluster_domain
        self.capacity = {**default_capacity(), **{k: str(v) for k, v in (capacity or {}).items()}}
        self.allocatable = dict(self.capacity)
        self.labels, self.taints = dict(labels or {}), list(taints or [])
        self.state_dir = Path(state_dir or state_home() / node_name).resolve()
        self.image_rules = load_image_map(image_map)
        self.backoff_s, self.heartbeat_s = backoff_s, heartbeat_s
        self.isolate = mount_namespaces_work() if isolate is None else isolate
        self.ips = IPPool(pod_cidr or default_pod_cidr(self.kube.host, node_name))
        self.gpu_resource = GPU
        self.gpus = DevicePool(int(self.capacity.get(GPU, 0)))
        api = urlparse(self.kube.host)
        port = str(api.port or 443)
        self.service_env = {"KUBERNETES_SERVICE_HOST": api.hostname, "KUBERNETES_SERVICE_PORT": port,
                            "KUBERNETES_SERVICE_PORT_HTTPS": port, "KUBERNETES_PORT": f"tcp://{api.hostname}:{port}"}
        ca = self.kube.api_client.configuration.ssl_ca_cert
        self.ca_pem = Path(ca).read_text() if ca else ""
        self.pods: dict[str, dict] = {}  # every pod of the cluster, by uid (for /etc/hosts)
        self.services: list[dict] = []
        self.workers: dict[str, PodWorker] = {}
        self.finished: set[str] = set()  # uids whose worker is done but whose object still exists
        self.mount_points: dict[Path, set[str]] = {}  # host paths the agent created -> pods using them
        self.lock = threading.RLock()
        self.stopped = threading.Event()
        self.threads: list[threading.Thread] = []
        self.node_uid = ""
        self.ready_since = now()
        self.log_server: LogServer | None = None

    # ------------------------------------------------------------ public API

    def start(self, timeout: float = 60) -> NodeAgent:
        """Register the Node, start the background threads; return once the Node is Ready."""
        (self.state_dir / "pods").mkdir(parents=True, exist_ok=True)
        try:
            self.log_server = LogServer(self, self.host_ip)
            self.log_server.start()
        except Exception as e:  # optional: only `kubectl logs` needs it
            log.warning("no kubelet log endpoint (kubectl logs will not work): %s", e)
        self._register()
        for target in (self._heartbeat_loop, self._pod_loop, self._hosts_loop):
            t = threading.Thread(target=target, name=f"agent-{target.__name__[1:]}", daemon=True)
            t.start()
            self.threads.append(t)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            node = self.kube.get(f"/api/v1/nodes/{self.node_name}")
            conds = node["status"].get("conditions", [])
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conds)
            tainted = any(t["key"] in NOT_READY_TAINTS for t in node["spec"].get("taints", []))
            if ready and not tainted:
                log.info("node %s is Ready", self.node_name)
                return self
            time.sleep(0.5)
        raise TimeoutError(f"node {self.node_name} did not become Ready (and untainted) in {timeout}s")

    def stop(self, grace: float = 5) -> None:
        """Kill every pod process (SIGTERM, SIGKILL after `grace`), stop the threads, mark Node NotReady."""
        self.stopped.set()
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.stop(grace)
        for w in workers:
            w.join(grace + 10)
        for t in self.threads:
            t.join(2)
        if self.log_server:
            self.log_server.stop()
        try:
            self._patch_node_status(ready=False)
        except Exception as e:  # the control plane may already be gone
            log.debug("could not mark the node NotReady: %s", e)

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def logs(self, namespace: str, pod: str, container: str | None = None, previous: bool = False) -> str:
        return read_logs(self.state_dir, namespace, pod, container, previous)

    def pod_running(self, namespace: str, pod: str) -> bool:
        with self.lock:
            return any(w.ns == namespace and w.pod_name == pod and w.phase not in TERMINAL
                       for w in self.workers.values())

    # ------------------------------------------------------------ the Node and its Lease

    def _register(self) -> None:
        labels = {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": ARCH, **self.labels}
        meta = {"name": self.node_name, "labels": labels,
                "annotations": {"node.alpha.kubernetes.io/ttl": "0", "kubetune.io/node-agent": "process"}}
        body = {"apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": {"taints": self.taints}}
        try:
            node = self.kube.create("/api/v1/nodes", body)
        except ApiError as e:
            if e.status != 409:
                raise
            node = self.kube.patch(f"/api/v1/nodes/{self.node_name}",
                                   {"metadata": meta, "spec": {"taints": self.taints or None}})
        self.node_uid = node["metadata"]["uid"]
        self._patch_node_status(ready=True)
        self._renew_lease()

    def _patch_node_status(self, ready: bool) -> None:
        t = now()
        if not ready:
            self.ready_since = t
        conds = [
            ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID"),
            ("Ready", "True" if ready else "False", "KubeletReady" if ready else "KubeletStopped"),
        ]
        status = {
            "capacity": self.capacity, "allocatable": self.allocatable,
            "conditions": [{"type": k, "status": s, "reason": r, "message": f"kubetune node agent: {r}",
                            "lastHeartbeatTime": t, "lastTransitionTime": self.ready_since}
                           for k, s, r in conds],
            # no Hostname address: the API server would try to resolve it to reach the log endpoint
            "addresses": [{"type": "InternalIP", "address": self.host_ip}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_server.port if self.log_server else 0}},
            "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": platform.release(),
                         "osImage": "kubetune process node", "containerRuntimeVersion": "kubetune-process://0.1",
                         "kubeletVersion": "v0.1.0-kubetune", "kubeProxyVersion": "",
                         "operatingSystem": "linux", "architecture": ARCH},
        }
        self.kube.patch(f"/api/v1/nodes/{self.node_name}/status", {"status": status})

    def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": 40, "renewTime": micro_now()}
        try:
            self.kube.patch(path, {"spec": spec})
        except ApiError as e:
            if e.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.node_name, "uid": self.node_uid}
            self.kube.create("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.node_name, "ownerReferences": [owner]}, "spec": spec})

    def _heartbeat_loop(self) -> None:
        while not self.stopped.wait(self.heartbeat_s):
            try:
                self._renew_lease()
                self._patch_node_status(ready=True)
            except ApiError as e:
                if e.status == 404:
                    log.warning("node %s vanished; registering it again", self.node_name)
                    self._safe(self._register)
                else:
                    log.warning("heartbeat failed: %s", e)
            except Exception as e:
                log.warning("heartbeat failed: %s", e)

    @staticmethod
    def _safe(fn) -> None:
        try:
            fn()
        except Exception as e:
            log.warning("%s failed: %s", fn.__name__, e)

    # ------------------------------------------------------------ pods

    def _pod_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                listing = self.kube.get("/api/v1/pods")
                self._resync(listing["items"])
                for event in self.kube.watch("/api/v1/pods", listing["metadata"]["resourceVersion"], 30):
                    if self.stopped.is_set() or event["type"] == "ERROR":
                        break
                    if event["type"] != "BOOKMARK":
                        self._on_pod(event["type"], event["object"])
            except Exception as e:
                if not self.stopped.is_set():
                    log.warning("pod watch: %s; listing again", e)
                    time.sleep(1)

    def _resync(self, pods: list[dict]) -> None:
        uids = {p["metadata"]["uid"] for p in pods}
        with self.lock:
            self.pods = {p["metadata"]["uid"]: p for p in pods}
            for uid in list(self.workers):
                if uid not in uids:
                    self.workers[uid].stop(0)
            self.finished &= uids
        for p in pods:
            self._on_pod("ADDED", p)

    def _on_pod(self, kind: str, pod: dict) -> None:
        meta, uid = pod["metadata"], pod["metadata"]["uid"]
        with self.lock:
            if kind == "DELETED":
                self.pods.pop(uid, None)
                self.finished.discard(uid)
            else:
                self.pods[uid] = pod
            if pod["spec"].get("nodeName") != self.node_name or self.stopped.is_set():
                return
            worker = self.workers.get(uid)
            if worker is not None:
                if kind == "DELETED":
                    worker.stop(0)
                else:
                    worker.update(pod)
                return
            if kind == "DELETED" or uid in self.finished:
                return
            if (pod.get("status") or {}).get("phase") in TERMINAL:
                if meta.get("deletionTimestamp"):  # nothing runs: let the object go
                    self.finished.add(uid)
                    threading.Thread(target=self._delete_now, args=(pod,), daemon=True).start()
                return
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
        worker.update(pod)
        worker.start()

    def _delete_now(self, pod: dict) -> None:
        meta = pod["metadata"]
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        try:
            self.kube.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body)
        except ApiError as e:
            if e.status not in (404, 409):
                log.warning("deleting pod %s/%s: %s", meta["namespace"], meta["name"], e)

    def release(self, worker: PodWorker) -> None:
        """Called by a worker thread when it is done with its pod: forget it and remove its directory."""
        with self.lock:
            self.workers.pop(worker.uid, None)
            if worker.uid in self.pods:
                self.finished.add(worker.uid)
            for path in sorted(self.mount_points, key=lambda p: len(p.parts), reverse=True):
                users = self.mount_points[path]
                users.discard(worker.uid)
                if not users:  # none of our pods mounts here: remove what we created (if still empty)
                    del self.mount_points[path]
                    if not mounted_anywhere(path):  # e.g. by another agent's pod
                        with contextlib.suppress(OSError):
                            path.rmdir() if path.is_dir() else path.unlink()
        shutil.rmtree(worker.dir, ignore_errors=True)

    def claim_mount_points(self, uid: str, targets: list[tuple[str, bool]]) -> None:
        """Create the missing mount points (dirs, or files for file sources) on the host filesystem:
        a bind mount needs one. They are removed when the last pod using them is gone."""
        with self.lock:
            for target, is_dir in targets:
                path = Path(target)
                missing = [p for p in [path, *path.parents] if not p.exists() and not p.is_symlink()]
                for p in reversed(missing):
                    with contextlib.suppress(OSError):
                        p.mkdir() if p != path or is_dir else p.touch()
                        self.mount_points[p] = set()
                for p in [path, *path.parents]:
                    if p in self.mount_points:
                        self.mount_points[p].add(uid)

    # ------------------------------------------------------------ /etc/hosts

    def _hosts_loop(self) -> None:
        while not self.stopped.wait(1):
            try:
                self.services = self.kube.get("/api/v1/services")["items"]
                with self.lock:
                    workers = list(self.workers.values())
                for w in workers:
                    if w.ip and w.hosts_file.exists():
                        text = self.hosts_for(w)
                        if w.hosts_file.read_text() != text:
                            with open(w.hosts_file, "r+") as f:  # in place: the file is bind-mounted
                                f.write(text)
                                f.truncate()
            except Exception as e:
                if not self.stopped.is_set():
                    log.warning("refreshing /etc/hosts: %s", e)

    def hosts_for(self, worker: PodWorker) -> str:
        """The pod's /etc/hosts: itself, the pods with a hostname+subdomain, the services with a selector."""
        dom = self.cluster_domain
        lines = ["# Kubernetes-managed hosts file (kubetune node agent).", "127.0.0.1\tlocalhost",
                 "::1\tlocalhost ip6-localhost ip6-loopback"]
        if worker.ip:
            own = [worker.hostname]
            if worker.subdomain:
                own = [*dns_names(f"{worker.hostname}.{worker.subdomain}", worker.ns, dom, True), *own]
            lines.append(f"{worker.ip}\t{' '.join(own)}")
        with self.lock:
            pods = [p for p in self.pods.values() if (p.get("status") or {}).get("podIP")
                    and p["status"].get("phase") not in TERMINAL
                    and not p["metadata"].get("deletionTimestamp")]
        for p in pods:
            spec, ns = p["spec"], p["metadata"]["namespace"]
            if p["metadata"]["uid"] == worker.uid or not (spec.get("hostname") and spec.get("subdomain")):
                continue
            names = dns_names(f"{spec['hostname']}.{spec['subdomain']}", ns, dom, ns == worker.ns)
            lines.append(f"{p['status']['podIP']}\t{' '.join(names)}")
        for svc in self.services:
            selector, ns, name = svc["spec"].get("selector"), *meta_key(svc)
            if not selector:
                continue
            names = dns_names(name, ns, dom, ns == worker.ns)
            for p in pods:
                labels = p["metadata"].get("labels") or {}
                if p["metadata"]["namespace"] == ns and all(labels.get(k) == v for k, v in selector.items()):
                    lines.append(f"{p['status']['podIP']}\t{' '.join(names)}")
        return "\n".join(lines) + "\n"


def dns_names(name: str, namespace: str, domain: str, short: bool) -> list[str]:
    """`name` as cluster DNS would answer it: fully qualified, shorter, and bare in its own namespace."""
    return [f"{name}.{namespace}.svc.{domain}", f"{name}.{namespace}.svc", f"{name}.{namespace}"] + \
        ([name] if short else [])


def meta_key(obj: dict) -> tuple[str, str]:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]


def mounted_anywhere(path: Path) -> bool:
    """Is `path` a mount point in any process's mount namespace? (Removing it would detach that mount.) mountinfo
    names the resolved path: /run/secrets/... for /var/run/secrets/... where /var/run links to /run."""
    names = {str(path), str(path.resolve())}
    for info in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            lines = info.read_text().splitlines()
        except OSError:
            continue
        if any(line.split()[4] in names for line in lines):
            return True
    return False


def mount_namespaces_work() -> bool:
    """Can we give each container a private mount + UTS namespace (`unshare`, needs root)?"""
    try:
        probe = subprocess.run(["unshare", "--mount", "--uts", "--propagation", "private", "true"],
                               capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if probe.returncode != 0:
        log.warning("no private mount namespaces (%s): volumes are not mounted at their mountPaths",
                    probe.stderr.decode().strip())
    return probe.returncode == 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kubetune_dev.cluster.agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--node-name", default="kubetune-node")
    p.add_argument("--gpus", type=int, default=0, help=f"advertise this many {GPU}")
    p.add_argument("--capacity", action="append", default=[], metavar="RESOURCE=QUANTITY")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--taint", action="append", default=[], metavar="KEY[=VALUE]:EFFECT")
    p.add_argument("--state-dir")
    p.add_argument("--image-map", help="YAML file mapping images to local environments")
    p.add_argument("--pod-cidr", help="loopback block for pod IPs (default: 127.x.y.0/20 from a hash)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    capacity = dict(kv.split("=", 1) for kv in args.capacity)
    if args.gpus:
        capacity[GPU] = str(args.gpus)
    taints = []
    for t in args.taint:
        kv, _, effect = t.rpartition(":")
        key, _, value = kv.partition("=")
        taints.append({"key": key, "effect": effect, **({"value": value} if value else {})})
    agent = NodeAgent(args.kubeconfig, args.node_name, capacity, dict(kv.split("=", 1) for kv in args.label),
                      taints, args.state_dir, args.image_map, pod_cidr=args.pod_cidr)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    agent.start()
    print(yaml.safe_dump({"node": agent.node_name, "stateDir": str(agent.state_dir)}), end="", flush=True)
    done.wait()
    agent.stop()


if __name__ == "__main__":
    main()
