"""The operator at scale on the local control plane, as markdown for BENCHMARKS.md. Two modes:

    .venv/bin/python bench/bench_operator.py [--jobs 100,400,1000] [--window 60] [--operator-src DIR]
    .venv/bin/python bench/bench_operator.py --mode steady [--live 1000] [--new 100] [--rate 2]

(`--mode burst,steady` runs both, in one report.) Each size and each mode runs on a fresh control plane
(no node agent: every pod stays Pending, on purpose), with the operator started as
`python -m kubetune_operator --all-namespaces`, its own ServiceAccount (bound to cluster-admin), free ports, the
platform's storage credentials (KUBETUNE_STORAGE_SECRET_NAME and _ENDPOINT: those the FineTuneJobs name, and
KUBETUNE_POLICY_CREDENTIALS_NAMESPACES: the bench's namespaces may use them) and every other KUBETUNE_* setting
(KUBETUNE_RESYNC_SECONDS...) at the code's default; the API server writes an audit log (level Metadata) of
that user's requests only.

burst, for each N of --jobs:
  1. create N FineTuneJobs in one namespace from a thread pool, as fast as the client goes;
  2. latency of each = the time a watch on validation Jobs saw `<name>-validate` ADDED minus the time its
     create returned (one client-side clock); p50, p99 and the time until all N have their Job; the ramp,
     from the first create to the last validation Job, is a measured window (below);
  3. after a settle period, a steady-state window: operator CPU (utime+stime from /proc, % of one core),
     RSS (VmHWM: peak over its life; VmRSS at the end) and the operator's API requests by verb and resource,
     from the audit log. Watches are long-running: counted as watch starts, apart from the requests/s.

steady, the user's question: with --live jobs in the cluster, how fast does a new one start?
  1. create --live FineTuneJobs (namespace `bench`) as in burst; wait until each has its validation Job and
     the scheduler has marked each validation pod Unschedulable, then --settle seconds;
  2. create --new FineTuneJobs in namespace `bench-new` at --rate per second, open loop (each create is sent on
     its own schedule from a thread pool, whether or not the ones before have returned);
  3. time each from its create request being sent to (a) a watch on validation Jobs receiving
     `<name>-validate` and (b) a watch on FineTuneJobs receiving it with a status (the operator's first status
     write): client-side receive times in this process, one monotonic clock (the objects' own timestamps
     have whole seconds only); the window runs from the first create to the last of those events.

In each measured window (a burst's ramp, the steady run): the CPU of each control-plane process, of the
operator and of this client (utime+stime from /proc/PID/stat, % of one core), the machine's busy share
(/proc/stat, % of all cores), and the API server's own request latency by verb and resource: its
`apiserver_request_duration_seconds` histogram scraped from /metrics before and after the window, diffed, its
p50 and p99 computed as PromQL's histogram_quantile does (bench_stats.py); their precision is the buckets'
(0.1, 0.2, 0.4, 0.6, 0.8, 1, 1.25, 1.5, 2 s...).

`--operator-src DIR` runs the operator from another checkout (DIR/operator and DIR/trainer-image first on
PYTHONPATH) with that checkout's CRD, e.g. a `git worktree` of the commit before a change.
Everything started is stopped by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import kopf
import kubernetes
import urllib3
import yaml
from bench_stats import Latency, quantile, request_latencies
from kubernetes import client, watch
from kubetune_dev.cluster.controlplane import ControlPlane, free_port

ROOT = Path(__file__).resolve().parents[1]
CRD = Path("crds") / "kubetune.io_finetunejobs.yaml"  # of the checkout the operator runs from
WORK = ROOT / ".work" / "bench-operator"
NS, NEW_NS, SA_NS, SA = "bench", "bench-new", "kubetune-system", "kubetune-operator"  # NEW_NS: steady's new jobs
OPERATOR_USER = f"system:serviceaccount:{SA_NS}:{SA}"
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
LABEL_JOB, VALIDATION = "kubetune.io/finetunejob", "app.kubernetes.io/component=validation"
GOALS = {"p99_s": 1.0, "req_per_job": 0.1, "rss_mib": 300, "cpu_pct": 25}
STEADY_GOALS = {"to_job_p99_s": 1.0, "to_status_p99_s": 2.0}
CONTROL_PLANE = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler")
AUDIT_POLICY = {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
                "rules": [{"level": "Metadata", "users": [OPERATOR_USER]}, {"level": "None"}]}

# The style of examples/demo-finetunejob.yaml; nothing behind the URIs needs to exist (pods stay Pending).
SPEC = {
    "baseModel": {"uri": "s3://models/tiny-llama/"},
    "dataset": {"train": "s3://datasets/support-bot/train.jsonl",
                "validation": "s3://datasets/support-bot/validation.jsonl", "format": "chat"},
    "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "targetModules": ["all-linear"]}},
    "hyperparameters": {"epochs": 1, "learningRate": 0.0002, "batchSize": 8, "maxSeqLength": 256},
    "output": {"uri": "s3://adapters/bench/"},
    "storage": {"endpoint": "http://minio.minio:9000", "region": "us-east-1",
                "secretRef": {"name": "s3-credentials"}},
    "resources": {"workers": 1, "gpusPerWorker": 0, "cpu": "2", "memory": "4Gi"},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ftj(name: str) -> dict:
    spec = copy.deepcopy(SPEC)
    spec["output"]["uri"] = f"s3://adapters/{name}/"
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}


def wait_for(what: str, predicate, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)
    return value


# -- the cluster: CRD, the operator's identity --------------------------------------------------------------


def apply_crd(api: client.ApiClient, src: Path) -> None:
    ext = client.ApiextensionsV1Api(api)
    ext.create_custom_resource_definition(yaml.safe_load((src / CRD).read_text()))

    def established() -> bool:
        crd = ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}")
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    wait_for("the CRD to be established", established, timeout=60)


def operator_kubeconfig(cp: ControlPlane, api: client.ApiClient) -> Path:
    """A ServiceAccount bound to cluster-admin and a kubeconfig with its token: the audit log's user."""
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    for ns in (NS, NEW_NS, SA_NS):
        core.create_namespace({"metadata": {"name": ns}})
    core.create_namespaced_service_account(SA_NS, {"metadata": {"name": SA}})
    rbac.create_cluster_role_binding({
        "metadata": {"name": SA}, "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": SA_NS}],
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"}})
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"audiences": [], "expirationSeconds": 24 * 3600}}
    token = core.create_namespaced_service_account_token(SA, SA_NS, request).status.token
    config = yaml.safe_load(cp.kubeconfig.read_text())
    config["users"] = [{"name": "admin", "user": {"token": token}}]
    path = cp.workdir / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    os.chmod(path, 0o600)
    return path


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far: utime + stime from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the operator process -----------------------------------------------------------------------------------


