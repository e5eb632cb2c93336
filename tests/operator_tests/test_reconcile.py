"""The state machine, one reconcile at a time: (FineTuneJob, observed children, metrics, now) -> Decision."""

from __future__ import annotations

from datetime import timedelta

import pytest
from kubetune_api import FineTuneJobSpec, FineTuneJobStatus
from kubetune_operator import children, loop
from kubetune_operator.conditions import get_condition
from kubetune_operator.reconcile import Decision, Observed, decide, output_of
from kubetune_operator.settings import OperatorSettings

from .builders import NOW, ftj, job, pod

IMAGE = "trainer:test"
SETTINGS = OperatorSettings(trainer_image=IMAGE)


def desired(body: dict) -> dict:
    meta, spec = body["metadata"], FineTuneJobSpec.model_validate(body["spec"])
    return {
        "cm": children.config_map(meta, spec, SETTINGS),
        "validation": children.validation_job(meta, spec, SETTINGS),
        "service": children.service(meta, spec, SETTINGS),
        "training": children.training_job(meta, spec, SETTINGS),
        "network": children.network_policy(meta, SETTINGS),
    }


def run(body: dict, observed: Observed, now=NOW) -> Decision:
    d = decide(body, observed, now, SETTINGS)
    FineTuneJobStatus.model_validate(d.status)  # always fits the CRD's status schema
    return d


def kinds(d: Decision) -> list[str]:
    return [o["metadata"]["name"] for o in d.create]


def validated(body: dict, **status) -> dict:
    """A FineTuneJob whose data passed validation (its status says so)."""
    conds = [
        {
            "type": "Validated",
            "status": "True",
            "reason": "DatasetValid",
            "message": "ok",
            "lastTransitionTime": "2026-01-01T10:00:00Z",
        }
    ]
    body["status"] = {"phase": "Queued", "conditions": conds, **status}
    return body


def training_observed(body: dict, **job_kwargs) -> tuple[Observed, dict]:
    c = desired(body)
    tj = job(c["training"], **job_kwargs)
    return Observed(
        config_map=c["cm"],
        validation_job=job(c["validation"], finished="Complete"),
        service=c["service"],
        network_policy=c["network"],
        training_job=tj,
    ), tj


def test_new_job_creates_config_and_validation_only():
    d = run(ftj(), Observed())
    assert kinds(d) == ["demo-config", "demo-validate"]
    assert d.phase == "Pending" and get_condition(d.status, "Validated")["status"] == "Unknown"
    assert d.status["observedGeneration"] == 1
    assert ("Normal", "Accepted", "Pending: validating the dataset on CPU") in d.events


def test_second_reconcile_creates_nothing_more():
    body = ftj()
    c = desired(body)
    vj = job(c["validation"], active=1)
    d = run(body, Observed(config_map=c["cm"], validation_job=vj))
    assert d.create == [] and d.update == [] and (d.phase, d.status["reason"]) == ("Pending", "ValidationPending")
    d = run(body, Observed(config_map=c["cm"], validation_job=vj,
                           validation_pods=[pod(vj, container="validate")]))
    assert d.create == [] and d.phase == "Validating"


