"""Jobs with spec.scheduling.queueName, one reconcile at a time: Kueue owns the training Job's spec.suspend, the
operator stops and restarts workers through the Workload's spec.active, and the status says where the queue has
the job. (tests/operator_tests/test_kueue.py runs the same against the real Kueue.)"""

from __future__ import annotations

from datetime import timedelta

from kubetune_operator import kueue
from kubetune_operator.reconcile import Observed

from .builders import NOW, ftj, pod
from .test_reconcile import counted, desired, run, training_observed, validated

QUEUED = {"scheduling": {"queueName": "team-a"}}


def workload(job: dict, name: str = "job-demo-train-1", *, reserved: bool = False, active: bool = True,
             ours: str | None = None, evicted: str | None = None, preemptions: int = 0, priority: int = 0,
             created: str = "2026-01-01T11:00:00Z", queue: str = "team-a") -> dict:
    """A Workload as Kueue makes it for `job` (trimmed as the loop's index keeps it)."""
    conditions = [{"type": "QuotaReserved", "status": "True" if reserved else "False",
                   "reason": "QuotaReserved" if reserved else "Pending",
                   "message": "" if reserved else "couldn't assign flavors to pod set main: insufficient unused "
                   "quota for nvidia.com/gpu in flavor default-flavor, 2 more needed"}]
    if evicted:
        conditions.append({"type": "Evicted", "status": "True", "reason": evicted,
                           "message": "Preempted to accommodate a workload (UID: x) due to prioritization"})
    status = {"conditions": conditions}
    if reserved:
        status["admission"] = {"clusterQueue": "gpus"}
    if preemptions:
        evictions = [{"reason": "Preempted", "underlyingCause": "", "count": preemptions}]
        status["schedulingStats"] = {"evictions": evictions}
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
            "metadata": {"name": name, "namespace": "ml", "uid": f"uid-{name}", "creationTimestamp": created,
                         "annotations": {kueue.DEACTIVATED_BY: ours} if ours else {},
                         "ownerReferences": [{"kind": "Job", "name": job["metadata"]["name"],
                                              "uid": job["metadata"]["uid"], "controller": True}]},
            "spec": {"active": active, "queueName": queue, "priority": priority}, "status": status}


def other(name: str, **kwargs) -> dict:
    """Another job's Workload in the namespace."""
    return workload({"metadata": {"name": name, "uid": f"job-{name}"}}, name=f"job-{name}", **kwargs)


def queued(body: dict, wl_kwargs: dict | None = None, others: list[dict] | None = None, **job_kwargs):
    observed, tj = training_observed(body, **job_kwargs)
    wl = workload(tj, **(wl_kwargs or {}))
    observed.workloads = [wl, *(others or [])]
    return observed, tj, wl


def test_a_waiting_job_says_why_and_where_it_is_in_its_queue():
    body = validated(ftj(QUEUED))
    ahead = other("urgent", priority=100)
    earlier = other("earlier", created="2026-01-01T10:00:00Z")
    later = other("later", created="2026-01-01T11:30:00Z")
    running = other("running", reserved=True)
    elsewhere = other("elsewhere", queue="team-b")
    observed, _, wl = queued(body, others=[ahead, earlier, later, running, elsewhere], suspend=True)
    d = run(body, observed)
    assert d.suspend_training is None and d.workload_patch is None  # Kueue's to unsuspend
    assert (d.phase, d.status["reason"]) == ("Queued", "WaitingForAdmission")
    assert d.status["message"] == (
        "waiting for Kueue to admit the workload (LocalQueue team-a, position 3 of 4): couldn't assign flavors to "
        "pod set main: insufficient unused quota for nvidia.com/gpu in flavor default-flavor, 2 more needed")
    assert d.status["queue"] == {"localQueue": "team-a", "workload": wl["metadata"]["name"], "admitted": False,
                                 "position": 3, "pending": 4}


