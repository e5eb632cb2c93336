"""The operator end to end: the real API server (CEL, defaults, status subresource), the process node agent,
the operator as `python -m kubetune_operator` and the trainer's `kubetune validate` in a pod.

Needs the control plane binaries (`make control-plane`). Training runs use tests/operator_tests/fake_trainer.py
as the image's entrypoint (see the `fake_trainer` fixture); the run with the real trainer goes next to them,
with a rule mapping the trainer image to `accelerate launch` (and `submit()`, `wait_phase()`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from kubetune_api import StorageEndpoint
from kubetune_dev.s3server import FAKE_CREDENTIALS
from kubetune_trainer import checkpoint
from kubetune_trainer.record.history import HISTORY, read_records
from kubetune_trainer.storage import Storage

from tests.datafixtures import tiny_tokenizer
from tests.kube import free_port, get_json, http_get, kubectl, stop_process, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "kubetune.io_finetunejobs.yaml"
INVALID = sorted((ROOT / "examples" / "invalid").glob("*.yaml"))
IMAGE = "ghcr.io/kubetune/trainer:e2e"  # the node agent runs every image from this repo's .venv


@pytest.fixture(scope="module")
def crd(control_plane):
    kubectl(control_plane, "apply", "--server-side", "-f", str(CRD))
    def established() -> bool:
        crd = get_json(control_plane, "crd", "finetunejobs.kubetune.io")
        return any(c["type"] == "Established" and c["status"] == "True"
                   for c in (crd.get("status") or {}).get("conditions") or [])  # null right after the apply

    wait_for("the CRD to be established", established, timeout=60)


class Operator:
    """`python -m kubetune_operator` as a subprocess; restart() kills it and starts a new one."""

    def __init__(self, env: dict, log: Path, scope: tuple[str, ...] = ("--all-namespaces",)):
        self.env, self.log, self.scope = env, log, scope
        self.health = f"http://127.0.0.1:{env['KUBETUNE_HEALTH_PORT']}/healthz"
        self.metrics = f"http://127.0.0.1:{env['KUBETUNE_METRICS_PORT']}/metrics"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("a") as out:
            cmd = [sys.executable, "-m", "kubetune_operator", *self.scope, "-v"]
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_for("the operator's liveness endpoint", lambda: self.proc.poll() is not None or
                 http_get(self.health)[0] == 200, timeout=60)
        assert self.proc.poll() is None, self.log.read_text()[-3000:]

    def stop(self, kill: bool = False) -> None:
        stop_process(self.proc, kill)

    def metrics_text(self) -> str:
        return http_get(self.metrics)[1]


def operator_env(cp, **extra: str) -> dict:
    """The test operator's environment: free ports, fast resyncs and scrapes, and `extra`."""
    return {**cp.env(), "KUBETUNE_HEALTH_PORT": str(free_port()),
            "KUBETUNE_METRICS_PORT": str(free_port()), "KUBETUNE_READY_PORT": str(free_port()),
            "KUBETUNE_RESYNC_SECONDS": "1", "KUBETUNE_SCRAPE_SECONDS": "1", "KUBETUNE_TRAINER_IMAGE": IMAGE,
            "KUBETUNE_RENDEZVOUS_PORT": str(free_port()),  # pods share the host's ports: not torch's default 29500
            "KUBETUNE_TRAINER_METRICS_PORT": str(free_port()),  # nor 9400: another worker's cluster may train too
            **extra}


def platform_credentials(endpoint: str) -> dict:
    """Operator settings that make the test jobs' Secret (s3-credentials, at the test S3 server) the platform's
    default credentials: an operator without the admission policy refuses any other Secret (policy.SECRET)."""
    return {"KUBETUNE_STORAGE_SECRET_NAME": "s3-credentials", "KUBETUNE_STORAGE_ENDPOINT": endpoint,
            "KUBETUNE_POLICY_CREDENTIALS_NAMESPACES": "*"}


def run_operator(tmp_path_factory, env: dict, scope: tuple[str, ...] = ("--all-namespaces",)):
    """For a fixture to `yield from`: an Operator with `env` (serving `scope`), started, then stopped and its log
    named."""
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = Operator(env, log, scope)
    op.start()
    try:
        yield op
    finally:
        op.stop()
        print(f"operator log: {log}")


@pytest.fixture(scope="module")
def author_policy(control_plane, crd):
    """The admission policy of crds/policy/admission-policy.yaml, bound to every namespace while the module runs,
    as the chart installs it: the test jobs name a Secret of their namespace (s3-credentials), which the operator
    allows only when the API server has checked that the job's author may read it (policy.SECRET). Yields the
    binding's name; once removed, waits until the API server no longer enforces it (the next module's jobs)."""
    name = f"kubetune-e2e-{uuid.uuid4().hex[:6]}"
    ns = f"kubetune-system-{uuid.uuid4().hex[:6]}"
    vap, binding, params = yaml.safe_load_all((ROOT / "crds" / "policy" / "admission-policy.yaml").read_text())
    params["metadata"]["namespace"] = binding["spec"]["paramRef"]["namespace"] = ns
    vap["metadata"]["name"] = binding["metadata"]["name"] = binding["spec"]["policyName"] = name
    kubectl(control_plane, "create", "namespace", ns)
    for doc in (vap, params, binding):
        kubectl(control_plane, "apply", "-f", "-", stdin=json.dumps(doc))

    def refused() -> bool:  # a job the policy refuses (its image), as the API server judges it now
        doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "probe"},
               "spec": {"baseModel": {"uri": "s3://m/"}, "dataset": {"train": "s3://d/t.jsonl"},
                        "output": {"uri": "s3://o/"}, "image": "docker.io/x/miner:1"}}
        return kubectl(control_plane, "create", "-n", ns, "--dry-run=server", "-f", "-", stdin=json.dumps(doc),
                       check=False).returncode != 0

    wait_for("the admission policy to be enforced", refused, timeout=60)
    time.sleep(1.1)  # jobs created from now on are newer than the binding (the API's times are in whole seconds)
    yield name
    for kind, doc in (("validatingadmissionpolicybinding", binding), ("validatingadmissionpolicy", vap)):
        kubectl(control_plane, "delete", kind, doc["metadata"]["name"])
    wait_for("the admission policy to be lifted", lambda: not refused(), timeout=60)
    kubectl(control_plane, "delete", "namespace", ns, "--wait=false")