class Operator:
    def __init__(self, kubeconfig: Path, src: Path | None, log_path: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}  # the code's defaults
        env.update(KUBECONFIG=str(kubeconfig), KUBETUNE_TRAINER_IMAGE="ghcr.io/kubetune/trainer:bench",
                   # the platform's storage credentials (the chart's storage.* and policy.*): SPEC's, for the
                   # bench's namespaces
                   KUBETUNE_STORAGE_SECRET_NAME=SPEC["storage"]["secretRef"]["name"],
                   KUBETUNE_STORAGE_ENDPOINT=SPEC["storage"]["endpoint"],
                   KUBETUNE_POLICY_CREDENTIALS_NAMESPACES=f"{NS},{NEW_NS}",
                   **{f"KUBETUNE_{port}_PORT": str(free_port()) for port in ("HEALTH", "METRICS", "READY")})
        if src:
            env["PYTHONPATH"] = os.pathsep.join(
                [str(src / "operator"), str(src / "search"), str(src / "trainer-image"),
                 *filter(None, [env.get("PYTHONPATH")])])
        self.health = f"http://127.0.0.1:{env['KUBETUNE_HEALTH_PORT']}/healthz"
        self.log_path = log_path
        with log_path.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "kubetune_operator", "--all-namespaces"],
                                         env=env, cwd=src or ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        wait_for("the operator's liveness endpoint", lambda: self.check() and self._healthy(), timeout=120)

    def _healthy(self) -> bool:
        with contextlib.suppress(OSError), urllib.request.urlopen(self.health, timeout=3) as resp:
            return resp.status == 200
        return False

    def check(self) -> bool:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the operator exited ({self.proc.returncode}):\n{tail}")
        return True

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def memory_mib(self, key: str) -> float:  # VmRSS (now) or VmHWM (peak)
        line = next(x for x in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
                    if x.startswith(key + ":"))
        return int(line.split()[1]) / 1024

    def stop(self, grace: float = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- measuring ----------------------------------------------------------------------------------------------


class FirstSeen(threading.Thread):
    """A list-then-watch of one kind of object: when each (by `key`) was first received meeting `wanted`, in
    time.monotonic() of this process. `ready` is set once the first list is in."""

    def __init__(self, list_fn, args: tuple, key, wanted=lambda obj: True, **kwargs):
        super().__init__(daemon=True)
        self.list_fn, self.args, self.kwargs, self.key, self.wanted = list_fn, args, kwargs, key, wanted
        self.seen: dict[str, float] = {}
        self.ready, self.stopping = threading.Event(), threading.Event()

    def _saw(self, obj) -> None:
        if self.wanted(obj):
            self.seen.setdefault(self.key(obj), time.monotonic())

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                listed = self.list_fn(*self.args, **self.kwargs)
                items, version = (listed["items"], listed["metadata"]["resourceVersion"]) if isinstance(
                    listed, dict) else (listed.items, listed.metadata.resource_version)
                for obj in items:
                    self._saw(obj)
                self.ready.set()
                for event in watch.Watch().stream(self.list_fn, *self.args, timeout_seconds=30,
                                                  resource_version=version, **self.kwargs):
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._saw(event["object"])
            except Exception as e:  # noqa: BLE001 - the cluster is going away, or a watch expired
                if not self.stopping.is_set():
                    log(f"watch restarts: {type(e).__name__}: {e}"[:200])
                    time.sleep(0.5)


def validation_jobs(api: client.ApiClient, namespace: str) -> FirstSeen:
    """When each FineTuneJob's validation Job was first received (by the FineTuneJob's name)."""
    return FirstSeen(client.BatchV1Api(api).list_namespaced_job, (namespace,), label_selector=VALIDATION,
                     key=lambda job: (job.metadata.labels or {}).get(LABEL_JOB))


def first_status(api: client.ApiClient, namespace: str) -> FirstSeen:
    """When each FineTuneJob was first received with a status: the operator's first status write (kopf keeps
    its own state in annotations, so nothing else writes the status)."""
    return FirstSeen(client.CustomObjectsApi(api).list_namespaced_custom_object,
                     (GROUP, VERSION, namespace, PLURAL), key=lambda obj: obj["metadata"]["name"],
                     wanted=lambda obj: bool(obj.get("status")))


def start_watches(*watches: FirstSeen) -> None:
    for w in watches:
        w.start()
    for w in watches:
        wait_for("a watch's first list", w.ready.is_set, timeout=120, every=0.1)


def stop_watches(*watches: FirstSeen | None) -> None:
    for w in watches:
        if w:
            w.stopping.set()


@dataclass
class Traffic:
    requests: Counter = field(default_factory=Counter)  # (verb, resource) -> completed non-watch requests
    watches: Counter = field(default_factory=Counter)  # resource -> watch starts
    errors: Counter = field(default_factory=Counter)  # HTTP code >= 400 -> count


def read_audit(path: Path, start: int, end: int) -> Traffic:
    """The operator's requests in the audit log between two byte offsets (whole lines only)."""
    t = Traffic()
    with path.open("rb") as f:
        f.seek(max(0, start - 1))
        data = f.read(end - max(0, start - 1))
    lines = data.split(b"\n")
    if start > 0 and not data.startswith(b"\n"):
        lines = lines[1:]  # the line that straddles `start` belongs to the previous range
    for line in lines[:-1]:  # the last piece is empty or an unfinished line
        if not line.strip():
            continue
        ev = json.loads(line)
        ref = ev.get("objectRef") or {}
        res = ref.get("resource") or ev["requestURI"].split("?")[0]
        res = f"{res}/{ref['subresource']}" if ref.get("subresource") else res
        if ev["verb"] == "watch":
            if ev["stage"] == "ResponseStarted":
                t.watches[res] += 1
            continue
        if ev["stage"] == "ResponseComplete":
            t.requests[(ev["verb"], res)] += 1
            code = (ev.get("responseStatus") or {}).get("code", 200)
            if code >= 400:
                t.errors[code] += 1
    return t


def audit_end(path: Path) -> int:
    """An offset at a line boundary at (or just before) the current end of the log."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 1_000_000))
        tail = f.read()
    return size - len(tail) + tail.rfind(b"\n") + 1


def machine_ticks() -> tuple[int, int]:
    """(busy, all) clock ticks of every CPU so far, from /proc/stat (idle and iowait are not busy)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


@dataclass
class Mark:
    at: float
    cpu: dict[str, float]  # process -> CPU seconds so far
    ticks: tuple[int, int]
    metrics: str  # the API server's /metrics
    audit: int  # an offset in the audit log


@dataclass
class Usage:
    """One measured window."""

    seconds: float = 0
    cpu: dict[str, float] = field(default_factory=dict)  # process -> % of one core
    busy: float = 0  # the machine: % of all its cores
    load: float = 0  # the 1-minute load average at the end
    latency: list[Latency] = field(default_factory=list)  # the API server's, by verb and resource
    traffic: Traffic = field(default_factory=Traffic)  # the operator's requests (audit log)


class Meter:
    """Marks a window's start and end: the CPU time of each control-plane process, of the operator and of this
    client, the machine's ticks, the API server's /metrics and the audit log's end."""

    def __init__(self, cp: ControlPlane, api: client.ApiClient, operator: Operator, audit: Path):
        self.api, self.audit = api, audit
        self.pids = {**{name: cp.procs[name].pid for name in CONTROL_PLANE}, "operator": operator.proc.pid,
                     "bench client": os.getpid()}

    def _metrics(self) -> str:
        resp = self.api.call_api(*self.api.param_serialize("GET", "/metrics", auth_settings=["BearerToken"]))
        resp.read()
        return resp.data.decode()

    def mark(self, end: bool = False) -> Mark:
        """The scrape of /metrics lies outside the window: before the clocks at its start, after them at its end."""
        metrics = "" if end else self._metrics()
        mark = Mark(time.monotonic(), {k: cpu_seconds(pid) for k, pid in self.pids.items()}, machine_ticks(),
                    metrics, audit_end(self.audit))
        if end:
            mark.metrics = self._metrics()
        return mark

    def usage(self, a: Mark, b: Mark) -> Usage:
        seconds = b.at - a.at
        busy, ticks = b.ticks[0] - a.ticks[0], b.ticks[1] - a.ticks[1]
        return Usage(seconds, {k: 100 * (b.cpu[k] - a.cpu[k]) / seconds for k in self.pids},
                     100 * busy / max(ticks, 1), os.getloadavg()[0], request_latencies(a.metrics, b.metrics),
                     read_audit(self.audit, a.audit, b.audit))


# -- a run: control plane, operator ---------------------------------------------------------------------------


@dataclass
class Bench:
    label: str
    cp: ControlPlane
    api: client.ApiClient
    operator: Operator
    audit: Path
    meter: Meter

    def create_all(self, namespace: str, names: list[str], clients: int) -> dict[str, float]:
        """Create FineTuneJobs as fast as `clients` threads go: name -> when its create returned."""
        custom = client.CustomObjectsApi(self.api)

        def create(name: str) -> tuple[str, float]:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, ftj(name))
            return name, time.monotonic()

        with ThreadPoolExecutor(clients) as pool:
            return dict(pool.map(create, names))

    def await_all(self, what: str, watches: list[FirstSeen], namespace: str, names: list[str],
                  timeout: float) -> bool:
        """Wait until each watch has seen every name (or `timeout`), the operator alive; progress every 10 s, and
        where there was none, whether the FineTuneJobs failed (a bench that measures nothing stops)."""
        deadline, last, before = time.monotonic() + timeout, time.monotonic(), 0
        while (have := min(sum(n in w.seen for n in names) for w in watches)) < len(names):
            self.operator.check()
            if time.monotonic() > deadline:
                log(f"{self.label}: only {have}/{len(names)} have {what} after {timeout:.0f}s; measuring anyway")
                return False
            if time.monotonic() - last > 10:
                log(f"{self.label}: {have}/{len(names)} have {what}")
                if have == before and (failed := self.failed(namespace)):
                    raise RuntimeError(f"{len(failed)} FineTuneJobs failed, e.g. {failed[0]}")
                last, before = time.monotonic(), have
            time.sleep(0.05)
        return True

    def failed(self, namespace: str) -> list[str]:
        """'name: message' of each Failed FineTuneJob in `namespace` (raw JSON: quick for a thousand); none when
        the API server does not answer (a congested one times a LIST out: the wait goes on)."""
        try:
            resp = client.CustomObjectsApi(self.api).list_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, _preload_content=False)
        except (client.ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            log(f"{self.label}: could not list the FineTuneJobs: {type(e).__name__}: {e}"[:200])
            return []
        return [f"{o['metadata']['name']}: {o['status'].get('message')}" for o in json.loads(resp.data)["items"]
                if (o.get("status") or {}).get("phase") == "Failed"]


@contextlib.contextmanager
def bench(label: str, args: argparse.Namespace):
    """A fresh control plane that audits the operator's requests, the CRD, and the operator running."""
    cp = ControlPlane()
    audit = cp.workdir / "audit.log"
    (cp.workdir / "audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_POLICY))
    cp.extra_args = {"kube-apiserver": [f"--audit-policy-file={cp.workdir / 'audit-policy.yaml'}",
                                        f"--audit-log-path={audit}", "--audit-log-maxsize=0"]}
    operator, t = None, time.monotonic()
    try:
        cp.start()
        api = cp.api_client()
        apply_crd(api, args.operator_src or ROOT)
        kubeconfig = operator_kubeconfig(cp, api)
        log(f"{label}: control plane {cp.version.get('gitVersion')} up in {time.monotonic() - t:.0f}s")
        operator = Operator(kubeconfig, args.operator_src, WORK / f"operator-{label}.log")
        log(f"{label}: operator pid {operator.proc.pid} healthy")
        yield Bench(label, cp, api, operator, audit, Meter(cp, api, operator, audit))
    finally:
        if operator:
            operator.stop()
        cp.stop()
        log(f"{label}: stopped ({time.monotonic() - t:.0f}s)")


# -- burst: N creates at once, then the steady state --------------------------------------------------------


@dataclass
class Result:
    jobs: int
    create_s: float = 0
    with_job: int = 0
    all_s: float | None = None  # None: not all within the timeout
    p50: float | None = None
    p99: float | None = None
    cpu_pct: float = 0
    rss_peak: float = 0
    rss_end: float = 0
    window_s: float = 0
    ramp: Traffic = field(default_factory=Traffic)  # from the operator's start to the last validation Job
    ramp_usage: Usage = field(default_factory=Usage)  # from the first create to the last validation Job
    steady: Traffic = field(default_factory=Traffic)

    @property
    def req_s(self) -> float:
        return sum(self.steady.requests.values()) / self.window_s if self.window_s else 0

    @property
    def req_s_per_job(self) -> float:
        return self.req_s / self.jobs


def run_size(n: int, args: argparse.Namespace) -> tuple[Result, dict]:
    r = Result(n)
    with bench(f"burst-{n}", args) as b:
        jobs = validation_jobs(b.api, NS)
        try:
            start_watches(jobs)
            names = [f"bench-{i:04d}" for i in range(n)]
            before = b.meter.mark()
            t0 = time.monotonic()
            created = b.create_all(NS, names, args.clients)
            r.create_s = time.monotonic() - t0
            log(f"N={n}: {n} FineTuneJobs created in {r.create_s:.1f}s ({n / r.create_s:.0f}/s)")
            everyone = b.await_all("their validation Job", [jobs], NS, names, args.timeout)
            ramp_end = b.meter.mark(end=True)
            r.ramp_usage, r.ramp = b.meter.usage(before, ramp_end), read_audit(b.audit, 0, ramp_end.audit)
            r.with_job = sum(name in jobs.seen for name in names)
            lat = [jobs.seen[k] - v for k, v in created.items() if k in jobs.seen]
            r.p50, r.p99 = quantile(lat, 0.5), quantile(lat, 0.99)
            if everyone:
                r.all_s = max(jobs.seen[k] for k in created) - t0
                log(f"N={n}: all have their validation Job {r.all_s:.1f}s after the first create; "
                    f"latency p50 {r.p50:.2f}s p99 {r.p99:.2f}s")

            log(f"N={n}: settling {args.settle:.0f}s, then a {args.window:.0f}s window")
            time.sleep(args.settle)
            b.operator.check()
            a0, c0, w0 = audit_end(b.audit), b.operator.cpu_seconds(), time.monotonic()
            time.sleep(args.window)
            b.operator.check()
            a1, c1, r.window_s = audit_end(b.audit), b.operator.cpu_seconds(), time.monotonic() - w0
            r.rss_peak, r.rss_end = b.operator.memory_mib("VmHWM"), b.operator.memory_mib("VmRSS")
            r.cpu_pct = 100 * (c1 - c0) / r.window_s
            r.steady = read_audit(b.audit, a0, a1)
            log(f"N={n}: CPU {r.cpu_pct:.1f}% RSS peak {r.rss_peak:.0f} MiB end {r.rss_end:.0f} MiB; "
                f"{r.req_s:.1f} req/s = {r.req_s_per_job:.3f}/job; watch starts {sum(r.steady.watches.values())}")
            return r, b.cp.version
        finally:
            stop_watches(jobs)


# -- steady: new jobs at a steady rate among many live ones --------------------------------------------------


@dataclass
class Steady:
    live: int
    new: int
    rate: float
    live_pending: int = 0  # the live jobs' validation pods marked Unschedulable
    live_s: float = 0  # from the first live create until those pods were marked
    late: float = 0  # the most a create was sent after its turn, seconds
    create: list[float] = field(default_factory=list)  # each new create, sent -> returned
    to_job: list[float] = field(default_factory=list)  # sent -> its validation Job received
    to_status: list[float] = field(default_factory=list)  # sent -> its first status received
    usage: Usage = field(default_factory=Usage)


def unschedulable(api: client.ApiClient, namespace: str) -> int:
    """Validation pods the scheduler has marked Unschedulable (raw JSON: a thousand V1Pods are slow to build)."""
    resp = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=VALIDATION, _preload_content=False)
    return sum(any(c.get("type") == "PodScheduled" and c.get("reason") == "Unschedulable"
                   for c in (pod.get("status") or {}).get("conditions") or [])
               for pod in json.loads(resp.data)["items"])


def run_steady(args: argparse.Namespace) -> tuple[Steady, dict]:
    r = Steady(args.live, args.new, args.rate)
    with bench(f"steady-{args.live}", args) as b:
        live_jobs = validation_jobs(b.api, NS)
        new_jobs, new_status = validation_jobs(b.api, NEW_NS), first_status(b.api, NEW_NS)
        try:
            # the live jobs: each with its validation Job, whose pod no node can run
            start_watches(live_jobs)
            t, live = time.monotonic(), [f"live-{i:04d}" for i in range(args.live)]
            b.create_all(NS, live, args.clients)
            b.await_all("their validation Job", [live_jobs], NS, live, args.timeout)
            with contextlib.suppress(TimeoutError):
                wait_for("the live jobs' pods to be Unschedulable",
                         lambda: unschedulable(b.api, NS) >= args.live, timeout=args.timeout, every=5)
            r.live_pending, r.live_s = unschedulable(b.api, NS), time.monotonic() - t
            log(f"{b.label}: {args.live} live, {r.live_pending} validation pods Unschedulable after "
                f"{r.live_s:.0f}s; settling {args.settle:.0f}s")
            time.sleep(args.settle)

            # the new ones, open loop: each create on its own schedule
            start_watches(new_jobs, new_status)
            custom, sent, returned = client.CustomObjectsApi(b.api), {}, {}
            names = [f"new-{i:04d}" for i in range(args.new)]

            def create(name: str, at: float) -> float:
                time.sleep(max(0.0, at - time.monotonic()))
                sent[name] = time.monotonic()
                custom.create_namespaced_custom_object(GROUP, VERSION, NEW_NS, PLURAL, ftj(name))
                returned[name] = time.monotonic()
                return sent[name] - at

            before = b.meter.mark()
            t0 = time.monotonic()
            with ThreadPoolExecutor(args.clients) as pool:
                r.late = max(pool.map(create, names, [t0 + i / args.rate for i in range(args.new)]))
            log(f"{b.label}: {args.new} new FineTuneJobs sent at {args.rate:g}/s (at most {r.late:.2f}s late)")
            b.await_all("their validation Job and a status", [new_jobs, new_status], NEW_NS, names, args.timeout)
            r.usage = b.meter.usage(before, b.meter.mark(end=True))
            if failed := b.failed(NEW_NS):
                raise RuntimeError(f"{len(failed)} new FineTuneJobs failed, e.g. {failed[0]}")
            r.create = [returned[n] - sent[n] for n in names]
            r.to_job = [new_jobs.seen[n] - sent[n] for n in names if n in new_jobs.seen]
            r.to_status = [new_status.seen[n] - sent[n] for n in names if n in new_status.seen]
            log(f"{b.label}: to the validation Job p99 {fmt_s(quantile(r.to_job, 0.99))}s, to the first status "
                f"p99 {fmt_s(quantile(r.to_status, 0.99))}s; API server CPU {r.usage.cpu['kube-apiserver']:.0f}%")
            return r, b.cp.version
        finally:
            stop_watches(live_jobs, new_jobs, new_status)


# -- the report ---------------------------------------------------------------------------------------------


def fmt_s(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def burst_report(results: list[Result], args: argparse.Namespace) -> list[str]:
    out = [f"Burst: N creates from {args.clients} threads; steady-state window {args.window:.0f}s after a "
           f"{args.settle:.0f}s settle.", "",
           "| jobs | create | have Job | all have Job | p50 | p99 | CPU | RSS peak / end | "
           "API req/s | req/s per job | watch starts: ramp / window | ramp req per job |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        all_s = f"{r.all_s:.1f} s" if r.all_s is not None else f"> {args.timeout:.0f} s"
        out.append(
            f"| {r.jobs:,} | {r.create_s:.1f} s | {r.with_job:,} | {all_s} | {fmt_s(r.p50)} s | {fmt_s(r.p99)} s "
            f"| {r.cpu_pct:.0f}% | {r.rss_peak:.0f} / {r.rss_end:.0f} MiB | {r.req_s:.1f} | "
            f"{r.req_s_per_job:.3f} | {sum(r.ramp.watches.values())} / {sum(r.steady.watches.values())} | "
            f"{sum(r.ramp.requests.values()) / r.jobs:.1f} |")
    out += ["", "Steady-state requests/s by verb and resource (watch starts in the window in brackets):", "",
            "| verb resource | " + " | ".join(f"{r.jobs:,} jobs" for r in results) + " |",
            "|---|" + "---:|" * len(results)]
    keys = sorted({k for r in results for k in r.steady.requests}, key=lambda k: (k[1], k[0]))
    for verb, res in keys:
        out.append(f"| {verb} {res} | " + " | ".join(
            f"{r.steady.requests[(verb, res)] / r.window_s:.2f}" for r in results) + " |")
    for res in sorted({k for r in results for k in r.steady.watches}):
        out.append(f"| watch {res} | " + " | ".join(f"[{r.steady.watches[res]}]" for r in results) + " |")
    errors = sum((r.ramp.errors + r.steady.errors for r in results), Counter())
    if errors:
        out += ["", "Error responses to the operator: " + ", ".join(f"HTTP {c}: {k}" for c, k in errors.items())]
    big = max(results, key=lambda r: r.jobs)
    checks = [("p99 < 1 s", big.all_s is not None and big.p99 < GOALS["p99_s"]),
              ("< 0.1 req/s per job", big.req_s_per_job < GOALS["req_per_job"]),
              ("RSS < 300 MiB", big.rss_peak < GOALS["rss_mib"]),
              ("CPU < 25% of a core", big.cpu_pct < GOALS["cpu_pct"])]
    out += ["", f"Goals at {big.jobs:,} jobs: " + "; ".join(f"{g}: {'met' if ok else 'NOT met'}" for g, ok in checks)]
    return out


def steady_report(r: Steady, args: argparse.Namespace) -> list[str]:
    def row(what: str, values: list[float]) -> str:
        missing = r.new - len(values)
        return (f"| {what} | {fmt_s(quantile(values, 0.5))} s | {fmt_s(quantile(values, 0.99))} s | "
                f"{fmt_s(max(values, default=None))} s | {missing or 'none'} |")

    per_job = sum(r.usage.traffic.requests.values()) / r.new
    top = ", ".join(f"{verb} {res} {n}" for (verb, res), n in r.usage.traffic.requests.most_common(8))
    p_job, p_status = quantile(r.to_job, 0.99), quantile(r.to_status, 0.99)
    checks = [(f"p99 < {STEADY_GOALS['to_job_p99_s']:g} s to the validation Job",
               len(r.to_job) == r.new and p_job < STEADY_GOALS["to_job_p99_s"]),
              (f"p99 < {STEADY_GOALS['to_status_p99_s']:g} s to the first status write",
               len(r.to_status) == r.new and p_status < STEADY_GOALS["to_status_p99_s"])]
    return [f"Steady: {r.live:,} FineTuneJobs live ({r.live_pending:,} validation pods Unschedulable, "
            f"{r.live_s:.0f} s to get there), then {r.new} new ones at {r.rate:g}/s (sent at most {r.late:.2f} s "
            "after their turn). From each create being sent to a watch in this process receiving the object "
            "(client-side receive times, one monotonic clock):", "",
            f"| from the create to | p50 | p99 | max | missing after {args.timeout:.0f} s |",
            "|---|---:|---:|---:|---:|",
            row("the create's response", r.create), row("its validation Job", r.to_job),
            row("its first status write", r.to_status), "",
            f"The operator's API requests in the window: {per_job:.1f} per new job ({top}).", "",
            "Goals: " + "; ".join(f"{g}: {'met' if ok else 'NOT met'}" for g, ok in checks)]


def usage_report(windows: list[tuple[str, Usage]]) -> list[str]:
    procs = list(CONTROL_PLANE) + ["operator", "bench client"]
    out = [f"CPU in each measured window, % of one core (the machine has {os.cpu_count()}; busy: % of all of "
           "them, whoever used them):", "",
           "| window | seconds | " + " | ".join(procs) + " | machine busy | load (1 min) |",
           "|---|---:|" + "---:|" * (len(procs) + 2)]
    for name, u in windows:
        out.append(f"| {name} | {u.seconds:.1f} | " + " | ".join(f"{u.cpu.get(p, 0):.0f}%" for p in procs)
                   + f" | {u.busy:.0f}% | {u.load:.1f} |")
    out += ["", "The API server's request latency in each window (`apiserver_request_duration_seconds` from its "
            "/metrics, diffed over the window; the most frequent verbs and resources, WATCH left out):", "",
            "| window | verb resource | requests | p50 | p99 |", "|---|---|---:|---:|---:|"]
    for name, u in windows:
        out += [f"| {name} | {x.verb} {x.resource} | {x.requests:,} | {fmt_s(x.p50)} s | {fmt_s(x.p99)} s |"
                for x in u.latency]
    return out


def report(results: list[Result], steady: Steady | None, version: dict, args: argparse.Namespace) -> str:
    src = f"`{args.operator_src}`" if args.operator_src else "this checkout"
    out = [f"Kubernetes {version.get('gitVersion')}, kopf {kopf.__version__}, "
           f"kubernetes client {kubernetes.__version__}, Python {platform.python_version()}; "
           f"operator from {src}.", ""]
    windows = [(f"burst {r.jobs:,}: ramp", r.ramp_usage) for r in results]
    if results:
        out += burst_report(results, args) + [""]
    if steady:
        out += steady_report(steady, args) + [""]
        windows.append((f"steady {steady.live:,} + {steady.new}", steady.usage))
    return "\n".join(out + usage_report(windows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", default="burst", help="burst, steady, or burst,steady (both, in one report)")
    p.add_argument("--jobs", default="100,400,1000", help="burst: comma-separated numbers of FineTuneJobs")
    p.add_argument("--window", type=float, default=60, help="burst: steady-state window, seconds")
    p.add_argument("--settle", type=float, default=15,
                   help="wait after all have their Job (steady: their pods Unschedulable), seconds")
    p.add_argument("--live", type=int, default=1000, help="steady: FineTuneJobs live before the new ones")
    p.add_argument("--new", type=int, default=100, help="steady: new FineTuneJobs, timed")
    p.add_argument("--rate", type=float, default=2, help="steady: new FineTuneJobs per second")
    p.add_argument("--timeout", type=float, default=240,
                   help="most seconds to wait for all validation Jobs (then measure anyway)")
    p.add_argument("--clients", type=int, default=8, help="threads creating FineTuneJobs")
    p.add_argument("--operator-src", type=lambda s: Path(s).resolve(), default=None,
                   help="run the operator from this checkout (DIR/operator, DIR/trainer-image)")
    args = p.parse_args()
    modes = set(args.mode.split(","))
    if not modes or modes - {"burst", "steady"}:
        p.error(f"--mode {args.mode}: give burst, steady or burst,steady")
    WORK.mkdir(parents=True, exist_ok=True)
    start, results, steady, version = time.monotonic(), [], None, {}
    if "burst" in modes:
        for n in (int(x) for x in args.jobs.split(",")):
            result, version = run_size(n, args)
            results.append(result)
    if "steady" in modes:
        steady, version = run_steady(args)
    log(f"done in {(time.monotonic() - start) / 60:.1f} min; operator logs in {WORK}")
    print("\n" + report(results, steady, version, args))


if __name__ == "__main__":
    main()
