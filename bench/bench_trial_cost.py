"""A FineTuneSweep trial's fixed cost on the local control plane, end to end (issue 30, section 5): from the trial's
creation to its first step, and from its last step to its published result (the FineTuneJob's Succeeded), with
the metrics linger the image sets (30 s) and with the one the operator now sets when the chart's PodMonitor is off
(0). Markdown for BENCHMARKS.md on stdout, progress on stderr.

    .venv/bin/python bench/bench_trial_cost.py [--trials 4] [--steps 30] [--modes image,podmonitor-off]

One fresh control plane, the process node agent, the embedded S3 server on loopback and the operator as
`python -m kubetune_operator --all-namespaces` (the code's defaults for every KUBETUNE_* setting but its ports, the
platform's storage credentials and, per mode, KUBETUNE_TRAINER_METRICS_LINGER_SECONDS). The trainer image is this
checkout's `kubetune launch` with the image's environment (PYTHONUNBUFFERED, and KUBETUNE_METRICS_LINGER_SECONDS
as trainer-image/Dockerfile sets it). Nothing scrapes the pods but the operator, as on a cluster without
Prometheus. The modes, each a sweep of --trials trials (random search, no pruning, one trial at a time, a tiny Llama,
--steps LoRA steps, validation every 10) in its own namespace, one after the other:

- `image`: the operator leaves the linger to the image (30 s): what every job did before, and what a chart with
  podMonitor.enabled=true does;
- `podmonitor-off`: the operator sets 0, as the chart does with podMonitor.enabled=false (the default).

Each mode's first trial tokenizes the data into the sweep's cache; the others reuse it (the issue's goal: under
10 s of fixed cost for those). Times are this process's clock when it saw each thing: watches on FineTuneJobs,
Jobs and Pods (the API's own timestamps have whole seconds only), and the trainer's JSON log lines as the node
agent writes them (polled every 0.1 s; PYTHONUNBUFFERED), so each is late by up to a watch's delivery or 0.1 s.
Everything started is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "ghcr.io/kubetune/trainer:bench"
CRDS = [ROOT / "crds" / "kubetune.io_finetunejobs.yaml", ROOT / "crds" / "kubetune.io_finetunesweeps.yaml"]
MODES = {"image": None, "podmonitor-off": "0"}  # mode -> the operator's KUBETUNE_TRAINER_METRICS_LINGER_SECONDS
LINGER = "KUBETUNE_METRICS_LINGER_SECONDS"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def image_linger() -> str:
    """The linger trainer-image/Dockerfile sets (the image's environment)."""
    found = re.search(rf"^ENV {LINGER}=(\S+)", (ROOT / "trainer-image" / "Dockerfile").read_text(), re.MULTILINE)
    return found.group(1) if found else "0"


class Seen:
    """When this process first saw each thing: (namespace, name, what) -> time.time()."""

    def __init__(self):
        self.at: dict[tuple[str, str, str], float] = {}
        self.lock = threading.Lock()

    def note(self, ns: str, name: str, what: str, when: float | None = None) -> None:
        with self.lock:
            self.at.setdefault((ns, name, what), when or time.time())

    def get(self, ns: str, name: str, what: str) -> float | None:
        return self.at.get((ns, name, what))


def watch_all(api, seen: Seen, stop: threading.Event) -> list[threading.Thread]:
    """Watches on FineTuneJobs, Jobs and Pods in every namespace, noting when each reached what."""
    from kubernetes import client, watch

    def ftj(obj: dict) -> list[str]:
        status = obj.get("status") or {}
        return ["added", *([f"phase:{status['phase']}"] if status.get("phase") else []),
                *(["dataset"] if status.get("dataset") else [])]

    def job(obj) -> list[str]:
        return ["added", *(["complete"] if obj.status and obj.status.succeeded else [])]

    def pod(obj) -> list[str]:
        return ["added", f"phase:{obj.status.phase}"] if obj.status and obj.status.phase else ["added"]

    def custom_lister(plural: str):
        return lambda **kw: custom.list_cluster_custom_object("kubetune.io", "v1alpha1", plural, **kw)

    custom, batch, core = client.CustomObjectsApi(api), client.BatchV1Api(api), client.CoreV1Api(api)
    streams = [
        (custom_lister("finetunejobs"), ftj, True),
        (custom_lister("finetunesweeps"), ftj, True),  # "sweep:" below
        (batch.list_job_for_all_namespaces, job, False),
        (core.list_pod_for_all_namespaces, pod, False),
    ]

    def run(lister, whats, is_dict):
        while not stop.is_set():
            try:
                for event in watch.Watch().stream(lister, timeout_seconds=5):
                    obj = event["object"]
                    meta = obj["metadata"] if is_dict else obj.metadata
                    ns, name = (meta["namespace"], meta["name"]) if is_dict else (meta.namespace, meta.name)
                    if is_dict and obj["kind"] == "FineTuneSweep":
                        name = f"sweep:{name}"
                    for what in whats(obj):
                        seen.note(ns, name, what)
                    if stop.is_set():
                        return
            except Exception as e:  # noqa: BLE001 (a dropped watch: start another)
                log(f"watch restarted: {e}")

    threads = [threading.Thread(target=run, args=s, daemon=True) for s in streams]
    for t in threads:
        t.start()
    return threads


def tail_logs(folder: Path, seen: Seen, stop: threading.Event) -> threading.Thread:
    """Every 0.1 s: the new lines of every container log under folder/<ns>/<pod>/; a trainer JSON event is noted
    as (ns, pod, "event:<name>") (its first) and (ns, pod, "last:<name>") (its latest), a line of any kind as
    "line" (the first)."""
    offsets: dict[Path, int] = {}

    def run():
        while not stop.is_set():
            for path in folder.glob("*/*/*.log"):
                ns, pod = path.parent.parent.name, path.parent.name
                with path.open("rb") as f:
                    f.seek(offsets.get(path, 0))
                    data = f.read()
                end = data.rfind(b"\n") + 1  # whole lines only
                offsets[path] = offsets.get(path, 0) + end
                now = time.time()
                for line in data[:end].decode(errors="replace").splitlines():
                    seen.note(ns, pod, "line", now)
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(event, dict) and "event" in event:
                        name = event["event"] + (f":{event['phase']}" if event["event"] == "phase" else "")
                        seen.note(ns, pod, f"event:{name}", now)
                        with seen.lock:
                            seen.at[(ns, pod, f"last:{name}")] = now
            time.sleep(0.1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def start_operator(cp, s3_endpoint: str, linger: str | None, log_path: Path) -> subprocess.Popen:
    from kubetune_dev.cluster.controlplane import free_port

    ready = free_port()
    env = {**cp.env(), "KUBETUNE_TRAINER_IMAGE": IMAGE, "KUBETUNE_HEALTH_PORT": str(free_port()),
           "KUBETUNE_METRICS_PORT": str(free_port()), "KUBETUNE_READY_PORT": str(ready),
           # the pods share the host's ports: not torch's 29500 nor 9400, which another cluster may use
           "KUBETUNE_RENDEZVOUS_PORT": str(free_port()), "KUBETUNE_TRAINER_METRICS_PORT": str(free_port()),
           "KUBETUNE_STORAGE_SECRET_NAME": "s3-credentials", "KUBETUNE_STORAGE_ENDPOINT": s3_endpoint,
           "KUBETUNE_POLICY_CREDENTIALS_NAMESPACES": "*"}
    env.pop("KUBETUNE_TRAINER_METRICS_LINGER_SECONDS", None)
    if linger is not None:
        env["KUBETUNE_TRAINER_METRICS_LINGER_SECONDS"] = linger
    with log_path.open("a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kubetune_operator", "--all-namespaces"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 90  # the Lease: the previous mode's operator may have left it held
    while time.monotonic() < deadline and proc.poll() is None:
        try:  # 200 once it holds the Lease and serves
            urllib.request.urlopen(f"http://127.0.0.1:{ready}/readyz", timeout=2).close()
            return proc
        except OSError:
            time.sleep(0.3)
    stop_process(proc)
    raise RuntimeError(f"the operator did not become active: {log_path.read_text()[-3000:]}")


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def sweep_doc(name: str, output: str, task: dict, trials: int, steps: int) -> dict:
    d = task["data"]
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep", "metadata": {"name": name}, "spec": {
        "template": {
            "baseModel": {"uri": task["model"]}, "image": IMAGE,
            "dataset": {"train": f"{d}train.jsonl", "validation": f"{d}validation.jsonl"},
            "hyperparameters": {"maxSteps": steps, "batchSize": 2, "maxSeqLength": 128, "loggingSteps": 1},
            "evaluation": {"everySteps": 10, "baseline": False},
            "resources": {"workers": 1, "gpusPerWorker": 0}},
        "parameters": [{"path": "hyperparameters.learningRate", "min": 1e-4, "max": 1e-2, "log": True}],
        "algorithm": "random", "earlyStopping": "none", "seed": 0, "maxTrials": trials, "parallelTrials": 1,
        "promote": "none", "output": {"uri": output}}}


# The columns: (header, from, to); each a (name suffix, what) of Seen, relative to the trial's FineTuneJob.
# "" is the FineTuneJob itself, "-validate" its validation Job, "vpod"/"tpod" the validation and training pods.
SPANS = [
    ("create -> validation pod running", ("", "added"), ("vpod", "phase:Running")),
    ("validation pod", ("vpod", "phase:Running"), ("vpod", "phase:Succeeded")),
    ("-> training Job", ("vpod", "phase:Succeeded"), ("tjob", "added")),
    ("-> training pod running", ("tjob", "added"), ("tpod", "phase:Running")),
    ("-> first line (accelerate's imports)", ("tpod", "phase:Running"), ("tpod", "line")),
    ("-> first event (the trainer's imports)", ("tpod", "line"), ("tpod", "event:metrics")),
    ("-> training (download, data cache)", ("tpod", "event:metrics"), ("tpod", "event:phase:training")),
    ("-> first step (model, set-up)", ("tpod", "event:phase:training"), ("tpod", "event:train")),
    ("last step -> uploading (last evaluation)", ("tpod", "last:train"), ("tpod", "event:phase:uploading")),
    ("-> published (save, record, upload)", ("tpod", "event:phase:uploading"), ("tpod", "event:published")),
    ("published -> pod ended (linger, exit)", ("tpod", "event:published"), ("tpod", "phase:Succeeded")),
    ("-> Job complete", ("tpod", "phase:Succeeded"), ("tjob", "complete")),
    ("-> Succeeded", ("tjob", "complete"), ("", "phase:Succeeded")),
]
HEADLINE = [("create -> first step", ("", "added"), ("tpod", "event:train")),
            ("last step -> Succeeded", ("tpod", "last:train"), ("", "phase:Succeeded"))]


def trial_times(seen: Seen, ns: str, trial: str) -> dict[str, float | None]:
    pods = {name for (n, name, what) in list(seen.at) if n == ns and what == "added"}
    vpod = next((p for p in pods if p.startswith(f"{trial}-validate-")), None)
    tpod = next((p for p in pods if p.startswith(f"{trial}-train-1-")), None)
    names = {"": trial, "vpod": vpod, "tpod": tpod, "tjob": f"{trial}-train-1"}

    def at(ref):
        name = names[ref[0]]
        return seen.get(ns, name, ref[1]) if name else None

    return {header: span(at(start), at(end)) for header, start, end in HEADLINE + SPANS}


GAP = "previous trial's Succeeded -> created"  # the sweep's reaction; the first trial: from the sweep's creation


def span(start: float | None, end: float | None) -> float | None:
    return end - start if start is not None and end is not None else None


def gap(seen: Seen, ns: str, previous: str | None, trial: str) -> float | None:
    start = seen.get(ns, previous, "phase:Succeeded") if previous else seen.get(ns, "sweep:trials", "added")
    return span(start, seen.get(ns, trial, "added"))


def mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(argv)
    modes = args.modes.split(",")

    from kubernetes import client
    from kubetune_api import StorageEndpoint
    from kubetune_dev.cluster.agent import NodeAgent
    from kubetune_dev.cluster.agent_pod import ImageRule
    from kubetune_dev.cluster.controlplane import ControlPlane
    from kubetune_dev.cluster.kueue import kubectl, wait_established
    from kubetune_dev.demo_data import generic_texts, write_support_dataset
    from kubetune_dev.s3server import FAKE_CREDENTIALS, S3Server
    from kubetune_dev.tiny import make_tiny_base
    from kubetune_trainer.storage import Storage

    os.environ.update(FAKE_CREDENTIALS)
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-trial-"))
    log(f"the operator's and the pods' logs: {work} (removed after a run that ends well)")
    venv_bin = Path(sys.executable).parent
    rule = ImageRule(match=IMAGE, path=[str(venv_bin)], working_dir=str(ROOT),
                     entrypoint=[str(venv_bin / "kubetune"), "launch"],
                     env={"PYTHONUNBUFFERED": "1", LINGER: image_linger(),
                          **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}})
    results: dict[str, list[tuple[str, dict]]] = {}
    sweeps: dict[str, float | None] = {}  # mode -> the sweep's creation to its end
    seen, stop = Seen(), threading.Event()
    with ControlPlane() as cp, S3Server() as s3:
        agent = NodeAgent(str(cp.kubeconfig), capacity={"cpu": "8", "memory": "32Gi", "pods": "110"},
                          state_dir=str(work / "node-agent"), backoff_s=1.0)
        agent.image_rules.insert(0, rule)
        agent.start(timeout=120)
        try:
            for crd in CRDS:
                kubectl(cp.kubeconfig, "apply", "--server-side", "-f", str(crd))
            wait_established(cp.kubeconfig, ["finetunejobs.kubetune.io", "finetunesweeps.kubetune.io"])
            storage = Storage(StorageEndpoint(endpoint=s3.endpoint))
            s3.create_bucket("bench")
            base = make_tiny_base(work / "tiny", generic_texts(50), vocab_size=512, hidden_size=32, layers=1,
                                  heads=2)
            storage.upload_dir(base, "s3://bench/model/")
            for split, path in write_support_dataset(work / "data", train=48, validation=8, test=1).items():
                if split != "test":
                    storage.upload_file(path, f"s3://bench/data/{split}.jsonl")
            task = {"model": "s3://bench/model/", "data": "s3://bench/data/", "output": "s3://bench/out/"}
            api = cp.api_client()
            watch_all(api, seen, stop)
            tail_logs(agent.state_dir / "logs", seen, stop)
            for mode in modes:
                ns = f"bench-{mode}"
                kubectl(cp.kubeconfig, "create", "namespace", ns)
                kubectl(cp.kubeconfig, "create", "secret", "generic", "s3-credentials", "-n", ns,
                        *(f"--from-literal={k}={v}" for k, v in FAKE_CREDENTIALS.items() if k.startswith("AWS_")))
                operator = start_operator(cp, s3.endpoint, MODES[mode], work / f"operator-{mode}.log")
                try:
                    log(f"{mode}: a sweep of {args.trials} trials")
                    kubectl(cp.kubeconfig, "apply", "-n", ns, "-f", "-",
                            stdin=json.dumps(sweep_doc("trials", f"{task['output']}{mode}/", task, args.trials,
                                                      args.steps)))
                    deadline = time.monotonic() + 300 + 120 * args.trials
                    while True:
                        status = client.CustomObjectsApi(api).get_namespaced_custom_object(
                            "kubetune.io", "v1alpha1", ns, "finetunesweeps", "trials").get("status") or {}
                        if status.get("phase") in ("Succeeded", "Failed"):
                            break
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{mode}: the sweep did not end: {status}")
                        time.sleep(1)
                    log(f"{mode}: the sweep {status['phase']}")
                    time.sleep(1)  # the last watch events
                    names = [t["name"] for t in status["trials"]]
                    results[mode] = [(name, {GAP: gap(seen, ns, names[i - 1] if i else None, name),
                                             **trial_times(seen, ns, name)}) for i, name in enumerate(names)]
                    sweeps[mode] = span(seen.get(ns, "sweep:trials", "added"),
                                        seen.get(ns, "sweep:trials", f"phase:{status['phase']}"))
                finally:
                    stop_process(operator)
        finally:
            stop.set()
            agent.stop()
    print(report(results, sweeps, environment(args, cp.version)))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def environment(args, version: dict) -> str:
    import torch
    import transformers

    return (f"`python bench/bench_trial_cost.py --trials {args.trials} --steps {args.steps}`: "
            f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch "
            f"{torch.__version__}, transformers {transformers.__version__}, Kubernetes "
            f"{version.get('gitVersion', '?')}; seconds, one run. The first trial of each mode builds the data "
            "cache; the others reuse it.")