@pytest.fixture(scope="module")
def operator(control_plane, crd, author_policy, tmp_path_factory):
    yield from run_operator(tmp_path_factory, operator_env(control_plane, KUBETUNE_POLICY_BINDING=author_policy))


def submit(cp, namespace: str, name: str, spec: dict) -> None:
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
           "spec": spec}
    kubectl(cp, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(doc))


def events_of(cp, namespace: str, name: str, expect: dict[str, int] | None = None, timeout: float = 60) -> list[dict]:
    """The Kubernetes Events about the object called `name`. With `expect` (reason -> at least how many), once they
    have all arrived: the operator posts its events after the status it writes (kopf, from a queue), so a test that
    has just seen a phase may look before they are there."""
    def read() -> list[dict]:
        return get_json(cp, "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")["items"]

    def arrived() -> list[dict] | None:
        items = read()
        reasons = [e["reason"] for e in items]
        return items if all(reasons.count(reason) >= n for reason, n in expect.items()) else None

    return wait_for(f"the events {expect} about {name}", arrived, timeout=timeout) if expect else read()


def wait_phase(cp, namespace: str, name: str, phases: tuple[str, ...], timeout: float = 240) -> dict:
    def reached():
        ftj = get_json(cp, "ftj", "-n", namespace, name)
        return ftj if ftj.get("status", {}).get("phase") in phases else None

    return wait_for(f"FineTuneJob {name} to reach {phases}", reached, timeout=timeout)


# -- the API: CRD schema and CEL -------------------------------------------------------------------------


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_manifests_are_refused_with_the_cel_message(control_plane, crd, namespace, path):
    expected = path.read_text().splitlines()[0].removeprefix("# Refused by the API server: ")
    out = kubectl(control_plane, "apply", "-n", namespace, "-f", str(path), check=False)
    assert out.returncode != 0, f"{path.name} was accepted"
    assert expected in out.stderr, out.stderr


def test_valid_example_is_accepted_and_defaulted(control_plane, crd, namespace):
    out = kubectl(control_plane, "apply", "-n", namespace, "--dry-run=server", "-o", "json",
                  "-f", str(ROOT / "examples" / "finetunejob.yaml"))
    spec = json.loads(out.stdout)["spec"]
    assert spec["hyperparameters"]["scheduler"] == "cosine" and spec["hyperparameters"]["epochs"] == 3
    assert spec["runPolicy"]["suspend"] is False and spec["scheduling"] == {}
    assert spec["resources"]["gpuResourceName"] == "nvidia.com/gpu"
    assert spec["method"]["lora"]["targetModules"] == ["all-linear"]


def test_printer_columns(control_plane, crd, namespace):
    doc = yaml.safe_load((ROOT / "examples" / "finetunejob.yaml").read_text())
    kubectl(control_plane, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(doc))
    header = kubectl(control_plane, "get", "ftj", "-n", namespace).stdout.splitlines()[0].split()
    assert header[:5] == ["NAME", "PHASE", "PROGRESS", "LOSS", "EVAL"]


# -- the operator -----------------------------------------------------------------------------------------


@pytest.fixture
def s3_inputs(s3_server, bucket, tmp_path):
    """A tokenizer-only base model (validation loads no weights) and a training split with a bad line 2."""
    storage = Storage(StorageEndpoint(endpoint=s3_server.endpoint))
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    storage.upload_dir(tmp_path / "model", f"s3://{bucket}/model/")
    bad, good = tmp_path / "bad.jsonl", tmp_path / "good.jsonl"
    bad.write_text('{"text": "a fine record"}\nthis is not json\n')
    good.write_text("".join(json.dumps({"text": f"record number {i} is fine"}) + "\n" for i in range(8)))
    storage.upload_file(bad, f"s3://{bucket}/data/bad.jsonl")
    storage.upload_file(good, f"s3://{bucket}/data/good.jsonl")
    return {"model": f"s3://{bucket}/model/", "bad": f"s3://{bucket}/data/bad.jsonl",
            "good": f"s3://{bucket}/data/good.jsonl", "output": f"s3://{bucket}/out/",
            "endpoint": s3_server.endpoint}


def credentials(cp, namespace: str) -> None:
    literals = [f"--from-literal={k}={v}" for k, v in FAKE_CREDENTIALS.items() if k.startswith("AWS_")]
    kubectl(cp, "create", "secret", "generic", "s3-credentials", "-n", namespace, *literals)


