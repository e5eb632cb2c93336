"""The control loop on the real control plane: a finished run whose Job vanishes stays finished, a child the
API refuses ends the run with the API's message, a foreign namesake is named, a transient validation failure
is retried, and pods that cannot start say why. Fixtures and helpers come from test_e2e.py."""

from __future__ import annotations

import json
import time

import pytest

from tests.faults import FaultProxy
from tests.kube import get_json, kubectl, wait_for
from tests.operator_tests import test_e2e as e2e
from tests.operator_tests.test_e2e import credentials, events_of, submit, training_spec, wait_phase

crd, s3_inputs, fake_trainer = e2e.crd, e2e.s3_inputs, e2e.fake_trainer  # fixtures
author_policy = e2e.author_policy  # the operator's (it trusts the API server for authors)
POOL, TAINT = "kubetune.io/accelerator", "kubetune.io/test"  # a node selector key and a taint these tests use

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]


@pytest.fixture(scope="module")
def operator(control_plane, crd, author_policy, tmp_path_factory):
    """test_e2e.py's operator (with the admission policy in force, which checks the authors), whose policy allows
    the node selector and the taint these tests use to any author."""
    env = e2e.operator_env(control_plane, KUBETUNE_POLICY_BINDING=author_policy, KUBETUNE_POLICY_NODE_SELECTORS=POOL,
                           KUBETUNE_POLICY_TOLERATIONS=f"{TAINT}:NoSchedule")
    yield from e2e.run_operator(tmp_path_factory, env)


def created_jobs(cp, namespace: str, ftj: str, job: str) -> int:
    return sum(1 for e in events_of(cp, namespace, ftj)
               if e["reason"] == "Created" and e["message"] == f"created Job {job}")


def job_names(cp, namespace: str) -> list[str]:
    return sorted(j["metadata"]["name"] for j in get_json(cp, "jobs", "-n", namespace)["items"])


def test_ttl_zero_reaches_succeeded_with_one_training_job(control_plane, node_agent, namespace, operator,
                                                          s3_inputs, fake_trainer):
    credentials(control_plane, namespace)
    submit(control_plane, namespace, "ttl-zero", training_spec(
        s3_inputs, fake_trainer, hyperparameters={"maxSteps": 3}, runPolicy={"ttlSecondsAfterFinished": 0}))
    status = wait_phase(control_plane, namespace, "ttl-zero", ("Succeeded", "Failed"), timeout=180)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["trainingJob"]["name"] == "ttl-zero-train-1" and status["trainingJob"]["uid"]
    wait_for("the TTL controller to delete the Job", lambda: job_names(control_plane, namespace) == [],
             timeout=60)
    time.sleep(5)  # the operator has seen the Job go: nothing is re-created
    assert job_names(control_plane, namespace) == []
    assert created_jobs(control_plane, namespace, "ttl-zero", "ttl-zero-train-1") == 1
    assert get_json(control_plane, "ftj", "-n", namespace, "ttl-zero")["status"]["phase"] == "Succeeded"


def test_deleting_the_training_job_after_success_keeps_succeeded(control_plane, node_agent, namespace, operator,
                                                                 s3_inputs, fake_trainer):
    credentials(control_plane, namespace)
    submit(control_plane, namespace, "done-then-gone",
           training_spec(s3_inputs, fake_trainer, hyperparameters={"maxSteps": 3}))
    assert wait_phase(control_plane, namespace, "done-then-gone", ("Succeeded", "Failed"),
                      timeout=180)["status"]["phase"] == "Succeeded"
    kubectl(control_plane, "delete", "job", "-n", namespace, "done-then-gone-train-1", "--wait=true",
            "--timeout=60s")
    time.sleep(5)
    assert job_names(control_plane, namespace) == []
    assert get_json(control_plane, "ftj", "-n", namespace, "done-then-gone")["status"]["phase"] == "Succeeded"
    assert created_jobs(control_plane, namespace, "done-then-gone", "done-then-gone-train-1") == 1


def test_a_training_job_deleted_mid_run_is_recreated_once(control_plane, node_agent, namespace, operator,
                                                          s3_inputs, fake_trainer):
    credentials(control_plane, namespace)
    submit(control_plane, namespace, "lost-job", training_spec(s3_inputs, fake_trainer,
                                                               hyperparameters={"maxSteps": 8}))
    wait_phase(control_plane, namespace, "lost-job", ("Running",), timeout=120)
    kubectl(control_plane, "delete", "job", "-n", namespace, "lost-job-train-1", "--wait=true", "--timeout=60s")
    status = wait_phase(control_plane, namespace, "lost-job", ("Succeeded", "Failed"), timeout=180)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["trainingJob"]["recreations"] == 1
    reasons = [e["reason"] for e in events_of(control_plane, namespace, "lost-job",
                                              {"TrainingJobDeleted": 1, "TrainingJobRecreated": 1})]
    assert "TrainingJobDeleted" in reasons and "TrainingJobRecreated" in reasons
    wait_for("the second Created event", lambda: created_jobs(
        control_plane, namespace, "lost-job", "lost-job-train-1") >= 2, timeout=60)
    assert created_jobs(control_plane, namespace, "lost-job", "lost-job-train-1") == 2


