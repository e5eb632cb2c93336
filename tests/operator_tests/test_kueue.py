"""FineTuneJobs under the real Kueue (sigs.k8s.io/kueue, `make kueue`) on the local control plane: quota, a user's
suspend, preemption and jobs without a queue. Each test gets its own namespace, ClusterQueue and LocalQueue.

With a queueName, Kueue alone owns the training Job's spec.suspend; the operator suspends and restarts through
the Workload's spec.active (docs/operator.md). Fixtures and helpers come from test_e2e.py.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import yaml
from kubetune_api import StorageEndpoint
from kubetune_operator import policy
from kubetune_trainer.storage import Storage

from tests.kube import get_json, kubectl, wait_for
from tests.operator_tests import test_e2e as e2e
from tests.operator_tests.fake_trainer import release
from tests.operator_tests.test_e2e import credentials, events_of, submit, trainer_events, training_job_pods, wait_phase

crd, fake_trainer, real_trainer, s3_inputs, tiny_model = (e2e.crd, e2e.fake_trainer, e2e.real_trainer, e2e.s3_inputs,
                                                          e2e.tiny_model)  # fixtures

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]

ROOT = Path(__file__).resolve().parents[2]
GPU = "nvidia.com/gpu"
BINDING = f"kubetune-kueue-test-{uuid.uuid4().hex[:6]}"
POLICY_LABEL = "kubetune.io/kueue-test"


@pytest.fixture(scope="module")
def admission(control_plane, crd):
    """The admission policy, bound to the namespaces labelled POLICY_LABEL: a job may then name a priority class
    its author may use (the operator trusts the API server for that once the binding is in force)."""
    vap, binding, params = yaml.safe_load_all((ROOT / "crds" / "policy" / "admission-policy.yaml").read_text())
    ns = f"kubetune-system-{uuid.uuid4().hex[:6]}"
    kubectl(control_plane, "create", "namespace", ns)
    params["metadata"]["namespace"] = binding["spec"]["paramRef"]["namespace"] = ns
    vap["metadata"]["name"] = binding["metadata"]["name"] = binding["spec"]["policyName"] = BINDING
    params["data"] = policy.Settings(image_prefixes=("ghcr.io/kubetune/trainer",)).params()
    binding["spec"]["matchResources"] = {"namespaceSelector": {"matchLabels": {POLICY_LABEL: "true"}}}
    for doc in (vap, params, binding):
        kubectl(control_plane, "apply", "-f", "-", stdin=json.dumps(doc))
    for name, value in (("kueue-test-low", 100), ("kueue-test-high", 1000)):
        kubectl(control_plane, "apply", "-f", "-", stdin=json.dumps({
            "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name},
            "value": value}))
    yield BINDING
    for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy"):
        kubectl(control_plane, "delete", kind, BINDING, "--wait=false")
    kubectl(control_plane, "delete", "namespace", ns, "--wait=false")


@pytest.fixture(scope="module")
def operator(control_plane, crd, kueue, admission, tmp_path_factory):
    """Started after Kueue, so that its CRDs are there to watch."""
    yield from e2e.run_operator(tmp_path_factory, e2e.operator_env(control_plane, KUBETUNE_POLICY_BINDING=admission))


@pytest.fixture
def queue(control_plane, kueue, namespace):
    """A LocalQueue `queue` in the test's namespace, in a ClusterQueue of its own; call it with the quota."""
    made = []

    def make(quota: dict) -> str:
        name = f"cq-{namespace}"
        kueue.cluster_queue(name, quota, namespaces=[namespace])
        kueue.local_queue(namespace, "queue", name)
        made.append(name)
        return "queue"

    yield make
    for name in made:
        kubectl(control_plane, "delete", "clusterqueue", name, "--wait=false", check=False)


def status_of(cp, namespace: str, name: str) -> dict:
    return get_json(cp, "ftj", "-n", namespace, name).get("status") or {}


