"""The operator at scale: N live FineTuneJobs on the local control plane, as markdown for BENCHMARKS.md.

    .venv/bin/python bench/bench_operator.py [--jobs 100,400,1000] [--window 60] [--operator-src DIR]

For each N, on a fresh control plane (no node agent: every pod stays Pending, on purpose):
  1. start `python -m kubetune_operator --all-namespaces` as its own ServiceAccount (bound to cluster-admin)
     with free ports and every other KUBETUNE_* setting (KUBETUNE_RESYNC_SECONDS...) at the code's default;
     the API server writes an audit log (level Metadata) of that user's requests only;
  2. create N FineTuneJobs in one namespace from a thread pool, as fast as the client goes;
  3. latency of each = the time a watch on validation Jobs saw `<name>-validate` ADDED minus the time its
     create returned (one client-side clock); p50, p99 and the time until all N have their Job;
  4. after a settle period, a steady-state window: operator CPU (utime+stime from /proc, % of one core),
     RSS (VmHWM: peak over its life; VmRSS at the end) and the operator's API requests by verb and resource,
     from the audit log. Watches are long-running: counted as watch starts, apart from the requests/s.

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
import statistics
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
import yaml
from kubernetes import client, watch
from kubetune_dev.cluster.controlplane import ControlPlane, free_port

ROOT = Path(__file__).resolve().parents[1]
CRD = Path("crds") / "kubetune.io_finetunejobs.yaml"  # of the checkout the operator runs from
WORK = ROOT / ".work" / "bench-operator"
NS, SA_NS, SA = "bench", "kubetune-system", "kubetune-operator"
OPERATOR_USER = f"system:serviceaccount:{SA_NS}:{SA}"
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
LABEL_JOB, VALIDATION = "kubetune.io/finetunejob", "app.kubernetes.io/component=validation"
GOALS = {"p99_s": 1.0, "req_per_job": 0.1, "rss_mib": 300, "cpu_pct": 25}
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
    for ns in (NS, SA_NS):
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


# -- the operator process -----------------------------------------------------------------------------------


class Operator:
    def __init__(self, kubeconfig: Path, src: Path | None, log_path: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}  # the code's defaults
        env.update(KUBECONFIG=str(kubeconfig), KUBETUNE_TRAINER_IMAGE="ghcr.io/kubetune/trainer:bench",
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
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

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


class JobWatch(threading.Thread):
    """Records when each FineTuneJob's validation Job was first seen (time.monotonic())."""

    def __init__(self, api: client.ApiClient):
        super().__init__(daemon=True)
        self.batch, self.seen, self.stopping = client.BatchV1Api(api), {}, threading.Event()

    def _saw(self, job) -> None:
        self.seen.setdefault((job.metadata.labels or {}).get(LABEL_JOB), time.monotonic())

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                jobs = self.batch.list_namespaced_job(NS, label_selector=VALIDATION)
                for job in jobs.items:
                    self._saw(job)
                for event in watch.Watch().stream(
                        self.batch.list_namespaced_job, NS, label_selector=VALIDATION, timeout_seconds=30,
                        resource_version=jobs.metadata.resource_version):
                    if event["type"] == "ADDED":
                        self._saw(event["object"])
            except Exception as e:  # noqa: BLE001 - the cluster is going away, or a watch expired
                if not self.stopping.is_set():
                    log(f"job watch restarts: {type(e).__name__}: {e}"[:200])
                    time.sleep(0.5)


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


@dataclass
class Result:
    jobs: int
    create_s: float = 0
    with_job: int = 0
    all_s: float | None = None  # None: not all within the timeout
    p50: float = 0
    p99: float = 0
    cpu_pct: float = 0
    rss_peak: float = 0
    rss_end: float = 0
    window_s: float = 0
    ramp: Traffic = field(default_factory=Traffic)
    steady: Traffic = field(default_factory=Traffic)

    @property
    def req_s(self) -> float:
        return sum(self.steady.requests.values()) / self.window_s if self.window_s else 0

    @property
    def req_s_per_job(self) -> float:
        return self.req_s / self.jobs