def test_a_validation_pod_that_cannot_start_says_why():
    body = ftj()
    c = desired(body)
    vj = job(c["validation"], active=1)
    stuck = pod(vj, phase="Pending", container="validate")
    stuck["status"]["containerStatuses"] = []
    stuck["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                      "message": "0/1 nodes are available: 1 Insufficient memory."}]
    d = run(body, Observed(config_map=c["cm"], validation_job=vj, validation_pods=[stuck]))
    assert (d.phase, d.status["reason"]) == ("Pending", "Unschedulable")
    assert "cannot be scheduled: 0/1 nodes are available" in d.status["message"]
    waiting = pod(vj, phase="Pending", container="validate")
    waiting["status"]["containerStatuses"][0]["state"] = {"waiting": {
        "reason": "CreateContainerConfigError", "message": 'secret "s3-credentials" not found'}}
    d = run(body, Observed(config_map=c["cm"], validation_job=vj, validation_pods=[waiting]))
    assert d.status["reason"] == "CreateContainerConfigError" and "s3-credentials" in d.status["message"]


def test_config_map_drift_is_repaired():
    body = ftj()
    c = desired(body)
    stale = {**c["cm"], "data": {"trainer.yaml": "old"}}
    d = run(body, Observed(config_map=stale, validation_job=job(c["validation"], active=1)))
    assert [o["metadata"]["name"] for o in d.update] == ["demo-config"]


def test_invalid_dataset_fails_without_a_gpu_job():
    body = ftj()
    c = desired(body)
    vj = job(
        c["validation"],
        finished="Failed",
        reason="PodFailurePolicy",
        message="Container validate for pod ml/demo-validate-x failed with exit code 65",
    )
    message = "DatasetInvalid: s3://data/train.jsonl:3: record is not valid JSON"
    d = run(
        body,
        Observed(
            config_map=c["cm"],
            validation_job=vj,
            validation_pods=[pod(vj, exit_code=65, message=message, container="validate")],
        ),
    )
    assert d.phase == "Failed" and d.status["reason"] == "DatasetInvalid"
    assert d.status["message"] == message
    assert "demo-train-1" not in kinds(d) and "demo-workers" not in kinds(d)
    assert get_condition(d.status, "Validated")["status"] == "False"
    assert get_condition(d.status, "Failed")["status"] == "True"
    assert d.events == [("Warning", "DatasetInvalid", f"Failed: {message}")]
    assert d.status["completionTime"]


def test_a_transient_validation_failure_is_retried_with_a_growing_delay():
    body = ftj(status={"validationAttempts": 1})
    c = desired(body)
    vj = job(
        c["validation"], finished="Failed", reason="BackoffLimitExceeded", message="Job has reached the limit"
    )
    crashed = Observed(config_map=c["cm"], validation_job=vj,
                       validation_pods=[pod(vj, exit_code=75, message="storage unreachable", container="validate")])
    d = run(body, crashed)
    assert (d.phase, d.status["reason"]) == ("Pending", "ValidationRetrying") and "unreachable" in d.status["message"]
    assert d.delete == [vj] and d.requeue_after == 10 and d.events[0][:2] == ("Warning", "ValidationRetrying")
    assert d.status["validationRetryTime"] == "2026-01-01T12:00:10Z"
    assert get_condition(d.status, "Validated")["status"] == "Unknown"

    body["status"] = d.status  # the same failed Job, still being deleted: handled once, not twice
    assert run(body, crashed).status["validationRetryTime"] == "2026-01-01T12:00:10Z"
    gone = Observed(config_map=c["cm"])
    assert run(body, gone, NOW + timedelta(seconds=5)).create == []  # not yet
    d = run(body, gone, NOW + timedelta(seconds=10))
    assert kinds(d) == ["demo-validate"] and d.status["validationAttempts"] == 2
    assert "validationRetryTime" not in d.status

    body["status"] = d.status  # the second attempt fails too: twice the delay
    d = run(body, crashed, NOW + timedelta(seconds=60))
    assert d.requeue_after == 20 and d.phase == "Pending"


def test_validation_that_keeps_failing_ends_failed_after_the_attempts_allowed():
    """A failure that recurs (an OOM kill each time) is retried until status.validationAttempts reaches
    validation_max_attempts (counted in the API, so an operator restart does not reset it); then the job fails
    ValidationFailed with the last failure's reason and message, and no training Job is created."""
    settings = OperatorSettings(trainer_image=IMAGE, validation_max_attempts=3)
    body = ftj(status={"validationAttempts": 2})
    c = desired(body)
    vj = job(c["validation"], finished="Failed", reason="BackoffLimitExceeded", message="Job has reached the limit")
    oom = Observed(config_map=c["cm"], validation_job=vj,
                   validation_pods=[pod(vj, exit_code=137, message="OOMKilled", container="validate")])
    d = decide(body, oom, NOW, settings)
    assert (d.phase, d.status["reason"]) == ("Pending", "ValidationRetrying")  # attempt 2 of 3: retried

    body["status"] = {**d.status, "validationAttempts": 3}
    body["status"].pop("validationRetryTime")  # the third Job was created, and failed the same way
    d = decide(body, oom, NOW + timedelta(minutes=5), settings)
    FineTuneJobStatus.model_validate(d.status)
    assert (d.phase, d.status["reason"]) == ("Failed", "ValidationFailed")
    assert d.status["message"].startswith("validation failed 3 times, as many as the operator tries "
                                          "(validation.maxAttempts); the last: BackoffLimitExceeded: ")
    assert "OOMKilled" in d.status["message"] and d.status["completionTime"]
    assert get_condition(d.status, "Validated")["reason"] == "ValidationFailed"
    assert get_condition(d.status, "Failed")["status"] == "True"
    assert d.events == [("Warning", "ValidationFailed", f"Failed: {d.status['message']}")]
    assert d.create == [] and d.delete == [vj]  # the failed validation Job is cleaned up, nothing new starts
    body["status"] = d.status
    assert decide(body, Observed(config_map=c["cm"]), NOW + timedelta(hours=1), settings).create == []


def test_valid_dataset_starts_training():
    body = ftj()
    c = desired(body)
    vj = job(c["validation"], finished="Complete")
    d = run(
        body,
        Observed(
            config_map=c["cm"],
            validation_job=vj,
            validation_pods=[
                pod(
                    vj,
                    phase="Succeeded",
                    exit_code=0,
                    container="validate",
                    message="dataset valid: train 100 samples",
                )
            ],
        ),
    )
    assert kinds(d) == ["demo-ingress", "demo-workers", "demo-train-1"]  # the NetworkPolicy before any worker
    assert get_condition(d.status, "Validated")["message"] == "dataset valid: train 100 samples"
    assert d.phase == "Queued"


def test_a_succeeded_validation_pod_starts_training_before_its_job_says_complete():
    """The Job controller marks a Job Complete about a second after its pod succeeded (it batches its syncs):
    the succeeded pod is enough, and a pod of another Job does not count."""
    body = ftj()
    c = desired(body)
    vj = job(c["validation"], active=1)  # no condition yet
    done = pod(vj, phase="Succeeded", exit_code=0, container="validate", message="dataset valid: train 100 samples")
    d = run(body, Observed(config_map=c["cm"], validation_job=vj, validation_pods=[done]))
    assert kinds(d) == ["demo-ingress", "demo-workers", "demo-train-1"]
    assert get_condition(d.status, "Validated")["message"] == "dataset valid: train 100 samples"

    stranger = {**done, "metadata": {**done["metadata"], "ownerReferences": [{"uid": "another-job"}]}}
    d = run(body, Observed(config_map=c["cm"], validation_job=vj, validation_pods=[stranger]))
    assert kinds(d) == [] and d.phase == "Validating"


def test_every_worker_succeeded_is_success_before_the_job_says_complete():
    body = validated(ftj({"resources": {"workers": 2, "gpusPerWorker": 1}}), phase="Running")
    observed, tj = training_observed(body, active=1)
    rank0 = pod(tj, 0, phase="Succeeded", exit_code=0, message='{"manifestSha256": "ab12"}')
    observed.training_pods = [rank0, pod(tj, 1)]  # worker 1 still running: not yet
    assert run(body, observed).phase == "Running"
    observed.training_pods = [rank0, pod(tj, 1, phase="Succeeded", exit_code=0)]
    d = run(body, observed)
    assert d.phase == "Succeeded" and d.status["result"]["sha256"] == "ab12"
    worker1_first = [pod(tj, 1, phase="Succeeded", exit_code=0), pod(tj, 0)]
    assert run(body, Observed(**{**vars(observed), "training_pods": worker1_first})).phase == "Running"


def test_a_job_copy_without_completions_or_a_stopped_job_waits_for_the_jobs_own_word():
    """The operator's index keeps a trimmed Job (loop.trim): without spec.completions, pods prove nothing; nor do
    they for a Job being stopped."""
    body = validated(ftj(), phase="Running")
    observed, tj = training_observed(body, active=1)
    del tj["spec"]["completions"]
    observed.training_pods = [pod(tj, 0, phase="Succeeded", exit_code=0, message='{"manifestSha256": "ab12"}')]
    assert run(body, observed).phase != "Succeeded"
    tj["spec"]["completions"], tj["spec"]["suspend"] = 1, True  # stopped (suspended, pruned): the Job decides
    assert run(body, observed).phase != "Succeeded"
    trimmed = loop.trim({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
                         "spec": {"completions": 2, "parallelism": 2, "template": {}}})
    assert trimmed["spec"]["completions"] == 2


def test_validation_is_not_rerun_once_passed():
    body = validated(ftj())
    d = run(body, Observed(config_map=desired(body)["cm"]))  # the validation Job was TTL-deleted
    assert "demo-validate" not in kinds(d) and "demo-train-1" in kinds(d)


def test_running_workers_report_progress_from_metrics():
    body = validated(ftj())
    observed, tj = training_observed(body, active=2)
    observed.training_pods = [pod(tj, 0), pod(tj, 1, ip="10.0.0.6")]
    observed.trainer_metrics = {
        "step": 50,
        "total_steps": 200,
        "epoch": 0.25,
        "progress_ratio": 0.25,
        "eta_seconds": 3725,
        "train_loss": 1.23456,
        "validation_loss": 1.5,
        "tokens_per_second": 1000.5,
        "tokens_trained_total": 123456,
        "checkpoints_total": 1,
        "last_checkpoint_timestamp_seconds": NOW.timestamp(),
    }
    d = run(body, observed)
    assert d.phase == "Running" and d.create == []
    assert d.status["progress"] == {
        "step": 50,
        "totalSteps": 200,
        "epoch": 0.25,
        "percent": 25.0,
        "etaSeconds": 3725,
        "eta": "1h02m",
        "text": "50/200 (25%)",
    }
    assert (d.status["trainLoss"], d.status["evalLoss"], d.status["tokensTrained"]) == (1.2346, 1.5, 123456)
    assert d.status["lastCheckpoint"] == {
        "time": "2026-01-01T12:00:00Z",
        "count": 1,
        "uri": "s3://adapters/demo/checkpoints/",
    }
    assert d.status["startTime"] == "2026-01-01T12:00:00Z"
    assert get_condition(d.status, "Running")["status"] == "True"
    assert ("Normal", "Training", "Running: 2/2 workers running") in d.events


def test_gpu_seconds_accumulate_while_running():
    body = validated(ftj(), phase="Running", gpuAccountedAt="2026-01-01T11:59:00Z", gpusInUse=2, gpuSeconds=10.0)
    observed, tj = training_observed(body, active=2)
    observed.training_pods = [pod(tj, 0), pod(tj, 1)]
    d = run(body, observed)
    assert d.status["gpuSeconds"] == 10.0 + 2 * 1 * 60


def test_pending_workers_are_queued():
    body = validated(ftj())
    observed, tj = training_observed(body, active=2)
    observed.training_pods = [pod(tj, 0, phase="Pending")]
    d = run(body, observed)
    assert d.phase == "Queued" and d.status["reason"] == "WaitingForWorkers"


def test_success_publishes_the_result():
    body = validated(ftj(), phase="Running")
    observed, tj = training_observed(body, finished="Complete")
    observed.training_pods = [
        pod(tj, 0, phase="Succeeded", exit_code=0, message='{"manifestSha256": "ab12"}')
    ]
    d = run(body, observed)
    assert d.phase == "Succeeded"
    assert d.status["result"] == {
        "adapterUri": "s3://adapters/demo/",
        "manifestUri": "s3://adapters/demo/manifest.json",
        "sha256": "ab12",
    }
    assert get_condition(d.status, "Succeeded")["status"] == "True"
    assert d.events[0][:2] == ("Normal", "Completed")


def test_success_reports_the_final_step_not_the_last_scrape():
    stale = {"step": 30, "totalSteps": 60, "epoch": 1.5, "percent": 50.0, "etaSeconds": 2, "eta": "2s",
             "text": "30/60 (50%)"}
    body = validated(ftj(), phase="Running", progress=stale)
    observed, tj = training_observed(body, finished="Complete")
    body["status"]["tokensTrained"] = 900  # the resumed pod's counter: only the tokens since the resume
    report = ('{"manifestSha256": "ab12", "steps": 60, "totalSteps": 60, "tokensTrained": 1800, "checkpoints": '
              '[{"step": 60, "uri": "s3://out/x/", "validation": {"loss": 0.5}, "published": true}]}')
    observed.training_pods = [pod(tj, 0, phase="Succeeded", exit_code=0, message=report)]
    d = run(body, observed)
    assert d.phase == "Succeeded"
    assert d.status["tokensTrained"] == 1800
    assert d.status["checkpoints"] == [{"step": 60, "uri": "s3://out/x/", "validation": {"loss": 0.5},
                                        "published": True}]
    assert d.status["progress"] == {"step": 60, "totalSteps": 60, "epoch": 1.5, "percent": 100.0,
                                    "text": "60/60 (100%)"}


def test_permanent_trainer_exit_names_the_reason():
    body = validated(ftj(), phase="Running")
    observed, tj = training_observed(
        body, finished="Failed", reason="PodFailurePolicy", message="exit code 78"
    )
    observed.training_pods = [
        pod(tj, 0, phase="Failed", exit_code=78, message="ConfigInvalid: qlora needs a GPU")
    ]
    d = run(body, observed)
    assert (d.phase, d.status["reason"]) == ("Failed", "ConfigInvalid")
    assert d.status["message"] == "ConfigInvalid: qlora needs a GPU"


def test_terminal_phases_are_sticky():
    body = validated(ftj(), phase="Succeeded")
    d = run(body, Observed())  # everything was garbage-collected
    assert d.create == [] and d.events == [] and d.phase == "Succeeded"


def test_suspend_and_resume():
    body = validated(ftj({"runPolicy": {"suspend": True}}), phase="Running")
    observed, tj = training_observed(body, active=2, suspend=False)
    d = run(body, observed)
    assert d.suspend_training is True and d.phase == "Suspended"
    assert get_condition(d.status, "Suspended")["status"] == "True"

    body = validated(ftj(), phase="Suspended")
    observed, tj = training_observed(body, suspend=True)
    d = run(body, observed)
    assert d.suspend_training is False and d.status["reason"] == "Resuming"


def test_a_suspended_job_whose_training_job_is_deleted_stays_suspended():
    """A pruned sweep trial, or a namespace torn down: not Queued, no TrainingJobDeleted, nothing recreated that
    would run; once the Job is gone, a suspended one replaces it."""
    body = validated(ftj({"runPolicy": {"suspend": True}}), phase="Suspended")
    observed, tj = training_observed(body, suspend=True)
    tj["metadata"]["deletionTimestamp"] = "2026-01-01T12:00:00Z"
    d = run(body, observed)
    assert (d.phase, d.status["reason"]) == ("Suspended", "Suspended") and not d.events and not d.create
    observed.training_job = None
    d = run(body, observed)
    assert d.phase == "Suspended" and next(o for o in d.create if o["kind"] == "Job")["spec"]["suspend"] is True


def test_suspended_at_creation_creates_a_suspended_job():
    body = validated(ftj({"runPolicy": {"suspend": True}}))
    d = run(body, Observed(config_map=desired(body)["cm"]))
    assert d.phase == "Suspended"
    assert next(o for o in d.create if o["kind"] == "Job")["spec"]["suspend"] is True


def test_kueue_unsuspends_not_the_operator():
    body = validated(ftj({"scheduling": {"queueName": "team-a"}}))
    observed, _ = training_observed(body, suspend=True)
    d = run(body, observed)
    assert d.suspend_training is None and d.status["reason"] == "WaitingForAdmission"


def test_hang_restarts_workers_once_then_fails():
    start = "2026-01-01T11:00:00Z"
    body = validated(
        ftj({"runPolicy": {"hangTimeoutSeconds": 600}}),
        phase="Running",
        lastProgressTime=start,
        progress={"step": 10, "totalSteps": 100},
    )
    observed, tj = training_observed(body, active=2)
    observed.training_pods = [pod(tj, 0), pod(tj, 1)]
    observed.trainer_metrics = {"step": 10, "total_steps": 100}
    d = run(body, observed)
    assert (
        d.suspend_training is True and d.status["restartingWorkers"] is True and d.status["hangRestarts"] == 1
    )
    assert d.events[0][:2] == ("Warning", "WorkersHung")

    # next reconcile: the Job is suspended and its pods are gone -> resume it
    body["status"] = d.status
    observed, tj = training_observed(body, suspend=True, active=0)
    d = run(body, observed, NOW + timedelta(seconds=10))
    assert d.suspend_training is False and d.status["restartingWorkers"] is False

    # running again: the hang clock restarts
    body["status"] = d.status
    observed, tj = training_observed(body, active=2)
    observed.training_pods = [pod(tj, 0), pod(tj, 1)]
    d = run(body, observed, NOW + timedelta(seconds=20))
    assert d.phase == "Running" and d.status["lastProgressTime"] == "2026-01-01T12:00:20Z"

    # and hangs again (the trainer answers, but neither steps nor beats): fail
    body["status"] = d.status
    observed.trainer_metrics = {"step": 10, "total_steps": 100}
    d = run(body, observed, NOW + timedelta(seconds=700))
    assert (d.phase, d.status["reason"]) == ("Failed", "Hung") and d.suspend_training is True


def test_progress_resets_the_hang_clock():
    body = validated(
        ftj({"runPolicy": {"hangTimeoutSeconds": 600}}),
        phase="Running",
        lastProgressTime="2026-01-01T11:00:00Z",
        progress={"step": 10, "totalSteps": 100},
    )
    observed, tj = training_observed(body, active=2)
    observed.training_pods = [pod(tj, 0), pod(tj, 1)]
    observed.trainer_metrics = {"step": 11, "total_steps": 100}
    d = run(body, observed)
    assert d.phase == "Running" and d.status["lastProgressTime"] == "2026-01-01T12:00:00Z"


def test_unparseable_spec_fails_as_config_invalid():
    body = ftj()
    body["spec"]["hyperparameters"] = {"epochs": 1, "maxSteps": 5}  # the CRD refuses this; be safe anyway
    d = run(body, Observed())
    assert (d.phase, d.status["reason"]) == ("Failed", "ConfigInvalid") and d.create == []


def test_permanent_failure_through_accelerate_stops_the_retries():
    """`accelerate launch` exits 1 whatever the trainer's code: the message prefix tells."""
    body = validated(ftj(), phase="Running")
    observed, tj = training_observed(body, active=1, failed=1)
    message = "DatasetInvalid: s3://data/train.jsonl:1: no trained tokens left after truncation"
    observed.training_pods = [pod(tj, 0, phase="Failed", exit_code=1, message=message), pod(tj, 1)]
    d = run(body, observed)
    assert (d.phase, d.status["reason"], d.status["message"]) == ("Failed", "DatasetInvalid", message)
    assert d.suspend_training is True


# -- the control loop's honesty: created-then-gone, finalizers, refusals, positive evidence ---------------


def test_the_training_job_holds_the_outcome_finalizer():
    job_obj = desired(ftj())["training"]
    assert job_obj["metadata"]["finalizers"] == [children.JOB_FINALIZER]


def test_a_job_deleted_by_its_ttl_still_reports_success_then_is_released():
    body = validated(ftj({"runPolicy": {"ttlSecondsAfterFinished": 0}}), phase="Running",
                     trainingJob={"name": "demo-train-1", "uid": "job-demo-train"})
    observed, tj = training_observed(body, finished="Complete")
    tj["metadata"]["deletionTimestamp"] = "2026-01-01T12:00:00Z"
    d = run(body, observed)
    assert d.phase == "Succeeded" and d.create == [] and d.release == [tj]


def test_a_finished_job_deleted_later_keeps_the_phase_and_is_released():
    body = validated(ftj(), phase="Succeeded")
    observed, tj = training_observed(body, finished="Complete")
    tj["metadata"]["deletionTimestamp"] = "2026-01-01T12:00:00Z"
    d = run(body, observed)
    assert d.phase == "Succeeded" and d.release == [tj] and d.create == []


def test_a_running_job_deleted_by_hand_is_released_and_recreated_once():
    record = {"name": "demo-train-1", "uid": "job-demo-train"}
    body = validated(ftj(), phase="Running", trainingJob=record)
    observed, tj = training_observed(body, active=2)
    tj["metadata"]["deletionTimestamp"] = "2026-01-01T12:00:00Z"
    d = run(body, observed)
    assert d.release == [tj] and d.status["reason"] == "TrainingJobDeleted" and d.create == []

    body["status"] = d.status
    observed.training_job = None  # gone
    d = run(body, observed)
    assert kinds(d) == ["demo-train-1"] and d.status["trainingJob"] == {"name": "demo-train-1", "recreations": 1}
    assert ("Warning", "TrainingJobRecreated") in [e[:2] for e in d.events]

    body["status"] = {**d.status, "trainingJob": {**d.status["trainingJob"], "uid": "second"}}
    d = run(body, observed)  # gone again
    assert (d.phase, d.status["reason"]) == ("Failed", "TrainingJobLost") and d.create == []


def test_a_job_never_created_is_created_without_an_event():
    body = validated(ftj())
    observed, _ = training_observed(body)
    observed.training_job = None
    d = run(body, observed)
    assert kinds(d) == ["demo-train-1"] and "trainingJob" not in d.status


def test_the_validation_job_is_deleted_once_its_result_is_recorded():
    body = ftj()
    c = desired(body)
    vj = job(c["validation"], finished="Complete")
    d = run(body, Observed(config_map=c["cm"], validation_job=vj))
    assert d.delete == [vj] and get_condition(d.status, "Validated")["status"] == "True"


def test_unschedulable_workers_say_why():
    body = validated(ftj({"resources": {"nodeSelector": {"gpu": "h100"}}}))
    observed, tj = training_observed(body, active=2)
    stuck = pod(tj, 0, phase="Pending")
    stuck["status"] = {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."}]}
    observed.training_pods = [stuck]
    d = run(body, observed)
    assert (d.phase, d.status["reason"]) == ("Queued", "Unschedulable") and "node affinity" in d.status["message"]


def test_run_policy_edits_reach_the_running_job():
    body = validated(ftj({"runPolicy": {"activeDeadlineSeconds": 7200, "ttlSecondsAfterFinished": 60}}))
    observed, _ = training_observed(validated(ftj()), active=2)
    d = run(body, observed)
    assert d.training_spec == {"activeDeadlineSeconds": 7200, "ttlSecondsAfterFinished": 60}
    observed, _ = training_observed(body, active=2)
    assert run(body, observed).training_spec == {}


def test_a_child_the_api_refuses_ends_the_job_with_the_api_message():
    from kubetune_operator.reconcile import refused

    body = validated(ftj())
    observed, _ = training_observed(body)
    d = run(body, observed)
    message = 'Job.batch "demo-train-1" is invalid: spec.template.spec.tolerations[0].effect: Unsupported value'
    d = refused(body, d, desired(body)["training"], 422, message)  # at the decision's own now
    assert (d.phase, d.status["reason"]) == ("Failed", "InvalidChildSpec") and message in d.status["message"]
    assert ("Warning", "InvalidChildSpec") in [e[:2] for e in d.events]


def test_a_forbidden_create_is_blocked_and_then_cleared():
    from kubetune_operator.reconcile import refused

    body = ftj()
    d = run(body, Observed())
    d = refused(body, d, desired(body)["validation"], 403, 'jobs "demo-validate" is forbidden: exceeded quota')
    assert d.phase == "Pending" and d.status["reason"] == "QuotaExceeded"
    assert get_condition(d.status, "Blocked")["status"] == "True"
    assert ("Warning", "QuotaExceeded") in [e[:2] for e in d.events]
    body["status"] = d.status
    assert get_condition(run(body, Observed()).status, "Blocked")["status"] == "False"


def test_a_foreign_namesake_is_a_clear_failure():
    from kubetune_operator.reconcile import conflict

    body = ftj()
    d = conflict(body, run(body, Observed()), desired(body)["validation"], "owned by Job other")
    assert (d.phase, d.status["reason"]) == ("Failed", "ChildConflict")
    assert "Job demo-validate already exists and is not owned by this FineTuneJob (owned by Job other)" in \
        d.status["message"]


def test_an_unreachable_trainer_is_never_called_hung():
    body = validated(ftj({"runPolicy": {"hangTimeoutSeconds": 600}}), phase="Running",
                     lastProgressTime="2026-01-01T11:00:00Z")
    observed, tj = training_observed(body, active=2)
    observed.training_pods = [pod(tj, 0), pod(tj, 1)]
    observed.scrape_failures, observed.scrape_error = 7, "TimeoutError"
    d = run(body, observed)
    assert d.phase == "Running" and d.suspend_training is None
    assert d.status["metricsScrape"] == {"failures": 7, "lastError": "TimeoutError"}


def test_a_heartbeat_without_steps_is_alive():
    """A long evaluation or upload: no new step, but the trainer beats."""
    body = validated(ftj({"runPolicy": {"hangTimeoutSeconds": 600}}), phase="Running",
                     lastProgressTime="2026-01-01T11:00:00Z", progress={"step": 10, "totalSteps": 100})
    observed, tj = training_observed(body, active=2)
    observed.training_pods = [pod(tj, 0), pod(tj, 1)]
    observed.trainer_metrics = {"step": 10, "total_steps": 100, "heartbeat_timestamp_seconds": NOW.timestamp() - 5}
    d = run(body, observed)
    assert d.phase == "Running" and d.suspend_training is None
    assert d.status["lastHeartbeatTime"] == "2026-01-01T11:59:55Z"


def test_non_finite_trainer_values_never_reach_the_status():
    body = validated(ftj(), phase="Running")
    observed, tj = training_observed(body, active=2)
    observed.training_pods = [pod(tj, 0), pod(tj, 1)]
    observed.trainer_metrics = {"step": 3, "total_steps": 10, "train_loss": float("nan"),
                                "tokens_per_second": float("inf")}
    d = run(body, observed)
    assert "trainLoss" not in d.status and "tokensPerSecond" not in d.status


def test_an_unreadable_spec_keeps_running_workers_supervised():
    body = validated(ftj(), phase="Running")
    observed, tj = training_observed(body, active=2)
    observed.training_pods = [pod(tj, 0), pod(tj, 1)]
    finished, _ = training_observed(body, finished="Complete")
    body["spec"]["hyperparameters"] = {"futureField": 1}  # a newer CRD, an older operator
    d = run(body, observed)
    assert d.phase == "Running" and d.status["reason"] == "SpecUnreadable" and d.suspend_training is None
    assert "workers keep running" in d.status["message"] and d.events[0][:2] == ("Warning", "SpecUnreadable")
    assert run(body, finished).phase == "Succeeded"


def test_gpu_seconds_are_brought_up_to_date_when_the_gpus_in_use_change():
    body = validated(ftj(), phase="Running", gpuAccountedAt="2026-01-01T11:59:50Z", gpusInUse=2)
    observed, tj = training_observed(body, active=1)
    observed.training_pods = [pod(tj, 0), pod(tj, 1, phase="Succeeded")]
    d = run(body, observed)  # one worker is done: 10 s at 2 GPUs, then 1
    assert d.status["gpuSeconds"] == 20 and d.status["gpusInUse"] == 1
    assert d.status["gpuAccountedAt"] == "2026-01-01T12:00:00Z"
    body["status"] = d.status
    observed, _ = training_observed(body, finished="Complete")
    d = run(body, observed, NOW + timedelta(seconds=5))  # the run ends: 5 s more at 1 GPU
    assert d.phase == "Succeeded" and d.status["gpuSeconds"] == 25
    assert "gpuAccountedAt" not in d.status and "gpusInUse" not in d.status


def test_gpu_accounting_does_not_rewrite_the_status_every_reconcile():
    body = validated(ftj(), phase="Running", gpuAccountedAt="2026-01-01T11:59:50Z", gpusInUse=2, gpuSeconds=5.0)
    observed, tj = training_observed(body, active=2)
    observed.training_pods = [pod(tj, 0), pod(tj, 1)]
    d = run(body, observed)
    assert d.status["gpuSeconds"] == 5.0 and d.status["gpuAccountedAt"] == "2026-01-01T11:59:50Z"


def test_rank_0_is_scraped_only_while_the_workers_run():
    body = validated(ftj(), phase="Running")
    observed, tj = training_observed(body, active=2)
    observed.training_pods = [pod(tj, 0), pod(tj, 1)]
    assert run(body, observed).metrics_url == "http://10.0.0.5:9400/metrics"
    observed.training_pods = []
    assert run(body, observed).metrics_url is None


# -- preemption-safe runs: one incident is one retry at most; OutputInUse ----------------------------------


def evicted(p: dict, reason: str = "EvictionByEvictionAPI") -> dict:
    """The pod as the API server leaves it after POST pods/<name>/eviction: DisruptionTarget, being deleted."""
    p["metadata"]["deletionTimestamp"] = "2026-01-01T11:59:00Z"
    p["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True", "reason": reason,
                                  "message": "Eviction API: evicting"}]
    return p


def named(p: dict, name: str) -> dict:
    p["metadata"]["name"] = name
    return p


def test_output_in_use_fails_in_validation_without_a_gpu_job():
    body = ftj()
    c = desired(body)
    vj = job(c["validation"], finished="Failed", reason="PodFailurePolicy",
             message="Container validate for pod ml/demo-validate-x failed with exit code 73")
    message = "OutputInUse: s3://adapters/demo/ holds run 0000 (spec 12ab); set output.overwrite or another uri"
    d = run(body, Observed(config_map=c["cm"], validation_job=vj,
                           validation_pods=[pod(vj, phase="Failed", exit_code=73, message=message,
                                                container="validate")]))
    assert (d.phase, d.status["reason"], d.status["message"]) == ("Failed", "OutputInUse", message)
    validated = get_condition(d.status, "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "OutputInUse")
    assert "demo-train-1" not in kinds(d) and "demo-workers" not in kinds(d) and d.requeue_after is None
    assert d.events == [("Warning", "OutputInUse", f"Failed: {message}")]


def test_a_worker_exiting_output_in_use_is_permanent():
    body = validated(ftj(), phase="Running")
    observed, tj = training_observed(body, finished="Failed", reason="PodFailurePolicy", message="exit code 73")
    observed.training_pods = [pod(tj, 0, phase="Failed", exit_code=73, message="OutputInUse: another run's")]
    d = run(body, observed)
    assert (d.phase, d.status["reason"], d.status["message"]) == ("Failed", "OutputInUse", "OutputInUse: another run's")
    # through plain `accelerate launch` (exit 1), before the Job has failed: stopped at once
    observed, tj = training_observed(body, active=1, failed=1)
    observed.training_pods = [pod(tj, 0, phase="Failed", exit_code=1, message="OutputInUse: another run's"),
                              pod(tj, 1)]
    d = run(body, observed)
    assert (d.phase, d.status["reason"]) == ("Failed", "OutputInUse") and d.suspend_training is True


def _other(name: str, uri: str, created: str, namespace: str = "ml", **status) -> dict:
    body = ftj({"output": {"uri": uri}}, status=status, name=name)
    body["metadata"].update(namespace=namespace, uid=f"uid-{name}", creationTimestamp=created)
    return body


def seen(*bodies: dict) -> list:
    """The other FineTuneJobs as the check gets them (loop.apply: outputs.py's watch, else a LIST)."""
    return [output_of(b) for b in bodies]


def test_a_second_unfinished_job_on_one_output_prefix_is_refused_naming_the_first():
    """The other FineTuneJobs come in as observed state (read by loop.apply): the later of two
    unfinished jobs on one prefix (or one inside the other) fails OutputInUse before any child; the first, a
    finished or deleted one, another namespace's pvc:// path and an unrelated prefix do not count."""
    body = ftj()
    body["metadata"]["creationTimestamp"] = "2026-01-01T11:00:00Z"
    first = _other("first", "s3://adapters/demo", "2026-01-01T10:00:00Z", phase="Running")
    d = run(body, Observed(finetunejobs=seen(body, first)))
    assert d.phase == "Failed" and d.status["reason"] == "OutputInUse" and not d.create
    assert "FineTuneJob ml/first (phase Running) writes to s3://adapters/demo" in d.status["message"]
    assert "Set another output.uri" in d.status["message"]
    inner = _other("inner", "s3://adapters/demo/sub/", "2026-01-01T10:00:00Z", namespace="other-team")
    assert run(body, Observed(finetunejobs=seen(inner))).status["reason"] == "OutputInUse"  # s3: every namespace
    later_but_started = _other("later", "s3://adapters/demo/", "2026-01-01T12:00:00Z",
                               conditions=[{"type": "Validated", "status": "Unknown", "reason": "Validating"}])
    assert run(body, Observed(finetunejobs=seen(later_but_started))).status["reason"] == "OutputInUse"

    deleted = _other("deleted", "s3://adapters/demo/", "2026-01-01T10:00:00Z", phase="Running")
    deleted["metadata"]["deletionTimestamp"] = "2026-01-01T10:30:00Z"
    free = [_other("done", "s3://adapters/demo/", "2026-01-01T10:00:00Z", phase="Succeeded"), deleted,
            _other("later", "s3://adapters/demo/", "2026-01-01T12:00:00Z"),
            _other("elsewhere", "s3://adapters/demo-2/", "2026-01-01T10:00:00Z"),
            body]
    assert kinds(run(body, Observed(finetunejobs=seen(*free)))) == ["demo-config", "demo-validate"]
    assert kinds(run(body, Observed())) == ["demo-config", "demo-validate"]  # not read: no refusal

    pvc = ftj({"output": {"uri": "pvc://shared/out/"}})
    pvc["metadata"]["creationTimestamp"] = "2026-01-01T11:00:00Z"
    theirs = _other("theirs", "pvc://shared/out/", "2026-01-01T10:00:00Z", namespace="other-team")
    policy = "2025-01-01T00:00:00Z"  # the admission policy checked who may mount the claim
    assert kinds(run(pvc, Observed(finetunejobs=seen(theirs), admission_policy=policy))) == ["demo-config",
                                                                                             "demo-validate"]
    ours = _other("ours", "pvc://shared/out/", "2026-01-01T10:00:00Z")
    assert run(pvc, Observed(finetunejobs=seen(ours), admission_policy=policy)).status["reason"] == "OutputInUse"


def test_two_jobs_created_in_one_second_go_in_the_order_the_watch_saw_their_creates():
    """creationTimestamp has whole seconds: within one, the resourceVersions of the creates (Output.created_rv)
    decide, not the names, so the job that passed its check before the other existed stays the first."""
    body = ftj()  # named demo, created second (resourceVersion 20)
    body["metadata"]["creationTimestamp"] = "2026-01-01T11:00:00Z"
    zed = _other("zed", "s3://adapters/demo/", "2026-01-01T11:00:00Z")  # created first, a larger name
    assert run(body, Observed(finetunejobs=[output_of(body, 20), output_of(zed, 10)])).status["reason"] == \
        "OutputInUse"
    assert kinds(run(body, Observed(finetunejobs=[output_of(body, 10), output_of(zed, 20)]))) == [
        "demo-config", "demo-validate"]
    # where the creates' order is unknown (a LIST: 0), the names decide, as both jobs' checks see alike
    assert kinds(run(body, Observed(finetunejobs=seen(body, zed)))) == ["demo-config", "demo-validate"]


def test_a_started_job_does_not_look_for_other_jobs():
    from kubetune_operator.reconcile import needs_output_check

    assert needs_output_check(ftj())
    assert not needs_output_check(validated(ftj()))
    assert not needs_output_check(ftj(status={"phase": "Failed"}))


def test_the_network_policy_comes_before_the_workers_and_only_when_enabled():
    """Created with the training Job (never later than its pods), once; KUBETUNE_NETWORK_POLICY=false: never."""
    from dataclasses import replace

    body = validated(ftj())
    observed, _ = training_observed(body)
    observed.training_job = observed.network_policy = observed.service = None
    d = run(body, observed)
    assert kinds(d) == ["demo-ingress", "demo-workers", "demo-train-1"]
    observed.network_policy = d.create[0]
    assert "demo-ingress" not in kinds(run(body, observed))
    observed.network_policy = None
    off = decide(body, observed, NOW, replace(SETTINGS, network_policy=False))
    assert [o["metadata"]["name"] for o in off.create] == ["demo-workers", "demo-train-1"]


# -- attempts: each incident ends the training Job, the next attempt is a new Job; counted by kind ---------


def counted(d: Decision) -> dict:
    """status.attempts as the API server keeps it (a null in the merge patch removes the field)."""
    return {k: v for k, v in d.status["attempts"].items() if v is not None}


def workers(objs: list[dict]) -> list[dict]:
    """The training Jobs among `objs` (the validation Job, finished, is deleted too)."""
    return [o for o in objs if o["metadata"]["labels"][children.LABEL_COMPONENT] == "workers"]


def failed_attempt(body: dict, pods, reason: str = "PodFailurePolicy", message: str = "", **job_kwargs):
    """The current attempt's Job as the Job controller leaves it after a worker failed (backoffLimit 0), with
    `pods(tj)` as its workers."""
    observed, tj = training_observed(body, finished="Failed", reason=reason, message=message, **job_kwargs)
    observed.training_pods = pods(tj)
    return observed, tj


def crashed(tj):  # worker 1 crashed; its peers lost it
    return [pod(tj, 0, phase="Failed", exit_code=76, message="PeerLost: rank 1 is gone"),
            named(pod(tj, 1, phase="Failed", exit_code=1, message="Unexpected: CUDA error"), "x1")]


def test_a_failure_ends_the_attempt_and_the_next_is_a_new_job_after_a_back_off():
    body = validated(ftj(), phase="Running", progress={"step": 12, "totalSteps": 100}, trainingJob={
        "name": "demo-train-1", "uid": "job-demo-train-1"})
    observed, tj = failed_attempt(body, crashed)
    d = run(body, observed)
    assert counted(d) == {"current": 2, "failures": 1, "retryTime": "2026-01-01T12:00:10Z", "lastIncident": (
        "failures: worker 1 (pod x1): exit code 1: Unexpected: CUDA error")}
    assert d.status["trainingJob"] == {"name": "demo-train-2", "uid": None, "recreations": None}  # merge-patched
    assert kinds(d) == [] and d.requeue_after == 10
    assert workers(d.delete) == [tj] and d.release == [tj]
    [event] = [e for e in d.events if e[1] == "WorkerFailed"]
    assert event == ("Warning", "WorkerFailed", "attempt 1 ended by a failure at step 12: worker 1 (pod x1): exit "
                     "code 1: Unexpected: CUDA error (failures 1 of runPolicy.backoffLimit 3); attempt 2, a new "
                     "training Job, resumes from the last checkpoint in 10 s")

    body["status"] = d.status  # the status holds it: the old Job is going, nothing is recounted
    tj["metadata"]["deletionTimestamp"] = "2026-01-01T12:00:01Z"
    observed = Observed(config_map=observed.config_map, validation_job=observed.validation_job,
                        service=observed.service, network_policy=observed.network_policy,
                        previous_jobs=[tj], previous_pods=crashed(tj))
    d = run(body, observed, NOW + timedelta(seconds=4))
    assert kinds(d) == [] and d.requeue_after == 6 and "attempt 2 starts at 2026-01-01T12:00:10Z" in \
        d.status["message"]
    d = run(body, observed, NOW + timedelta(seconds=10))
    assert d.status["attempts"]["failures"] == 1 and kinds(d) == ["demo-train-2"] and d.release == [tj]
    assert children.attempt_of(d.create[0]) == 2 and d.status["attempts"]["retryTime"] is None
    assert not [e for e in d.events if e[1] == "WorkerFailed"]


def test_failures_beyond_the_backoff_limit_fail_the_run_naming_the_last():
    body = validated(ftj({"runPolicy": {"backoffLimit": 1}}), phase="Running",
                     attempts={"current": 2, "failures": 1, "preemptions": 4})
    observed, tj = failed_attempt(body, crashed)
    observed.training_job["metadata"]["name"] = "demo-train-2"
    d = run(body, observed)
    assert (d.phase, d.status["reason"]) == ("Failed", "BackoffLimitExceeded") and d.create == []
    assert d.status["message"] == ("attempt 2 ended by a failure: worker 1 (pod x1): exit code 1: Unexpected: CUDA "
                                   "error; failures 2, more than runPolicy.backoffLimit 1")
    assert d.status["attempts"]["failures"] == 2 and workers(d.delete) == []  # it stays, with its logs


def test_a_permanent_exit_and_the_deadline_are_no_incident():
    body = validated(ftj(), phase="Running")
    observed, _ = failed_attempt(body, lambda tj: [pod(tj, 0, phase="Failed", exit_code=65,
                                                       message="DatasetInvalid: x")])
    d = run(body, observed)
    assert (d.phase, d.status["reason"]) == ("Failed", "DatasetInvalid") and "attempts" not in d.status
    observed, _ = failed_attempt(body, lambda tj: [pod(tj, 0, phase="Failed", exit_code=75)],
                                 reason="DeadlineExceeded", message="Job was active longer than specified deadline")
    d = run(body, observed)
    assert (d.phase, d.status["reason"]) == ("Failed", "DeadlineExceeded") and "attempts" not in d.status


def test_a_preempted_worker_ends_the_attempt_once_it_has_checkpointed():
    body = validated(ftj({"resources": {"workers": 3, "gpusPerWorker": 1}}), phase="Running",
                     progress={"step": 12, "totalSteps": 100})
    observed, tj = training_observed(body, active=3)
    observed.training_pods = [pod(tj, 0), evicted(pod(tj, 1)), pod(tj, 2)]
    d = run(body, observed)  # it writes its checkpoint: the attempt goes on until it has
    assert (d.phase, d.status["reason"]) == ("Running", "WorkerPreempted") and "preemptions" not in d.status
    assert "worker 1 (pod demo-train-1-1-abcde) is being stopped (EvictionByEvictionAPI)" in d.status["message"]

    body["status"] = d.status  # it exits 75 and its peers 76; the Job fails at once (no back-off)
    observed, tj = failed_attempt(body, lambda tj: [
        pod(tj, 0, phase="Failed", exit_code=76), evicted(pod(tj, 1, phase="Failed", exit_code=75)),
        named(pod(tj, 2, phase="Running"), "still-stopping")])
    d = run(body, observed)
    assert counted(d) == {"current": 2, "preemptions": 1, "lastIncident": (
        "preemptions: worker 1 (pod demo-train-1-1-abcde): EvictionByEvictionAPI (Eviction API: evicting)")}
    assert d.create == [] and workers(d.delete) == []  # worker 2 still stops: the Jobs wait for it
    assert (d.phase, d.status["reason"]) == ("Queued", "WaitingForWorkers")
    [event] = [e for e in d.events if e[1] == "WorkerPreempted"]
    assert event[0] == "Normal" and event[2].startswith("attempt 1 ended by a preemption at step 12: worker 1")
    assert "(preemptions 1 of runPolicy.maxPreemptions unlimited); attempt 2" in event[2]

    body["status"] = d.status
    leaving = [named(pod(tj, 2, phase="Running"), "still-stopping")]
    observed = Observed(config_map=observed.config_map, validation_job=observed.validation_job,
                        service=observed.service, network_policy=observed.network_policy, previous_pods=leaving)
    d = run(body, observed)
    assert d.create == [] and "attempt 2 starts once the workers of the previous attempt are gone" in \
        d.status["message"]
    observed.previous_pods = []
    d = run(body, observed)
    assert kinds(d) == ["demo-train-2"] and (d.phase, d.status["reason"]) == ("Queued", "TrainingJobCreated")
    assert d.status["attempts"]["preemptions"] == 1 and "attempt 2" in d.status["message"]


def test_an_evicted_workers_evidence_outlives_its_pod():
    """The Eviction API deletes the pod once it has stopped: its DisruptionTarget is kept in the status while the
    attempt ends, so the peers' exits (76) that remain do not make it the infrastructure's."""
    body = validated(ftj({"resources": {"workers": 2, "gpusPerWorker": 1}}), phase="Running")
    observed, tj = training_observed(body, active=2)
    observed.training_pods = [pod(tj, 0), evicted(pod(tj, 1))]
    d = run(body, observed)
    assert d.status["attempts"]["ending"] == ("preemptions: worker 1 (pod demo-train-1-1-abcde): "
                                              "EvictionByEvictionAPI (Eviction API: evicting)")
    body["status"] = d.status
    observed, _ = failed_attempt(body, lambda tj: [pod(tj, 0, phase="Failed", exit_code=76)])
    d = run(body, observed)
    assert counted(d) == {"current": 2, "preemptions": 1, "lastIncident": d.status["attempts"]["lastIncident"]}
    assert "EvictionByEvictionAPI" in d.status["attempts"]["lastIncident"] and d.status["attempts"]["ending"] is None


def preempted(tj):
    return [evicted(pod(tj, 0, phase="Failed", exit_code=75))]


def test_preemptions_are_unlimited_unless_max_preemptions_says_otherwise():
    body = validated(ftj(), phase="Running", attempts={"current": 41, "preemptions": 40})
    observed, tj = failed_attempt(body, preempted)
    observed.training_job["metadata"]["name"] = "demo-train-41"
    d = run(body, observed)
    assert d.status["attempts"]["preemptions"] == 41 and kinds(d) == ["demo-train-42"]

    body = validated(ftj({"runPolicy": {"maxPreemptions": 2}}), phase="Running",
                     attempts={"current": 3, "preemptions": 2})
    observed, _ = failed_attempt(body, preempted)
    d = run(body, observed)
    assert (d.phase, d.status["reason"]) == ("Failed", "PreemptionLimitExceeded") and d.create == []
    assert d.status["message"].endswith("preemptions 3, more than runPolicy.maxPreemptions 2")


def disrupted(reason: str):
    return lambda tj: [evicted(pod(tj, 0, phase="Failed", exit_code=75), reason), pod(tj, 1, phase="Failed",
                                                                                   exit_code=76)]


def sidecar_oom(tj):
    p = pod(tj, 0, phase="Failed", exit_code=76)
    p["status"]["containerStatuses"].append({"name": "log-shipper", "state": {"terminated": {
        "exitCode": 137, "reason": "OOMKilled"}}})
    return [p]


@pytest.mark.parametrize("pods, evidence", [
    (disrupted("DeletionByTaintManager"), "node lost (not ready or unreachable): DeletionByTaintManager"),
    (disrupted("DeletionByPodGC"), "node lost (the Node is gone): DeletionByPodGC"),
    (lambda tj: [pod(tj, 0, phase="Failed", exit_code=75, message="StorageUnavailable: s3 unreachable")],
     "exit code 75: StorageUnavailable: s3 unreachable"),
    (sidecar_oom, "container log-shipper was killed for memory (OOMKilled)"),
    (lambda tj: [pod(tj, 0, phase="Failed", exit_code=76), pod(tj, 1, phase="Failed", exit_code=76)],
     "the workers lost each other"),
    (lambda tj: [], "the training Job failed with no worker left to say why (boom)"),
])
def test_the_infrastructures_incidents_have_their_own_budget(pods, evidence):
    body = validated(ftj(), phase="Running")
    observed, _ = failed_attempt(body, pods, message="boom")
    d = run(body, observed)
    assert d.status["attempts"]["infrastructure"] == 1 and d.status["attempts"]["current"] == 2
    assert evidence in d.status["attempts"]["lastIncident"]
    assert [e[0] for e in d.events if e[1] == "InfrastructureFailed"] == ["Warning"]

    body = validated(ftj({"runPolicy": {"maxInfrastructureRetries": 1}}), phase="Running",
                     attempts={"current": 2, "infrastructure": 1, "failures": 3})
    d = run(body, failed_attempt(body, pods, message="boom")[0])
    assert (d.phase, d.status["reason"]) == ("Failed", "InfrastructureLimitExceeded") and evidence in \
        d.status["message"]


def test_an_image_that_cannot_be_pulled_ends_the_attempt():
    body = validated(ftj({"runPolicy": {"maxInfrastructureRetries": 0}}), phase="Queued")
    observed, tj = training_observed(body, active=1)
    p = pod(tj, 0, phase="Pending")
    p["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": "ImagePullBackOff",
                                                                "message": "Back-off pulling image trainer:typo"}}
    observed.training_pods = [p]
    d = run(body, observed)  # a Job that never fails by itself: the operator ends it, and its pods with it
    assert (d.phase, d.status["reason"]) == ("Failed", "InfrastructureLimitExceeded")
    assert "ImagePullBackOff: Back-off pulling image trainer:typo" in d.status["message"]
    assert workers(d.delete) == [tj] and d.release == [tj]


def test_earlier_attempts_jobs_are_deleted_and_released():
    body = validated(ftj(), phase="Running", attempts={"current": 3, "preemptions": 2})
    observed, tj = training_observed(body, active=2)
    observed.training_job["metadata"]["name"] = "demo-train-3"
    old = job(desired(body)["training"])
    gone = {**old, "metadata": {**old["metadata"], "deletionTimestamp": "2026-01-01T11:00:00Z"}}
    observed.previous_jobs = [old, gone]
    d = run(body, observed)
    assert workers(d.delete) == [old] and d.release == [old, gone]
    body["status"]["phase"] = "Succeeded"
    assert workers(run(body, observed).delete) == [old]
    observed.previous_pods = [pod(old, 0)]  # still stopping: its Job (and Kueue's Workload) stays until it has
    assert workers(run(body, observed).delete) == []