def workload_of(cp, namespace: str, name: str) -> dict | None:
    job = get_json(cp, "job", "-n", namespace, f"{name}-train-1")
    return next((w for w in get_json(cp, "workloads", "-n", namespace)["items"]
                 if any(r["uid"] == job["metadata"]["uid"] for r in w["metadata"].get("ownerReferences") or [])),
                None)


def fake_job(inputs: dict, image: str, queue: str | None, steps: int = 6, **extra) -> dict:
    spec = e2e.training_spec(inputs, image, hyperparameters={"maxSteps": steps}, **extra)
    spec["resources"] = {"workers": 1, "gpusPerWorker": 1}
    if queue:
        spec["scheduling"] = {"queueName": queue}
    return spec


def test_two_jobs_and_a_quota_for_one(control_plane, node_agent, namespace, operator, queue, s3_inputs,
                                      fake_trainer):
    """The second job waits, Queued: WaitingForAdmission with Kueue's reason and its place, until the first ends."""
    credentials(control_plane, namespace)
    q = queue({GPU: 1})
    # held after its second step until released: it outlasts the second job's validation however slow the machine
    submit(control_plane, namespace, "first-held", fake_job(s3_inputs, fake_trainer, q, steps=6))
    wait_phase(control_plane, namespace, "first-held", ("Running",), timeout=120)
    # its own output: the operator refuses a second unfinished job on one output prefix (tests/security/test_claims.py)
    second = {**s3_inputs, "output": s3_inputs["output"].replace("/out/", "/out-second/")}
    submit(control_plane, namespace, "second", fake_job(second, fake_trainer, q))

    def waiting():
        s = status_of(control_plane, namespace, "second")
        return s if s.get("reason") == "WaitingForAdmission" and s.get("queue", {}).get("workload") and \
            "insufficient unused quota" in s.get("message", "") else None  # Kueue's reason, once it has one

    s = wait_for("the second job to wait for admission", waiting, timeout=120)
    assert s["phase"] == "Queued", s
    assert "LocalQueue queue, position 1 of 1" in s["message"] and f"insufficient unused quota for {GPU}" in \
        s["message"], s["message"]
    assert s["queue"]["admitted"] is False and (s["queue"]["position"], s["queue"]["pending"]) == (1, 1), s
    assert not training_job_pods(control_plane, namespace, "second")
    first = status_of(control_plane, namespace, "first-held")
    assert first["phase"] == "Running" and first["queue"]["admitted"] is True, first
    assert first["queue"]["clusterQueue"] == f"cq-{namespace}"

    release(get_json(control_plane, "ftj", "-n", namespace, "first-held")["metadata"]["uid"])
    assert wait_phase(control_plane, namespace, "first-held", ("Succeeded", "Failed"))["status"]["phase"] == \
        "Succeeded"
    done = wait_phase(control_plane, namespace, "second", ("Succeeded", "Failed"), timeout=180)["status"]
    assert done["phase"] == "Succeeded" and done["queue"]["admitted"] is True, done
    assert done["attempts"] == {"current": 1, "startTime": done["attempts"]["startTime"]}, done["attempts"]