def test_bad_dataset_fails_on_cpu_without_a_gpu_job(control_plane, node_agent, namespace, operator,
                                                    s3_inputs):
    credentials(control_plane, namespace)
    submit(control_plane, namespace, "bad-data", {
        "baseModel": {"uri": s3_inputs["model"]}, "dataset": {"train": s3_inputs["bad"]},
        "output": {"uri": s3_inputs["output"]}, "hyperparameters": {"maxSteps": 4},
        "storage": {"endpoint": s3_inputs["endpoint"], "secretRef": {"name": "s3-credentials"}},
        "resources": {"workers": 1, "gpusPerWorker": 1},
    })
    ftj = wait_phase(control_plane, namespace, "bad-data", ("Failed", "Succeeded", "Running"))
    status = ftj["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "DatasetInvalid"), status
    assert "bad.jsonl:2" in status["message"] and "invalid JSON" in status["message"]
    validated = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "DatasetInvalid")
    assert status["observedGeneration"] == ftj["metadata"]["generation"]

    def jobs() -> list[str]:
        return [j["metadata"]["name"] for j in get_json(control_plane, "jobs", "-n", namespace)["items"]]

    assert "bad-data-train-1" not in jobs(), "no training Job (no GPU) for invalid data"
    # the validation Job is deleted once its result is in the status; and no training Job comes later
    wait_for("the validation Job to be cleaned up", lambda: jobs() == [], timeout=30)
    time.sleep(3)
    assert jobs() == []

    assert any(e["reason"] == "DatasetInvalid" and e["type"] == "Warning"
               for e in events_of(control_plane, namespace, "bad-data", {"DatasetInvalid": 1}))
    cm = get_json(control_plane, "configmap", "-n", namespace, "bad-data-config")
    assert FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in json.dumps(cm)
    assert FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in json.dumps(ftj)
    assert 'kubetune_operator_finetunejob_failures_total{reason="DatasetInvalid"} 1.0' in operator.metrics_text()