def report(results: dict[str, list[tuple[str, dict]]], sweeps: dict[str, float | None], header: str) -> str:
    """The table (a row per trial, and per mode the mean of the trials that reuse the cache) and the summary: each
    mode's fixed cost and whole sweep, and podmonitor-off's over image's."""
    lines = [header, ""]
    headers = [h for h, _, _ in HEADLINE] + [GAP] + [h for h, _, _ in SPANS]
    lines += ["| mode | trial | " + " | ".join(headers) + " |", "|---|---|" + "---:|" * len(headers)]
    means = {}  # mode -> each column's mean over the trials that reuse the cache
    for mode, trials in results.items():
        for name, times in trials:
            lines.append(f"| {mode} | {name} | " + " | ".join(fmt(times[h]) for h in headers) + " |")
        reused = [t for _, t in trials[1:]]
        if reused:
            means[mode] = {h: mean([t[h] for t in reused]) for h in headers}
            lines.append(f"| {mode} | mean, cache reused | " + " | ".join(fmt(means[mode][h]) for h in headers)
                         + " |")
    lines.append("")
    fixed = {mode: sum(m[h] or 0 for h, _, _ in HEADLINE) for mode, m in means.items()}
    for mode, m in means.items():
        lines.append(f"- {mode}: a trial that reuses the cache, mean: create -> first step "
                     f"{fmt(m[HEADLINE[0][0]])} s, last step -> Succeeded {fmt(m[HEADLINE[1][0]])} s: fixed cost "
                     f"{fixed[mode]:.1f} s; the whole sweep (created -> ended) {fmt(sweeps.get(mode))} s")
    if fixed.get("image") and "podmonitor-off" in fixed:
        lines.append(f"- podmonitor-off / image, fixed cost: {fixed['podmonitor-off'] / fixed['image']:.2f}; the "
                     f"whole sweep: {fmt_ratio(sweeps.get('podmonitor-off'), sweeps.get('image'))}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
