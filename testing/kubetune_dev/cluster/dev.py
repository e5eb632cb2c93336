"""The dev cluster (`make dev-cluster`: `python -m kubetune_dev.cluster up --dev`): the local cluster plus what a
FineTuneJob needs, so that `kubectl apply -f examples/demo-finetunejob.yaml` trains on this machine's CPU.

The cluster daemon runs `DevCluster.start()` once the control plane and the node agent are up: it installs the
FineTuneJob and FineTuneSweep CRDs, starts an S3 server in the cluster as the Service minio.minio:9000
(hack/dev-cluster-s3.yaml, the endpoint the examples name), creates the `s3-credentials` Secret in `default`,
uploads the demo's tiny base model and support-bot data to the URIs the example names, and starts the operator as a
child process. With `--kueue` (`make dev-cluster KUEUE=1`) it first starts the real Kueue (kueue.py) with a
ResourceFlavor, a ClusterQueue holding the node's GPUs (and this machine's CPUs and memory) and the LocalQueue
`user-queue` in `default`. All of it stops with the daemon (`make dev-cluster-down`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from kubetune_dev.demo_data import DEMO_PRETRAIN_STEPS, DEMO_TRAIN_RECORDS
from kubetune_dev.s3server import FAKE_CREDENTIALS

from .controlplane import REPO_ROOT, ControlPlaneError, _die_with_parent, free_port
from .kueue import Kueue, kubectl, wait_established

EXAMPLE = REPO_ROOT / "examples" / "demo-finetunejob.yaml"
S3_MANIFEST = REPO_ROOT / "hack" / "dev-cluster-s3.yaml"
CRD = REPO_ROOT / "crds" / "kubetune.io_finetunejobs.yaml"
SWEEP_CRD = REPO_ROOT / "crds" / "kubetune.io_finetunesweeps.yaml"
SECRET = "s3-credentials"
EXAMPLE_ENDPOINT = "http://minio.minio:9000"  # the in-cluster S3 server's Service, as the examples name it
CLUSTER_QUEUE, LOCAL_QUEUE = "cluster-queue", "user-queue"
GPU = "nvidia.com/gpu"


def wait_for(what: str, predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise ControlPlaneError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)
    return value


def answers(url: str) -> bool:
    """Does an HTTP server answer at url (any status)?"""
    try:
        urllib.request.urlopen(url, timeout=3).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def example_spec() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())["spec"]


@dataclass(frozen=True)
class DemoSize:
    """How much the seeded demo is: its base model's pre-training steps and its training split's records (by
    default as `make demo`). Tests make it smaller; the example's FineTuneJob stays as printed."""

    pretrain_steps: int = DEMO_PRETRAIN_STEPS
    train_records: int = DEMO_TRAIN_RECORDS


def seed(endpoint: str, work: Path, size: DemoSize) -> None:
    """Upload the demo's tiny base model and support-bot splits to the URIs the example names (creating its
    buckets). The server takes any credentials; this process (the daemon) uses the placeholder ones."""
    from kubetune_api import StorageEndpoint
    from kubetune_trainer.storage import Storage

    from kubetune_dev.demo_data import demo_base_texts, write_support_dataset
    from kubetune_dev.tiny import make_tiny_base

    os.environ.update(FAKE_CREDENTIALS)
    spec, storage = example_spec(), Storage(StorageEndpoint(endpoint=endpoint))
    splits = write_support_dataset(work / "data", train=size.train_records)
    uris = [spec["baseModel"]["uri"], spec["output"]["uri"], *(spec["dataset"][s] for s in splits)]
    for bucket in sorted({uri.removeprefix("s3://").split("/")[0] for uri in uris}):
        storage.client.create_bucket(Bucket=bucket)
    print(f"building the demo base model ({size.pretrain_steps} pre-training steps)", flush=True)
    base = make_tiny_base(work / "base", demo_base_texts(), pretrain_steps=size.pretrain_steps, log=print)
    storage.upload_dir(base, spec["baseModel"]["uri"])
    for split, path in splits.items():
        storage.upload_file(path, spec["dataset"][split])


