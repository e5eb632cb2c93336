"""The state machine, one reconcile at a time: (FineTuneJob, observed children, metrics, now) -> Decision."""

from __future__ import annotations

from datetime import timedelta

from kubetune_operator import children
from kubetune_operator.reconcile import Decision, Observed, decide
from kubetune_operator.status import FineTuneJobStatus, get_condition
from kubetune_trainer.spec import FineTuneJobSpec

from .builders import NOW, ftj, job, pod

IMAGE = "trainer:test"


def desired(body: dict) -> dict:
    meta, spec = body["metadata"], FineTuneJobSpec.model_validate(body["spec"])
    return {
        "cm": children.config_map(meta, spec),
        "validation": children.validation_job(meta, spec, IMAGE),
        "service": children.service(meta, spec),
        "training": children.training_job(meta, spec, IMAGE),
    }


def run(body: dict, observed: Observed, now=NOW) -> Decision:
    d = decide(body, observed, now, IMAGE)
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
    d = run(body, Observed(config_map=c["cm"], validation_job=job(c["validation"], active=1)))
    assert d.create == [] and d.update == [] and d.phase == "Validating"


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
    assert "demo-train" not in kinds(d) and "demo-workers" not in kinds(d)
    assert get_condition(d.status, "Validated")["status"] == "False"
    assert get_condition(d.status, "Failed")["status"] == "True"
    assert d.events == [("Warning", "DatasetInvalid", f"Failed: {message}")]
    assert d.status["completionTime"]


def test_validator_crash_is_validation_failed():
    body = ftj()
    c = desired(body)
    vj = job(
        c["validation"], finished="Failed", reason="BackoffLimitExceeded", message="Job has reached the limit"
    )
    d = run(
        body,
        Observed(
            config_map=c["cm"],
            validation_job=vj,
            validation_pods=[pod(vj, exit_code=1, message="boom", container="validate")],
        ),
    )
    assert d.status["reason"] == "ValidationFailed" and "boom" in d.status["message"]


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
    assert kinds(d) == ["demo-workers", "demo-train"]
    assert get_condition(d.status, "Validated")["message"] == "dataset valid: train 100 samples"
    assert d.phase == "Queued"


def test_validation_is_not_rerun_once_passed():
    body = validated(ftj())
    d = run(body, Observed(config_map=desired(body)["cm"]))  # the validation Job was TTL-deleted
    assert "demo-validate" not in kinds(d) and "demo-train" in kinds(d)


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
    body = validated(ftj(), phase="Running", gpuAccountedAt="2026-01-01T11:59:00Z", gpuSeconds=10.0)
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
    report = '{"manifestSha256": "ab12", "steps": 60, "totalSteps": 60, "tokensTrained": 1800}'
    observed.training_pods = [pod(tj, 0, phase="Succeeded", exit_code=0, message=report)]
    d = run(body, observed)
    assert d.phase == "Succeeded"
    assert d.status["tokensTrained"] == 1800
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


def test_backoff_limit_reports_the_last_message():
    body = validated(ftj(), phase="Running")
    observed, tj = training_observed(
        body,
        finished="Failed",
        reason="BackoffLimitExceeded",
        message="Job has reached the specified backoff limit",
        failed=4,
    )
    observed.training_pods = [pod(tj, 0, phase="Failed", exit_code=1, message="Unexpected: CUDA OOM")]
    d = run(body, observed)
    assert d.status["reason"] == "BackoffLimitExceeded" and "CUDA OOM" in d.status["message"]
    assert d.status["restarts"] == 4


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

    # and hangs again: fail
    body["status"] = d.status
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


def test_other_worker_failures_are_retried():
    body = validated(ftj(), phase="Running")
    observed, tj = training_observed(body, active=2, failed=1)
    observed.training_pods = [pod(tj, 0, phase="Failed", exit_code=1, message="Unexpected: OOM"),
                              pod(tj, 0), pod(tj, 1)]
    d = run(body, observed)
    assert d.phase == "Running" and d.suspend_training is None and d.status["restarts"] == 1