def test_a_suspend_holds_and_resume_requeues(control_plane, node_agent, namespace, operator, queue, s3_inputs,
                                            fake_trainer):
    """runPolicy.suspend deactivates the Workload: Kueue evicts it and suspends the Job, and nobody unsuspends it
    (no flapping); resuming puts it back in the queue and it runs to the end."""
    credentials(control_plane, namespace)
    q = queue({GPU: 1})
    # held after its second step until released (each time it starts): running when suspended, however slow the
    # machine, and done soon after it is released
    submit(control_plane, namespace, "pausable-held", fake_job(s3_inputs, fake_trainer, q, steps=6))
    wait_phase(control_plane, namespace, "pausable-held", ("Running",), timeout=120)
    kubectl(control_plane, "patch", "ftj", "pausable-held", "-n", namespace, "--type=merge",
            "-p", '{"spec": {"runPolicy": {"suspend": true}}}')
    wait_for("the workers to stop", lambda: not [
        p for p in training_job_pods(control_plane, namespace, "pausable-held")
        if p["status"].get("phase") in ("Pending", "Running")], timeout=90)
    # Kueue releases the quota once the pods are gone and the operator mirrors it at its next reconcile
    wait_for("the quota to be released", lambda: not status_of(control_plane, namespace, "pausable-held")["queue"][
        "admitted"], timeout=60)
    for _ in range(8):  # Kueue and the operator leave it alone
        s = status_of(control_plane, namespace, "pausable-held")
        job = get_json(control_plane, "job", "-n", namespace, "pausable-held-train-1")
        workload = workload_of(control_plane, namespace, "pausable-held")
        assert s["phase"] == "Suspended" and job["spec"]["suspend"] is True, (s, job["spec"])
        assert workload["spec"]["active"] is False and not s["queue"]["admitted"], workload
        assert not [p for p in training_job_pods(control_plane, namespace, "pausable-held")
                    if p["status"].get("phase") in ("Pending", "Running")]
        time.sleep(1)
    assert workload["metadata"]["annotations"]["kubetune.io/deactivated"] == "suspend"
    assert "no quota held" in s["message"], s["message"]

    kubectl(control_plane, "patch", "ftj", "pausable-held", "-n", namespace, "--type=merge",
            "-p", '{"spec": {"runPolicy": {"suspend": false}}}')
    wait_phase(control_plane, namespace, "pausable-held", ("Running",), timeout=120)
    workload = workload_of(control_plane, namespace, "pausable-held")
    assert workload["spec"]["active"] is True and "kubetune.io/deactivated" not in (
        workload["metadata"].get("annotations") or {})
    release(get_json(control_plane, "ftj", "-n", namespace, "pausable-held")["metadata"]["uid"])
    done = wait_phase(control_plane, namespace, "pausable-held", ("Succeeded", "Failed"), timeout=180)["status"]
    assert done["phase"] == "Succeeded" and done["attempts"]["current"] == 1, done  # a suspend is no incident
    assert not get_json(control_plane, "job", "-n", namespace, "pausable-held-train-1")["status"].get("failed")


def test_a_job_without_a_queue_name_is_left_to_the_operator(control_plane, node_agent, namespace, operator, kueue,
                                                            s3_inputs, fake_trainer):
    credentials(control_plane, namespace)
    submit(control_plane, namespace, "unqueued", fake_job(s3_inputs, fake_trainer, None, steps=3))
    done = wait_phase(control_plane, namespace, "unqueued", ("Succeeded", "Failed"), timeout=180)["status"]
    assert done["phase"] == "Succeeded" and "queue" not in done, done
    assert get_json(control_plane, "workloads", "-n", namespace)["items"] == []