class DevCluster:
    """The extras on a running cluster; `start()` returns what `instructions()` prints, `stop()` undoes it."""

    def __init__(self, state_dir: Path, kubeconfig: Path, kueue_gpus: int | None = None):
        """`kueue_gpus`: also run Kueue, with a ClusterQueue holding that many GPUs (None: no Kueue)."""
        self.state_dir, self.kubeconfig, self.kueue_gpus = state_dir, kubeconfig, kueue_gpus
        self.operator: subprocess.Popen | None = None
        self.kueue: Kueue | None = None

    def kubectl(self, *args: str) -> str:
        return kubectl(self.kubeconfig, *args)

    def start(self, size: DemoSize) -> dict:
        for path in (CRD, SWEEP_CRD):
            self.kubectl("apply", "--server-side", "-f", str(path))
        wait_established(self.kubeconfig, ["finetunejobs.kubetune.io", "finetunesweeps.kubetune.io"])
        endpoint = self.start_s3()
        keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        self.kubectl("create", "secret", "generic", SECRET, "-n", "default",
                     *(f"--from-literal={k}={FAKE_CREDENTIALS[k]}" for k in keys))
        seed(endpoint, self.state_dir / "seed", size)
        state = {"s3": endpoint, "example": str(EXAMPLE)}
        if self.kueue_gpus is not None:
            state["kueue"] = self.start_kueue(self.kueue_gpus)
        log = self.state_dir / "operator.log"
        self.start_operator(log)
        return {**state, "operatorPid": self.operator.pid, "operatorLog": str(log)}

    def start_kueue(self, gpus: int) -> dict:
        """Kueue, and a ClusterQueue with the node's GPUs and this machine's CPUs and memory (what a training pod
        may request) for every namespace, with the LocalQueue LOCAL_QUEUE in `default`."""
        self.kueue = Kueue(self.kubeconfig, self.state_dir / "kueue").start()
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**30
        quota = {"cpu": os.cpu_count() or 1, "memory": f"{memory}Gi", GPU: gpus}
        self.kueue.cluster_queue(CLUSTER_QUEUE, quota)
        self.kueue.local_queue("default", LOCAL_QUEUE, CLUSTER_QUEUE)
        return {"version": self.kueue.version, "clusterQueue": CLUSTER_QUEUE, "localQueue": LOCAL_QUEUE,
                "quota": {k: str(v) for k, v in quota.items()}, "log": str(self.kueue.log)}

    def start_s3(self) -> str:
        """The in-cluster S3 server; returns its endpoint as this machine reaches it (the pod's IP)."""
        self.kubectl("apply", "-f", str(S3_MANIFEST))
        self.kubectl("wait", "--for=condition=Ready", "pod/s3", "-n", "minio", "--timeout=120s")
        endpoint = f"http://{self.kubectl('get', 'pod', 's3', '-n', 'minio', '-o', 'jsonpath={.status.podIP}')}:9000"
        wait_for(f"the S3 server at {endpoint}", lambda: answers(endpoint), timeout=60)
        return endpoint

    def start_operator(self, log: Path) -> None:
        health = free_port()
        # The Secret and endpoint the examples name are the platform's defaults (the chart's storage.*), for jobs
        # in any namespace: without the admission policy, the operator lets a job name no other Secret.
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "KUBETUNE_HEALTH_PORT": str(health),
               "KUBETUNE_METRICS_PORT": str(free_port()), "KUBETUNE_STORAGE_SECRET_NAME": SECRET,
               "KUBETUNE_STORAGE_ENDPOINT": EXAMPLE_ENDPOINT, "KUBETUNE_POLICY_CREDENTIALS_NAMESPACES": "*"}
        with log.open("ab") as out:
            self.operator = subprocess.Popen(
                [sys.executable, "-m", "kubetune_operator", "--all-namespaces"], env=env, cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        wait_for("the operator's /healthz", lambda: self.operator.poll() is not None or
                 answers(f"http://127.0.0.1:{health}/healthz"), timeout=60)
        if self.operator.poll() is not None:
            raise ControlPlaneError(f"the operator exited with code {self.operator.returncode}; see {log}")

    def stop(self) -> None:
        if self.operator and self.operator.poll() is None:
            self.operator.terminate()
            try:
                self.operator.wait(20)
            except subprocess.TimeoutExpired:
                self.operator.kill()
                self.operator.wait()
        if self.kueue:
            self.kueue.stop()


def instructions(state: dict) -> str:
    """What `make dev-cluster` prints: what to type next."""
    dev, job = state["dev"], yaml.safe_load(EXAMPLE.read_text())
    name, output = job["metadata"]["name"], job["spec"]["output"]["uri"]
    return (f"# Kubetune dev cluster: Kubernetes {state['version']}, node {state['node']}, the operator "
            f"(log {dev['operatorLog']}),\n# S3 at minio.minio:9000 in the cluster, {dev['s3']} from here "
            f"(any credentials), seeded with the demo model and data.\n"
            f"export KUBECONFIG={state['kubeconfig']}\n"
            f"kubectl apply -f {os.path.relpath(dev['example'])}\n"
            f"kubectl get ftj -w\n"
            f"# The adapter lands in {output} (manifest.json last); once Succeeded:\n"
            f"#   kubectl get ftj {name} -o jsonpath='{{.status.result}}'\n"
            f"{_kueue_lines(dev.get('kueue'))}"
            f"# Stop everything: make dev-cluster-down")


def _kueue_lines(kueue: dict | None) -> str:
    if not kueue:
        return ""
    quota = ", ".join(f"{v} {k}" for k, v in kueue["quota"].items())
    return (f"# Kueue {kueue['version']} (log {kueue['log']}): LocalQueue {kueue['localQueue']} in default, "
            f"ClusterQueue {kueue['clusterQueue']} ({quota});\n"
            f"#   queue a job with spec.scheduling.queueName: {kueue['localQueue']}; kubectl get workloads\n")