def test_before_kueue_makes_the_workload_the_job_waits():
    body = validated(ftj(QUEUED))
    observed, _ = training_observed(body, suspend=True)
    d = run(body, observed)
    assert d.status["reason"] == "WaitingForAdmission" and "is Kueue running" in d.status["message"]
    assert d.status["queue"] == {"localQueue": "team-a"} and d.suspend_training is None


def test_an_admitted_job_runs_and_its_queue_is_shown():
    body = validated(ftj(QUEUED))
    observed, tj, wl = queued(body, {"reserved": True}, suspend=False, active=2)
    observed.training_pods = [pod(tj, 0), pod(tj, 1)]
    d = run(body, observed)
    assert d.phase == "Running" and d.status["queue"] == {
        "localQueue": "team-a", "workload": wl["metadata"]["name"], "admitted": True, "clusterQueue": "gpus"}


def test_suspend_deactivates_the_workload_and_never_touches_the_job():
    body = validated(ftj({**QUEUED, "runPolicy": {"suspend": True}}), phase="Running")
    observed, _, wl = queued(body, {"reserved": True}, suspend=False, active=2)
    d = run(body, observed)
    assert d.suspend_training is None and d.workload_patch == (wl, kueue.deactivate("suspend"))
    assert d.phase == "Suspended" and "no quota held" in d.status["message"]

    # Kueue evicted it and suspended the Job: nothing more to do, and nothing undone while suspended
    body = validated(ftj({**QUEUED, "runPolicy": {"suspend": True}}), phase="Suspended")
    observed, _, _ = queued(body, {"active": False, "ours": "suspend", "evicted": "Deactivated"}, suspend=True)
    d = run(body, observed)
    assert d.suspend_training is None and d.workload_patch is None and d.phase == "Suspended"


def test_resume_puts_the_workload_back_in_its_queue():
    body = validated(ftj(QUEUED), phase="Suspended")
    observed, _, wl = queued(body, {"active": False, "ours": "suspend", "evicted": "Deactivated"}, suspend=True)
    d = run(body, observed)
    assert d.suspend_training is None and d.workload_patch == (wl, kueue.reactivate())
    assert (d.phase, d.status["reason"]) == ("Queued", "WaitingForAdmission")
    assert kueue.reactivate() == {"metadata": {"annotations": {kueue.DEACTIVATED_BY: None}}, "spec": {"active": True}}


def test_a_workload_someone_else_deactivated_stays_inactive():
    body = validated(ftj(QUEUED), phase="Running")
    observed, _, wl = queued(body, {"active": False, "evicted": "Deactivated"}, suspend=True)
    d = run(body, observed)
    assert d.workload_patch is None and d.suspend_training is None
    assert d.status["reason"] == "WorkloadInactive" and "set its spec.active to true" in d.status["message"]


def test_suspended_at_creation_a_queued_job_makes_no_training_job():
    body = validated(ftj({**QUEUED, "runPolicy": {"suspend": True}}))
    d = run(body, Observed(config_map=desired(body)["cm"]))
    assert d.phase == "Suspended" and "goes to LocalQueue team-a once it is false" in d.status["message"]
    assert not [o for o in d.create if o["kind"] == "Job"]