@pytest.mark.slow
def test_a_preempted_job_resumes_from_its_checkpoint(control_plane, node_agent, namespace, operator, queue,
                                                     tiny_model, real_trainer, fake_trainer):
    """A high-priority job preempts a running low-priority one: Kueue suspends its Job, the trainer checkpoints on
    SIGTERM, the job goes back to Queued (not a failure), and once readmitted it resumes from that step and ends
    with every step trained once."""
    steps = 80
    kubectl(control_plane, "label", "namespace", namespace, f"{POLICY_LABEL}=true")
    credentials(control_plane, namespace)
    q = queue({"cpu": 1})
    d = tiny_model["data"]
    storage = {"endpoint": tiny_model["endpoint"], "secretRef": {"name": "s3-credentials"}}
    submit(control_plane, namespace, "low", {
        "baseModel": {"uri": tiny_model["model"]}, "image": real_trainer, "dataset": {"train": f"{d}train.jsonl"},
        "hyperparameters": {"maxSteps": steps, "batchSize": 2, "maxSeqLength": 256, "loggingSteps": 1},
        "checkpoint": {"everySteps": 10 * steps},  # no periodic checkpoint: a resume can only be from a SIGTERM's
        "output": {"uri": tiny_model["output"]}, "storage": storage,
        "resources": {"workers": 1, "gpusPerWorker": 0, "cpu": "1"},
        "scheduling": {"queueName": q, "priorityClassName": "kueue-test-low"},
        "runPolicy": {"terminationGracePeriodSeconds": 60}})
    inputs = {**tiny_model, "good": f"{d}train.jsonl", "output": tiny_model["output"].replace("/out/", "/out-high/")}
    high = {**fake_job(inputs, fake_trainer, q, steps=3), "storage": storage}
    high["resources"] = {"workers": 1, "gpusPerWorker": 0, "cpu": "1"}
    high["scheduling"]["priorityClassName"] = "kueue-test-high"
    high["runPolicy"] = {"suspend": True}  # validated meanwhile; suspended, it makes no training Job (holds no quota)
    submit(control_plane, namespace, "high", high)
    [rank0] = wait_for("the low job's worker", lambda: [
        p["metadata"]["name"] for p in training_job_pods(control_plane, namespace, "low")
        if p["status"].get("phase") == "Running"], timeout=300)
    wait_for("the low job to train a few steps", lambda: [
        e for e in trainer_events(node_agent.logs(namespace, rank0)) if e["event"] == "train" and e["step"] >= 3],
        timeout=300, every=0.2)
    held = wait_phase(control_plane, namespace, "high", ("Suspended",))["status"]
    assert "goes to LocalQueue queue once it is false" in held["message"], held
    assert not get_json(control_plane, "jobs", "-n", namespace, "-l", "kubetune.io/finetunejob=high,"
                        "app.kubernetes.io/component=workers")["items"]
    kubectl(control_plane, "patch", "ftj", "high", "-n", namespace, "--type=merge",
            "-p", '{"spec": {"runPolicy": {"suspend": false}}}')

    def preempted():  # seen while Kueue suspends the Job, or once that has ended the attempt
        s = status_of(control_plane, namespace, "low")
        return s if s.get("reason") == "Preempted" or (s.get("attempts") or {}).get("preemptions") else None

    s = wait_for("Kueue to preempt the low job", preempted, timeout=180)
    evidence = (s.get("attempts") or {}).get("lastIncident") or s["message"]
    assert s["phase"] == "Queued" and "by Kueue" in evidence and "Preempted" in evidence, s
    assert wait_phase(control_plane, namespace, "high", ("Succeeded", "Failed"), timeout=240)["status"]["phase"] == \
        "Succeeded"

    done = wait_phase(control_plane, namespace, "low", ("Succeeded", "Failed"), timeout=420)["status"]
    assert done["phase"] == "Succeeded", done
    # the preemption ended attempt 1; attempt 2, a new Job, was queued and admitted again. On the process node agent
    # the pods share the host's ports: the high job's first worker may find its metrics port still held by the
    # stopping low worker, fail, and wait out its back-off, in which the low job is admitted and preempted again.
    preemptions = done["attempts"]["preemptions"]
    assert preemptions >= 1 and done["attempts"]["current"] == preemptions + 1, done["attempts"]
    assert "failures" not in done["attempts"] and "Preempted" in done["attempts"]["lastIncident"], done["attempts"]
    assert not get_json(control_plane, "job", "-n", namespace, f"low-train-{preemptions + 1}")["status"].get("failed")
    [again] = [p["metadata"]["name"] for p in training_job_pods(control_plane, namespace, "low")
               if p["metadata"]["name"] != rank0]
    [resumed] = [e for e in trainer_events(node_agent.logs(namespace, again)) if e["event"] == "resumed"]
    # The only checkpoint a run with everySteps 600 can have is its SIGTERM one (the preempted pod is deleted with
    # its log): the run resumed from the step it was stopped at, after the steps it had trained.
    assert resumed["step"] >= 3 and f"step-{resumed['step']:08d}" in resumed["checkpoint"], resumed
    manifest = Storage(StorageEndpoint(endpoint=tiny_model["endpoint"])).get_json(done["result"]["manifestUri"])
    assert [e["step"] for e in manifest["history"]] == list(range(1, steps + 1)), "every step once, none twice"
    reasons = [e["reason"] for e in events_of(control_plane, namespace, "low", {"WorkerPreempted": preemptions})]
    assert reasons.count("WorkerPreempted") == preemptions and "WorkerFailed" not in reasons, reasons