def run_size(n: int, args: argparse.Namespace) -> tuple[Result, dict]:
    r = Result(n)
    cp = ControlPlane()
    audit = cp.workdir / "audit.log"
    (cp.workdir / "audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_POLICY))
    cp.extra_args = {"kube-apiserver": [f"--audit-policy-file={cp.workdir / 'audit-policy.yaml'}",
                                        f"--audit-log-path={audit}", "--audit-log-maxsize=0"]}
    operator = watcher = None
    t = time.monotonic()
    try:
        cp.start()
        api = cp.api_client()
        apply_crd(api, args.operator_src or ROOT)
        kubeconfig = operator_kubeconfig(cp, api)
        log(f"N={n}: control plane {cp.version.get('gitVersion')} up in {time.monotonic() - t:.0f}s")
        operator = Operator(kubeconfig, args.operator_src, WORK / f"operator-{n}.log")
        log(f"N={n}: operator pid {operator.proc.pid} healthy")
        watcher = JobWatch(api)
        watcher.start()
        time.sleep(1)

        custom = client.CustomObjectsApi(api)

        def create(i: int) -> tuple[str, float]:
            name = f"bench-{i:04d}"
            custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, ftj(name))
            return name, time.monotonic()

        t0 = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            created = dict(pool.map(create, range(n)))
        r.create_s = time.monotonic() - t0
        log(f"N={n}: {n} FineTuneJobs created in {r.create_s:.1f}s ({n / r.create_s:.0f}/s)")

        deadline, last = time.monotonic() + args.timeout, 0.0
        while (have := sum(name in watcher.seen for name in created)) < n and time.monotonic() < deadline:
            operator.check()
            if time.monotonic() - last > 10:
                log(f"N={n}: {have}/{n} have their validation Job")
                last = time.monotonic()
            time.sleep(0.2)
        r.with_job = have
        lat = [watcher.seen[k] - v for k, v in created.items() if k in watcher.seen]
        if len(lat) > 1:
            r.p50, r.p99 = statistics.median(lat), statistics.quantiles(lat, n=100, method="inclusive")[98]
        if have == n:
            r.all_s = max(watcher.seen[k] for k in created) - t0
            log(f"N={n}: all have their validation Job {r.all_s:.1f}s after the first create; "
                f"latency p50 {r.p50:.2f}s p99 {r.p99:.2f}s")
        else:
            log(f"N={n}: only {have}/{n} have their validation Job after {args.timeout:.0f}s; measuring anyway")
        ramp_end = audit_end(audit)
        r.ramp = read_audit(audit, 0, ramp_end)

        log(f"N={n}: settling {args.settle:.0f}s, then a {args.window:.0f}s window")
        time.sleep(args.settle)
        operator.check()
        a0, c0, w0 = audit_end(audit), operator.cpu_seconds(), time.monotonic()
        time.sleep(args.window)
        operator.check()
        a1, c1, r.window_s = audit_end(audit), operator.cpu_seconds(), time.monotonic() - w0
        r.rss_peak, r.rss_end = operator.memory_mib("VmHWM"), operator.memory_mib("VmRSS")
        r.cpu_pct = 100 * (c1 - c0) / r.window_s
        r.steady = read_audit(audit, a0, a1)
        log(f"N={n}: CPU {r.cpu_pct:.1f}% RSS peak {r.rss_peak:.0f} MiB end {r.rss_end:.0f} MiB; "
            f"{r.req_s:.1f} req/s = {r.req_s_per_job:.3f}/job; watch starts {sum(r.steady.watches.values())}")
        return r, cp.version
    finally:
        if watcher:
            watcher.stopping.set()
        if operator:
            operator.stop()
        cp.stop()
        log(f"N={n}: stopped ({time.monotonic() - t:.0f}s for this size)")


# -- the report ---------------------------------------------------------------------------------------------


def fmt_s(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def report(results: list[Result], version: dict, args: argparse.Namespace) -> str:
    src = f"`{args.operator_src}`" if args.operator_src else "this checkout"
    out = [f"Kubernetes {version.get('gitVersion')}, kopf {kopf.__version__}, "
           f"kubernetes client {kubernetes.__version__}, Python {platform.python_version()}; "
           f"operator from {src}; window {args.window:.0f}s after a {args.settle:.0f}s settle.", "",
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
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", default="100,400,1000", help="comma-separated numbers of FineTuneJobs")
    p.add_argument("--window", type=float, default=60, help="steady-state window, seconds")
    p.add_argument("--settle", type=float, default=15, help="wait after all have their Job, seconds")
    p.add_argument("--timeout", type=float, default=240,
                   help="most seconds to wait for all validation Jobs (then measure anyway)")
    p.add_argument("--clients", type=int, default=8, help="threads creating FineTuneJobs")
    p.add_argument("--operator-src", type=lambda s: Path(s).resolve(), default=None,
                   help="run the operator from this checkout (DIR/operator, DIR/trainer-image)")
    args = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    start, results, version = time.monotonic(), [], {}
    for n in (int(x) for x in args.jobs.split(",")):
        result, version = run_size(n, args)
        results.append(result)
    log(f"done in {(time.monotonic() - start) / 60:.1f} min; operator logs in {WORK}")
    print("\n" + report(results, version, args))


if __name__ == "__main__":
    main()