def test_a_child_the_api_refuses_fails_the_job_with_the_api_message(control_plane, node_agent, namespace,
                                                                    operator, s3_inputs, fake_trainer):
    """A toleration's tolerationSeconds with an effect other than NoExecute passes the CRD (and the policy: the
    taint is allowed): only the Job's own validation refuses it."""
    credentials(control_plane, namespace)
    spec = training_spec(s3_inputs, fake_trainer)
    spec["resources"]["tolerations"] = [{"key": TAINT, "effect": "NoSchedule", "tolerationSeconds": 60}]
    submit(control_plane, namespace, "bad-child", spec)

    def validated():
        status = get_json(control_plane, "ftj", "-n", namespace, "bad-child").get("status", {})
        ok = any(c["type"] == "Validated" and c["status"] == "True" for c in status.get("conditions", []))
        return ok or status.get("phase") == "Failed"

    wait_for("validation", validated, timeout=120)
    status = wait_phase(control_plane, namespace, "bad-child", ("Failed",), timeout=30)["status"]
    assert status["reason"] == "InvalidChildSpec", status
    assert "Job bad-child-train-1" in status["message"] and "tolerationSeconds" in status["message"]
    assert any(e["reason"] == "InvalidChildSpec" and e["type"] == "Warning"
               for e in events_of(control_plane, namespace, "bad-child", {"InvalidChildSpec": 1}))


def test_a_foreign_namesake_is_reported(control_plane, node_agent, namespace, operator):
    kubectl(control_plane, "create", "configmap", "-n", namespace, "taken-config", "--from-literal=a=b")
    submit(control_plane, namespace, "taken", {
        "baseModel": {"uri": "s3://nowhere/model/"}, "dataset": {"train": "s3://nowhere/train.jsonl"},
        "output": {"uri": "s3://nowhere/out/"}})
    status = wait_phase(control_plane, namespace, "taken", ("Failed",), timeout=30)["status"]
    assert status["reason"] == "ChildConflict"
    assert "ConfigMap taken-config already exists and is not owned by this FineTuneJob" in status["message"]
    assert get_json(control_plane, "configmap", "-n", namespace, "taken-config")["data"] == {"a": "b"}


def test_a_transient_validation_failure_is_retried_and_the_job_succeeds(control_plane, node_agent, namespace,
                                                                        operator, s3_inputs, fake_trainer):
    credentials(control_plane, namespace)
    with FaultProxy(s3_inputs["endpoint"]) as proxy:
        proxy.inject("*", "", "status", status=503, times=None)  # storage down
        spec = training_spec(s3_inputs, fake_trainer, hyperparameters={"maxSteps": 3})
        spec["storage"]["endpoint"] = proxy.endpoint
        submit(control_plane, namespace, "flaky-storage", spec)

        def retrying():
            status = get_json(control_plane, "ftj", "-n", namespace, "flaky-storage").get("status", {})
            assert status.get("phase") != "Failed", status
            return status if status.get("reason") == "ValidationRetrying" else None

        status = wait_for("a retry of the validation", retrying, timeout=180)
        assert "retrying in" in status["message"]
        proxy.clear()  # storage back
        status = wait_phase(control_plane, namespace, "flaky-storage", ("Succeeded", "Failed"),
                            timeout=240)["status"]
    events = [(e["reason"], e["message"]) for e in events_of(control_plane, namespace, "flaky-storage",
                                                             {"ValidationRetrying": 1})]
    assert status["phase"] == "Succeeded", status
    assert status["validationAttempts"] >= 2, (status, events)
    assert "ValidationRetrying" in [reason for reason, _ in events]


def test_workers_that_cannot_be_scheduled_say_why(control_plane, node_agent, namespace, operator, s3_inputs,
                                                  fake_trainer):
    credentials(control_plane, namespace)
    spec = training_spec(s3_inputs, fake_trainer)
    spec["resources"]["nodeSelector"] = {POOL: "none-here"}
    submit(control_plane, namespace, "nowhere-to-run", spec)

    def explained():
        status = get_json(control_plane, "ftj", "-n", namespace, "nowhere-to-run").get("status", {})
        return status if status.get("reason") == "Unschedulable" else None

    status = wait_for("the scheduler's reason in the status", explained, timeout=120)
    assert status["phase"] == "Queued" and "cannot be scheduled" in status["message"]
    assert "node affinity/selector" in status["message"] or "nodes are available" in status["message"]


def test_a_quota_refusal_is_shown_and_retried_until_the_quota_allows(control_plane, node_agent, namespace,
                                                                     operator):
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-jobs"},
             "spec": {"hard": {"count/jobs.batch": "0"}}}
    kubectl(control_plane, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(quota))
    wait_for("the quota to be counted", lambda: get_json(control_plane, "resourcequota", "-n", namespace,
                                                         "no-jobs").get("status", {}).get("hard"), timeout=60)
    submit(control_plane, namespace, "over-quota", {
        "baseModel": {"uri": "s3://nowhere/model/"}, "dataset": {"train": "s3://nowhere/train.jsonl"},
        "output": {"uri": "s3://nowhere/out/"}})

    def blocked():
        status = get_json(control_plane, "ftj", "-n", namespace, "over-quota").get("status", {})
        return status if status.get("reason") == "QuotaExceeded" else None

    status = wait_for("the quota refusal in the status", blocked, timeout=30)
    assert "exceeded quota" in status["message"] and status["phase"] == "Pending"
    condition = next(c for c in status["conditions"] if c["type"] == "Blocked")
    assert condition["status"] == "True" and "count/jobs.batch" in condition["message"]
    assert any(e["reason"] == "QuotaExceeded" and e["type"] == "Warning"
               for e in events_of(control_plane, namespace, "over-quota", {"QuotaExceeded": 1}))
    kubectl(control_plane, "delete", "resourcequota", "-n", namespace, "no-jobs")
    wait_for("the validation Job once the quota allows it", lambda: "over-quota-validate" in
             job_names(control_plane, namespace), timeout=120)