def test_a_preemption_by_kueue_ends_the_attempt_once_the_job_is_suspended():
    body = validated(ftj(QUEUED), phase="Running", progress={"step": 40, "totalSteps": 100})
    observed, tj, _ = queued(body, {"evicted": "Preempted"}, suspend=False, active=2)
    observed.training_pods = [pod(tj, 0), pod(tj, 1)]
    d = run(body, observed)  # evicted, the Job not suspended yet: the workers are told, nothing is counted yet
    assert (d.phase, d.status["reason"]) == ("Queued", "Preempted") and "attempts" not in d.status
    assert d.status["message"].startswith("preempted by Kueue at step 40 (Preempted to accommodate")
    assert d.suspend_training is None and d.workload_patch is None and d.create == []

    body["status"] = d.status  # Kueue suspends the Job: the attempt ends, counted once, and its Job goes
    observed, tj, _ = queued(body, {"evicted": "Preempted", "preemptions": 1}, suspend=True)
    observed.training_pods = [pod(tj, 0, phase="Running"), pod(tj, 1, phase="Failed", exit_code=76)]
    d = run(body, observed)
    assert counted(d) == {"current": 2, "preemptions": 1, "lastIncident": (
        "preemptions: evicted by Kueue: Preempted (Preempted to accommodate a workload (UID: x) due to "
        "prioritization)")}
    assert "demo-train-1" not in [o["metadata"]["name"] for o in d.delete]  # its Workload holds the quota meanwhile
    assert d.create == []  # worker 0 writes its checkpoint: the next attempt's Job waits for it
    assert d.status["trainingJob"] == {"name": "demo-train-2", "uid": None, "recreations": None}

    body["status"] = {**d.status, "trainingJob": {"name": "demo-train-2"}}  # as merged: no uid of attempt 1
    assert [e[0] for e in d.events if e[1] == "WorkerPreempted"] == ["Normal"]

    # the old workers are gone: attempt 2 goes to the queue as a new Job
    d = run(body, Observed(config_map=observed.config_map, validation_job=observed.validation_job,
                           service=observed.service, network_policy=observed.network_policy))
    [new] = d.create
    assert new["metadata"]["name"] == "demo-train-2" and new["spec"]["suspend"] is True
    assert new["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"


def test_an_eviction_other_than_preemption_is_the_infrastructures():
    body = validated(ftj(QUEUED), phase="Running")
    observed, _, _ = queued(body, {"evicted": "PodsReadyTimeout"}, suspend=True)
    d = run(body, observed)
    assert d.status["attempts"]["infrastructure"] == 1 and "PodsReadyTimeout" in d.status["attempts"]["lastIncident"]
    observed, _, _ = queued(body, {"active": False, "ours": "suspend", "evicted": "Deactivated"}, suspend=True)
    assert "attempts" not in run(body, observed).status  # the operator's own suspend is no incident
    observed, _, _ = queued(body, {"evicted": "Deactivated"}, suspend=True)  # resumed: evicted until readmitted
    assert "attempts" not in run(body, observed).status


def test_a_hang_restart_goes_through_the_workload():
    body = validated(ftj({**QUEUED, "runPolicy": {"hangTimeoutSeconds": 600}}), phase="Running",
                     lastProgressTime="2026-01-01T11:00:00Z", progress={"step": 10, "totalSteps": 100})
    observed, tj, wl = queued(body, {"reserved": True}, suspend=False, active=2)
    observed.training_pods = [pod(tj, 0), pod(tj, 1)]
    observed.trainer_metrics = {"step": 10, "total_steps": 100}
    d = run(body, observed)
    assert d.status["restartingWorkers"] is True and d.suspend_training is None
    assert d.workload_patch == (wl, kueue.deactivate("restart"))

    body["status"] = d.status  # evicted, the Job suspended, the pods gone: back in the queue
    observed, _, wl = queued(body, {"active": False, "ours": "restart", "evicted": "Deactivated"}, suspend=True)
    d = run(body, observed, NOW + timedelta(seconds=10))
    assert d.workload_patch == (wl, kueue.reactivate()) and d.status["restartingWorkers"] is False
    assert d.suspend_training is None


def test_a_permanent_failure_releases_the_quota():
    body = validated(ftj(QUEUED), phase="Running")
    observed, tj, wl = queued(body, {"reserved": True}, suspend=False, active=1)
    observed.training_pods = [pod(tj, 0, phase="Failed", exit_code=65, message="dataset invalid")]
    d = run(body, observed)
    assert d.phase == "Failed" and d.workload_patch == (wl, kueue.deactivate("failed"))
    assert d.suspend_training is None


def test_a_workload_is_found_by_its_job_not_by_its_name():
    body = validated(ftj(QUEUED))
    observed, tj = training_observed(body, suspend=True)
    leftover = workload({"metadata": {"name": tj["metadata"]["name"], "uid": "an-older-job"}})
    observed.workloads = [leftover]
    assert observed.workload is None
    assert kueue.owner_job(leftover) == "demo-train-1"