def _planted(s3_inputs: dict, tmp_path) -> dict:
    """s3_inputs with a train split holding 3 repeats and an e-mail address, and a test split of which 2 records are
    train records: the data-quality checks' findings."""
    storage = Storage(StorageEndpoint(endpoint=s3_inputs["endpoint"]))
    records = [{"text": f"record number {i} says something of its own"} for i in range(12)]
    train = records[:10] + records[:3] + [{"text": "write to jane.doe@example.com for help"}]
    test = records[10:] + records[4:6]
    uris = {split: s3_inputs["output"].replace("/out/", f"/quality/{split}.jsonl") for split in ("train", "test")}
    for split, rows in (("train", train), ("test", test)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        storage.upload_file(tmp_path / f"{split}.jsonl", uris[split])
    return uris


def test_data_quality_findings_are_in_the_status_an_event_and_a_gauge(control_plane, node_agent, namespace,
                                                                      operator, s3_inputs, fake_trainer, tmp_path):
    """The validation Job's quality checks: the repeats and the train copies of test records dropped before any
    GPU pod starts, counts in status.dataset.quality, a DataQuality Warning, the gauge; never the address."""
    credentials(control_plane, namespace)
    spec = training_spec(s3_inputs, fake_trainer, hyperparameters={"maxSteps": 2})
    spec["dataset"] = _planted(s3_inputs, tmp_path)
    submit(control_plane, namespace, "noisy", spec)
    ftj = wait_for("the validation's report", lambda: (get_json(control_plane, "ftj", "-n", namespace, "noisy")
                                                       .get("status", {}).get("dataset") or {}).get("quality")
                   and get_json(control_plane, "ftj", "-n", namespace, "noisy"), timeout=180)
    quality = ftj["status"]["dataset"]["quality"]
    assert quality["duplicates"] == {"train": 3, "test": 0}, quality
    assert quality["leakage"] == {"test": {"exact": 2, "near": 0}}, quality
    assert quality["pii"]["train"]["email"] == 1 and quality["dropped"] == {"train": 5}, quality
    assert ftj["status"]["dataset"]["samples"] == 9  # 14 less 3 repeats and the 2 the test split holds
    validated = next(c for c in ftj["status"]["conditions"] if c["type"] == "Validated")
    assert "data quality: train:" in validated["message"], validated
    warning = wait_for("the DataQuality event", lambda: next(
        (e for e in events_of(control_plane, namespace, "noisy") if e["reason"] == "DataQuality"), None), timeout=30)
    assert warning["type"] == "Warning" and "records also in train" in warning["message"], warning
    assert "jane.doe" not in json.dumps(ftj) + json.dumps(events_of(control_plane, namespace, "noisy"))
    assert "kubetune_operator_finetunejob_data_quality_findings" in operator.metrics_text()


def test_a_fail_policy_ends_the_job_before_any_training_pod(control_plane, node_agent, namespace, operator,
                                                             s3_inputs, fake_trainer, tmp_path):
    """dataset.quality.leakage: fail refuses the data on CPU, naming the test lines the train split holds."""
    credentials(control_plane, namespace)
    spec = training_spec(s3_inputs, fake_trainer, hyperparameters={"maxSteps": 2})
    spec["dataset"] = {**_planted(s3_inputs, tmp_path), "quality": {"leakage": "fail"}}
    submit(control_plane, namespace, "leaky", spec)
    status = wait_phase(control_plane, namespace, "leaky", ("Failed", "Succeeded", "Running"))["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "DatasetInvalid"), status
    assert "test.jsonl:3" in status["message"] and "dataset.quality.leakage" in status["message"], status
    assert not training_job_pods(control_plane, namespace, "leaky")
    assert "leaky-train-1" not in [j["metadata"]["name"] for j in get_json(control_plane, "jobs", "-n",
                                                                          namespace)["items"]]


def test_an_output_holding_another_runs_manifest_fails_in_validation(control_plane, node_agent, namespace,
                                                                     operator, s3_inputs):
    """Run identity: the output prefix holds a manifest that another run published. `kubetune validate` exits 73
    (OutputInUse) on CPU; the FineTuneJob fails with that reason and no training Job is ever created."""
    credentials(control_plane, namespace)
    storage = Storage(StorageEndpoint(endpoint=s3_inputs["endpoint"]))
    storage.put_json(s3_inputs["output"] + "manifest.json", {
        "job": "someone-elses", "run": {"uid": "another-run", "specHash": "0" * 64}, "files": []})
    submit(control_plane, namespace, "taken", {
        "baseModel": {"uri": s3_inputs["model"]}, "dataset": {"train": s3_inputs["good"]},
        "output": {"uri": s3_inputs["output"]}, "hyperparameters": {"maxSteps": 4},
        "storage": {"endpoint": s3_inputs["endpoint"], "secretRef": {"name": "s3-credentials"}},
        "resources": {"workers": 1, "gpusPerWorker": 1},
    })
    status = wait_phase(control_plane, namespace, "taken", ("Failed", "Succeeded", "Running"))["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "OutputInUse"), status
    assert "another-run" in status["message"] and s3_inputs["output"] in status["message"]
    validated = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "OutputInUse")
    assert status.get("validationAttempts") == 1, "a permanent failure: validation is not retried"
    time.sleep(3)
    jobs = [j["metadata"]["name"] for j in get_json(control_plane, "jobs", "-n", namespace)["items"]]
    assert "taken-train-1" not in jobs, "no training Job (no GPU) for an output that is another run's"
    assert storage.get_json(s3_inputs["output"] + "manifest.json")["run"]["uid"] == "another-run", "left as it was"


def test_deleting_the_job_collects_its_children(control_plane, node_agent, namespace, operator):
    submit(control_plane, namespace, "short-lived", {
        "baseModel": {"uri": "s3://nowhere/model/"}, "dataset": {"train": "s3://nowhere/train.jsonl"},
        "output": {"uri": "s3://nowhere/out/"}, "runPolicy": {"suspend": True}})
    wait_for("the ConfigMap", lambda: kubectl(control_plane, "get", "configmap", "-n", namespace,
                                              "short-lived-config", check=False).returncode == 0)
    kubectl(control_plane, "delete", "ftj", "-n", namespace, "short-lived", "--wait=true")
    wait_for("garbage collection", lambda: kubectl(control_plane, "get", "configmap", "-n", namespace,
                                                   "short-lived-config", check=False).returncode != 0)


# -- training, with a stand-in trainer (tests/operator_tests/fake_trainer.py) --------------------------------------

FAKE_IMAGE = "ghcr.io/kubetune/trainer:fake"


@pytest.fixture
def fake_trainer(node_agent):
    """Map FAKE_IMAGE to fake_trainer.py on the node agent for this test (the real image runs
    `accelerate launch`; the full run with the real trainer replaces this in its own test)."""
    from kubetune_dev.cluster.agent_pod import ImageRule

    rule = ImageRule(match=FAKE_IMAGE, path=[str(Path(sys.executable).parent)], working_dir=str(ROOT),
                     entrypoint=[sys.executable, str(Path(__file__).with_name("fake_trainer.py"))])
    node_agent.image_rules.insert(0, rule)
    yield FAKE_IMAGE
    node_agent.image_rules.remove(rule)


def training_spec(s3_inputs: dict, image: str, **extra) -> dict:
    return {"baseModel": {"uri": s3_inputs["model"]}, "dataset": {"train": s3_inputs["good"]},
            "output": {"uri": s3_inputs["output"]}, "image": image,
            "storage": {"endpoint": s3_inputs["endpoint"], "secretRef": {"name": "s3-credentials"}},
            "resources": {"workers": 2, "gpusPerWorker": 1}, **extra}


def training_job_pods(cp, namespace: str, name: str) -> list[dict]:
    selector = f"kubetune.io/finetunejob={name},app.kubernetes.io/component=workers"
    return get_json(cp, "pods", "-n", namespace, "-l", selector)["items"]


def test_training_runs_reports_progress_and_succeeds(control_plane, node_agent, namespace, operator,
                                                     s3_inputs, fake_trainer):
    credentials(control_plane, namespace)
    submit(control_plane, namespace, "train-ok",
           training_spec(s3_inputs, fake_trainer, hyperparameters={"maxSteps": 8}))
    running = wait_phase(control_plane, namespace, "train-ok", ("Running", "Failed"))
    assert running["status"]["phase"] == "Running", running["status"]
    validated = next(c for c in running["status"]["conditions"] if c["type"] == "Validated")
    assert validated["status"] == "True" and "samples" in validated["message"]

    def progressed():
        status = get_json(control_plane, "ftj", "-n", namespace, "train-ok")["status"]
        return status if status.get("progress", {}).get("step", 0) >= 2 else None

    status = wait_for("progress from the trainer's metrics", progressed, timeout=60)
    assert status["progress"]["totalSteps"] == 8 and status["trainLoss"] > 0
    assert status["tokensTrained"] > 0 and status["startTime"]
    assert "/8 (" in kubectl(control_plane, "get", "ftj", "-n", namespace, "train-ok").stdout
    assert "kubetune_operator_gpus_in_use 2.0" in operator.metrics_text()

    done = wait_phase(control_plane, namespace, "train-ok", ("Succeeded", "Failed"), timeout=120)
    status = done["status"]
    assert status["phase"] == "Succeeded", status
    assert status["result"] == {"adapterUri": s3_inputs["output"], "sha256": "0" * 63 + "1",
                                "manifestUri": s3_inputs["output"] + "manifest.json"}
    assert status["progress"]["step"] == 8 and status["evalLoss"] == 2.5
    assert status["lastCheckpoint"]["count"] == 1 and status["gpuSeconds"] > 0 and status["completionTime"]
    jobs = sorted(j["metadata"]["name"] for j in get_json(control_plane, "jobs", "-n", namespace)["items"])
    assert jobs == ["train-ok-train-1"]  # the validation Job is cleaned up once it has passed
    pods = training_job_pods(control_plane, namespace, "train-ok")
    assert sorted(p["spec"]["hostname"] for p in pods) == ["train-ok-train-1-0", "train-ok-train-1-1"]
    logs = node_agent.logs(namespace, next(p["metadata"]["name"] for p in pods
                                           if p["spec"]["hostname"].endswith("-1")))
    start = json.loads(logs.splitlines()[0])
    assert start["rank"] == 1 and start["env"]["MASTER_ADDR"] == "train-ok-train-1-0.train-ok-workers"
    assert start["env"]["NODE_RANK"] == "1" and start["env"]["AWS_ACCESS_KEY_ID"] == "kubetune-local"
    reasons = {e["reason"] for e in events_of(control_plane, namespace, "train-ok",
                                              {"Created": 1, "Training": 1, "Completed": 1})}
    assert {"Created", "Training", "Completed"} <= reasons


def test_suspend_stops_the_workers_and_resume_restarts_them(control_plane, node_agent, namespace, operator,
                                                            s3_inputs, fake_trainer):
    credentials(control_plane, namespace)
    submit(control_plane, namespace, "pausable",
           training_spec(s3_inputs, fake_trainer, hyperparameters={"maxSteps": 600}))
    wait_phase(control_plane, namespace, "pausable", ("Running", "Failed"))
    kubectl(control_plane, "patch", "ftj", "-n", namespace, "pausable", "--type=merge",
            "-p", '{"spec": {"runPolicy": {"suspend": true}}}')
    wait_phase(control_plane, namespace, "pausable", ("Suspended",), timeout=60)
    wait_for("the workers to stop", lambda: not [
        p for p in training_job_pods(control_plane, namespace, "pausable")
        if p.get("status", {}).get("phase") in ("Running", "Pending")], timeout=60)
    job = get_json(control_plane, "job", "-n", namespace, "pausable-train-1")
    assert job["spec"]["suspend"] is True and not job["status"].get("failed")
    kubectl(control_plane, "patch", "ftj", "-n", namespace, "pausable", "--type=merge",
            "-p", '{"spec": {"runPolicy": {"suspend": false}}}')
    status = wait_phase(control_plane, namespace, "pausable", ("Running",), timeout=90)["status"]
    assert get_json(control_plane, "job", "-n", namespace, "pausable-train-1")["spec"]["suspend"] is False
    assert next(c for c in status["conditions"] if c["type"] == "Suspended")["status"] == "False"
    kubectl(control_plane, "delete", "ftj", "-n", namespace, "pausable", "--wait=true")


def test_hung_workers_are_restarted_once_then_the_job_fails(control_plane, node_agent, namespace, operator,
                                                            s3_inputs, fake_trainer):
    credentials(control_plane, namespace)
    submit(control_plane, namespace, "hang-twice", training_spec(
        s3_inputs, fake_trainer, hyperparameters={"maxSteps": 50}, runPolicy={"hangTimeoutSeconds": 30}))
    wait_for("a hang restart", lambda: get_json(control_plane, "ftj", "-n", namespace, "hang-twice")
             .get("status", {}).get("hangRestarts") == 1, timeout=180)
    status = wait_phase(control_plane, namespace, "hang-twice", ("Failed", "Succeeded"), 180)["status"]
    assert (status["phase"], status["reason"], status["hangRestarts"]) == ("Failed", "Hung", 1), status
    job = get_json(control_plane, "job", "-n", namespace, "hang-twice-train-1")
    assert job["spec"]["suspend"] is True and not job["status"].get("failed")  # not counted as failures
    reasons = [e["reason"] for e in events_of(control_plane, namespace, "hang-twice", {"WorkersHung": 1, "Hung": 1})]
    assert "WorkersHung" in reasons and "Hung" in reasons


def test_an_operator_restart_creates_no_duplicates(control_plane, node_agent, namespace, operator,
                                                   s3_inputs, fake_trainer):
    credentials(control_plane, namespace)
    submit(control_plane, namespace, "survivor",
           training_spec(s3_inputs, fake_trainer, hyperparameters={"maxSteps": 12}))
    wait_phase(control_plane, namespace, "survivor", ("Running", "Failed"))
    before = {j["metadata"]["name"]: j["metadata"]["uid"]  # the validation Job may not be cleaned up yet
              for j in get_json(control_plane, "jobs", "-n", namespace)["items"]
              if j["metadata"]["name"] != "survivor-validate"}
    operator.stop(kill=True)  # mid-run, no goodbye
    operator.start()
    status = wait_phase(control_plane, namespace, "survivor", ("Succeeded", "Failed"), 120)["status"]
    assert status["phase"] == "Succeeded", status
    after = {j["metadata"]["name"]: j["metadata"]["uid"]
             for j in get_json(control_plane, "jobs", "-n", namespace)["items"]}
    assert after == before and sorted(after) == ["survivor-train-1"]  # the validation Job was cleaned up
    for kind in ("configmaps", "services"):
        selector = "kubetune.io/finetunejob=survivor"
        assert len(get_json(control_plane, kind, "-n", namespace, "-l", selector)["items"]) == 1


# -- the real trainer ---------------------------------------------------------------------------------------

REAL_IMAGE = "ghcr.io/kubetune/trainer:local"


@pytest.fixture
def real_trainer(node_agent):
    """The trainer image's entrypoint, `kubetune launch` (accelerate launch), from this repo's .venv, with this
    checkout's PYTHONPATH (the .venv's editable installs may point at another checkout)."""
    import os

    from kubetune_dev.cluster.agent_pod import ImageRule

    venv_bin = Path(sys.executable).parent
    rule = ImageRule(match=REAL_IMAGE, path=[str(venv_bin)], working_dir=str(ROOT),
                     entrypoint=[str(venv_bin / "kubetune"), "launch"],
                     env={k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ})
    node_agent.image_rules.insert(0, rule)
    yield REAL_IMAGE
    node_agent.image_rules.remove(rule)


@pytest.fixture
def tiny_model(s3_server, bucket, tmp_path):
    from kubetune_dev.demo_data import generic_texts, write_support_dataset
    from kubetune_dev.tiny import make_tiny_base

    storage = Storage(StorageEndpoint(endpoint=s3_server.endpoint))
    base = make_tiny_base(tmp_path / "tiny", generic_texts(50), vocab_size=512, hidden_size=32, layers=1,
                          heads=2)
    storage.upload_dir(base, f"s3://{bucket}/model/")
    data = write_support_dataset(tmp_path / "data", train=32, validation=8, test=8)
    for split, path in data.items():
        storage.upload_file(path, f"s3://{bucket}/data/{split}.jsonl")
    return {"model": f"s3://{bucket}/model/", "data": f"s3://{bucket}/data/", "output": f"s3://{bucket}/out/",
            "endpoint": s3_server.endpoint}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_real_training_on_cpu_workers(control_plane, node_agent, namespace, operator, tiny_model,
                                      real_trainer, workers):
    credentials(control_plane, namespace)
    d = tiny_model["data"]
    submit(control_plane, namespace, "real", {
        "baseModel": {"uri": tiny_model["model"]}, "image": real_trainer,
        "dataset": {"train": f"{d}train.jsonl", "validation": f"{d}validation.jsonl",
                    "test": f"{d}test.jsonl"},
        "hyperparameters": {"maxSteps": 4, "batchSize": 2, "maxSeqLength": 256, "loggingSteps": 1},
        "checkpoint": {"everySteps": 2}, "output": {"uri": tiny_model["output"]},
        "storage": {"endpoint": tiny_model["endpoint"], "secretRef": {"name": "s3-credentials"}},
        "resources": {"workers": workers, "gpusPerWorker": 0},
    })
    status = wait_phase(control_plane, namespace, "real", ("Succeeded", "Failed"), timeout=420)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["result"]["manifestUri"] == tiny_model["output"] + "manifest.json"
    manifest = Storage(StorageEndpoint(endpoint=tiny_model["endpoint"])).get_json(
        status["result"]["manifestUri"])
    assert manifest["steps"] == 4 and manifest["processes"] == workers
    assert status["startTime"] and status["completionTime"] and status["attempts"]["current"] == 1
    # The validation Job tokenized the data once into the cache; the workers downloaded it instead.
    dataset = status["dataset"]
    assert dataset["samples"] == manifest["datasets"]["train"]["samples"] and dataset["plannedSteps"] == 4
    assert dataset["cacheUri"].startswith(tiny_model["output"] + "checkpoints/data-cache/")
    rank0 = next(p for p in training_job_pods(control_plane, namespace, "real")
                 if p["spec"]["hostname"].endswith("-0"))
    events = trainer_events(node_agent.logs(namespace, rank0["metadata"]["name"]))
    assert [e["cache"] for e in events if e["event"] == "data_cache"] == ["downloaded"]


def trainer_events(log: str) -> list[dict]:
    """The trainer's JSON event lines in a pod log (the other lines are accelerate's and transformers')."""
    return [json.loads(line) for line in log.splitlines() if line.startswith('{"event"')]


@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_checkpoint(control_plane, node_agent, namespace, operator, tiny_model,
                                                     real_trainer, proxy, tmp_path):
    """Delete the worker pod mid-run: the Job's replacement resumes from the newest complete checkpoint and the
    run ends with one loss curve. The trainer talks to S3 through a proxy that holds the second checkpoint's
    manifest upload, so the kill lands between two checkpoints however fast the machine is."""
    credentials(control_plane, namespace)
    held = proxy.inject("PUT", "checkpoints/step-00000004/manifest.json", "hold")
    d = tiny_model["data"]
    submit(control_plane, namespace, "killed", {
        "baseModel": {"uri": tiny_model["model"]}, "image": real_trainer,
        "dataset": {"train": f"{d}train.jsonl", "validation": f"{d}validation.jsonl"},
        "hyperparameters": {"maxSteps": 12, "batchSize": 2, "maxSeqLength": 256, "loggingSteps": 1},
        "checkpoint": {"everySteps": 2}, "output": {"uri": tiny_model["output"]},
        "storage": {"endpoint": proxy.endpoint, "secretRef": {"name": "s3-credentials"}},
        "resources": {"workers": 1, "gpusPerWorker": 0},
    })
    wait_for("the trainer to upload its second checkpoint", lambda: held.hits, timeout=300)
    storage = Storage(StorageEndpoint(endpoint=tiny_model["endpoint"]))
    prefix = tiny_model["output"] + "checkpoints/"
    assert checkpoint.complete_steps(storage, prefix) == [2]  # step 4's files are there, its manifest is not
    [first] = [p["metadata"]["name"] for p in training_job_pods(control_plane, namespace, "killed")]
    kubectl(control_plane, "delete", "pod", "-n", namespace, first, "--grace-period=0", "--force")
    wait_for("a replacement worker", lambda: [p for p in training_job_pods(control_plane, namespace, "killed")
                                              if p["metadata"]["name"] != first], timeout=120)
    proxy.clear()  # the killed trainer's held request is dropped, never forwarded

    status = wait_phase(control_plane, namespace, "killed", ("Succeeded", "Failed"), timeout=420)["status"]
    assert status["phase"] == "Succeeded", status
    # the pod deleted with no grace ends the attempt with nothing to say why: the infrastructure's, not a failure
    assert (status["attempts"]["current"], status["attempts"]["infrastructure"]) == (2, 1), status["attempts"]
    assert "failures" not in status["attempts"]
    assert status["progress"]["text"] == "12/12 (100%)", status["progress"]
    manifest = storage.get_json(status["result"]["manifestUri"])
    assert manifest["steps"] == manifest["totalSteps"] == 12
    assert [e["step"] for e in manifest["history"]] == list(range(1, 13))
    before = [e for e in trainer_events(node_agent.logs(namespace, first)) if e["event"] == "train"]
    assert [e["step"] for e in before] == [1, 2, 3, 4]
    assert manifest["history"][:2] == before[:2], "steps 1-2 in the manifest are the killed pod's"
    # The run record (issue 31): metrics.jsonl has every step once over both pods; status.checkpoints the newest.
    records = read_records(storage.download_to(tiny_model["output"] + HISTORY, tmp_path / HISTORY))
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 13))
    assert len({(r["kind"], r["step"]) for r in records}) == len(records)
    assert [c["step"] for c in status["checkpoints"]] == [4, 6, 8, 10, 12]
    assert status["checkpoints"][-1]["published"] and status["checkpoints"][-1]["uri"] == tiny_model["output"]

    [second] = [p["metadata"]["name"] for p in training_job_pods(control_plane, namespace, "killed")]
    events = trainer_events(kubectl(control_plane, "logs", "-n", namespace, second).stdout)
    [resumed] = [e for e in events if e["event"] == "resumed"]
    assert resumed["step"] == 2 and resumed["checkpoint"].rstrip("/").endswith("step-00000002"), resumed
    assert next(e["step"] for e in events if e["event"] == "train") == 3


# -- the classification tasks, with the real trainer ----------------------------------------------------------


def example_generator(name: str):
    """examples/<name>/generate.py, the example's data (and tiny base model) generator, as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{name.replace('-', '_')}",
                                                  ROOT / "examples" / name / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def classification_spec(image: str, endpoint: str, task: str, model: str, data: str, output: str,
                        **hyperparameters) -> dict:
    return {
        "task": task, "baseModel": {"uri": model}, "image": image,
        "dataset": {"train": f"{data}train.jsonl", "validation": f"{data}validation.jsonl",
                    "test": f"{data}test.jsonl", "format": "classification"},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "hyperparameters": {"maxSteps": 6, "batchSize": 4, "loggingSteps": 1, "learningRate": 0.01,
                            **hyperparameters},
        "evaluation": {"everySteps": 3, "metric": "accuracy"},
        "output": {"uri": output, "select": "best"},
        "storage": {"endpoint": endpoint, "secretRef": {"name": "s3-credentials"}},
        "resources": {"workers": 1, "gpusPerWorker": 0},
    }


def assert_result_in_status(cp, namespace: str, name: str, task: str, storage: Storage) -> dict:
    """The job succeeded; its status, printer column and manifest agree on the test metrics and the baseline."""
    status = wait_phase(cp, namespace, name, ("Succeeded", "Failed"), timeout=420)["status"]
    assert status["phase"] == "Succeeded", status
    result = status["result"]
    assert result["task"] == task
    test, baseline = result["metrics"]["test"], result["metrics"]["baseline"]
    assert {"accuracy", "f1", "loss"} <= test.keys() and {"accuracy", "f1", "loss"} <= baseline.keys()
    assert result["summary"].startswith("accuracy ") and "(base " in result["summary"]
    manifest = storage.get_json(result["manifestUri"])
    assert manifest["task"] == task and manifest["selected"]["select"] == "best"
    assert manifest["metrics"]["test"]["accuracy"] == pytest.approx(test["accuracy"], rel=1e-5)
    assert manifest["metrics"]["baseline"]["test"]["accuracy"] == pytest.approx(baseline["accuracy"], rel=1e-5)
    assert result["selectedStep"] == manifest["selected"]["step"]
    # The run record (issue 31): the card, the history and the plots, listed; the published step in the status.
    files = {f["path"] for f in manifest["files"]}
    assert {"README.md", HISTORY, "plots/loss.png", "plots/confusion.png", "plots/before-after.png"} <= files
    assert [c["step"] for c in status["checkpoints"] if c.get("published")] == [result["selectedStep"]]
    table = kubectl(cp, "get", "ftj", "-n", namespace, name).stdout
    assert "RESULT" in table.splitlines()[0] and result["summary"] in table
    return manifest


@pytest.mark.slow
def test_a_text_classification_job_reports_test_metrics_and_baseline(control_plane, node_agent, namespace,
                                                                      operator, s3_server, bucket, real_trainer,
                                                                      tmp_path):
    generate = example_generator("text-classification")
    storage = Storage(StorageEndpoint(endpoint=s3_server.endpoint))
    storage.upload_dir(generate.write_base_model(tmp_path / "base", pretrain_steps=0), f"s3://{bucket}/model/")
    for split, path in generate.write_dataset(tmp_path / "data", train=40, validation=10, test=10).items():
        storage.upload_file(path, f"s3://{bucket}/data/{split}.jsonl")
    credentials(control_plane, namespace)
    submit(control_plane, namespace, "clauses", classification_spec(
        real_trainer, s3_server.endpoint, "sequence-classification", f"s3://{bucket}/model/",
        f"s3://{bucket}/data/", f"s3://{bucket}/out/", maxSeqLength=64))
    manifest = assert_result_in_status(control_plane, namespace, "clauses", "sequence-classification", storage)
    assert manifest["labels"] == sorted(generate.LABELS)


@pytest.mark.slow
def test_an_image_classification_job_reports_test_metrics_and_baseline(control_plane, node_agent, namespace,
                                                                        operator, s3_server, bucket,
                                                                        real_trainer, tmp_path):
    from kubetune_dev.tiny_vision import make_tiny_vit

    generate = example_generator("image-classification")
    storage = Storage(StorageEndpoint(endpoint=s3_server.endpoint))
    storage.upload_dir(make_tiny_vit(tmp_path / "vit"), f"s3://{bucket}/model/")
    generate.write(tmp_path / "data", splits={"train": 24, "validation": 6, "test": 6})
    storage.upload_dir(tmp_path / "data", f"s3://{bucket}/data/")  # records with image paths relative to it
    credentials(control_plane, namespace)
    submit(control_plane, namespace, "plates", classification_spec(
        real_trainer, s3_server.endpoint, "image-classification", f"s3://{bucket}/model/",
        f"s3://{bucket}/data/", f"s3://{bucket}/out/"))
    manifest = assert_result_in_status(control_plane, namespace, "plates", "image-classification", storage)
    assert manifest["labels"] == sorted(generate.LABELS)


def test_a_missing_image_fails_validation_on_cpu(control_plane, node_agent, namespace, operator, s3_server,
                                                  bucket, tmp_path):
    from kubetune_dev.tiny_vision import make_tiny_vit

    generate = example_generator("image-classification")
    storage = Storage(StorageEndpoint(endpoint=s3_server.endpoint))
    storage.upload_dir(make_tiny_vit(tmp_path / "vit"), f"s3://{bucket}/model/")
    generate.write(tmp_path / "data", splits={"train": 6, "validation": 2, "test": 2})
    (tmp_path / "data" / "images" / "train" / "0003.png").unlink()
    storage.upload_dir(tmp_path / "data", f"s3://{bucket}/data/")
    credentials(control_plane, namespace)
    submit(control_plane, namespace, "missing-image", classification_spec(
        IMAGE, s3_server.endpoint, "image-classification", f"s3://{bucket}/model/", f"s3://{bucket}/data/",
        f"s3://{bucket}/out/"))
    status = wait_phase(control_plane, namespace, "missing-image", ("Failed", "Succeeded", "Running"))["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "DatasetInvalid"), status
    assert "train.jsonl:4" in status["message"] and "images/train/0003.png" in status["message"], status["message"]
    jobs = [j["metadata"]["name"] for j in get_json(control_plane, "jobs", "-n", namespace)["items"]]
    assert "missing-image-train-1" not in jobs


# -- preference tuning, with the real trainer ------------------------------------------------------------------


@pytest.mark.slow
def test_a_dpo_job_reports_rewards_and_publishes_a_merged_model(control_plane, node_agent, namespace, operator,
                                                                 tiny_model, real_trainer, tmp_path):
    from kubetune_dev.demo_data import write_preference_dataset

    storage = Storage(StorageEndpoint(endpoint=tiny_model["endpoint"]))
    pairs = tiny_model["output"].replace("/out/", "/pairs/")
    for split, path in write_preference_dataset(tmp_path / "pairs", train=32, validation=8, test=8).items():
        storage.upload_file(path, f"{pairs}{split}.jsonl")
    credentials(control_plane, namespace)
    submit(control_plane, namespace, "dpo", {
        "objective": "dpo", "baseModel": {"uri": tiny_model["model"]}, "image": real_trainer,
        "dataset": {"train": f"{pairs}train.jsonl", "validation": f"{pairs}validation.jsonl",
                    "test": f"{pairs}test.jsonl"},
        "hyperparameters": {"maxSteps": 4, "batchSize": 4, "learningRate": 5e-4, "loggingSteps": 1},
        "evaluation": {"everySteps": 2},
        "output": {"uri": tiny_model["output"], "merged": True, "dtype": "fp32"},
        "storage": {"endpoint": tiny_model["endpoint"], "secretRef": {"name": "s3-credentials"}},
        "resources": {"workers": 1, "gpusPerWorker": 0},
    })
    status = wait_phase(control_plane, namespace, "dpo", ("Succeeded", "Failed"), timeout=420)["status"]
    assert status["phase"] == "Succeeded", status
    test, baseline = status["result"]["metrics"]["test"], status["result"]["metrics"]["baseline"]
    assert {"loss", "rewards_accuracy", "rewards_margin", "rewards_chosen", "rewards_rejected"} <= test.keys()
    assert baseline["rewards_accuracy"] == 0 and test["loss"] < baseline["loss"]
    kept = 32 - status["dataset"]["quality"]["dropped"].get("train", 0)  # less what the data-quality checks drop
    assert status["result"]["summary"].startswith("loss ") and status["dataset"]["samples"] == kept
    manifest = storage.get_json(status["result"]["manifestUri"])
    assert manifest["objective"] == "dpo" and manifest["merged"] == {"path": "merged/", "dtype": "fp32"}
    assert any(f["path"] == "merged/config.json" for f in manifest["files"])
