"""One reconcile, as a pure function: (FineTuneJob, observed children, trainer metrics, now) -> Decision.

The state machine is derived from the API only (child objects and the FineTuneJob's own status), never
from operator memory, so a restarted operator picks up where the last one stopped:

    Pending -> Validating -> Queued -> Running -> Succeeded
                   |            ^  |       |
                   v            |  v       v
                 Failed      Suspended   Failed (BackoffLimitExceeded, DeadlineExceeded, Hung, ...)

Succeeded and Failed are sticky: the training Job may be garbage-collected by its TTL afterwards.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime

from kubetune_trainer.config import join_uri
from kubetune_trainer.spec import FineTuneJobSpec
from pydantic import ValidationError

from . import children
from .status import (
    TERMINAL,
    Phase,
    apply_metrics,
    completion_index,
    explain_failure,
    final_progress,
    get_condition,
    job_finished,
    parse_time,
    permanent_failure,
    result_from_pods,
    rfc3339,
    set_condition,
    success_report,
    terminations,
)


@dataclass
class Observed:
    """What exists in the API server for one FineTuneJob (None: absent)."""

    config_map: dict | None = None
    validation_job: dict | None = None
    validation_pods: list[dict] = field(default_factory=list)
    service: dict | None = None
    training_job: dict | None = None
    training_pods: list[dict] = field(default_factory=list)
    trainer_metrics: dict | None = None  # rank 0's /metrics, parsed; None when not scraped or unreachable


@dataclass
class Decision:
    status: dict
    create: list[dict] = field(default_factory=list)  # create if absent (a 409 is fine)
    update: list[dict] = field(default_factory=list)  # replace (the ConfigMap, when its data changed)
    suspend_training: bool | None = None  # set the training Job's spec.suspend
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (Normal|Warning, reason, message)

    @property
    def phase(self) -> str | None:
        return self.status.get("phase")


def running_pods(pods: list[dict]) -> list[dict]:
    return [p for p in pods if p.get("status", {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")]


def rank0_pod(pods: list[dict]) -> dict | None:
    """The running rank-0 worker (it serves the trainer's metrics), if it has an IP yet."""
    return next((p for p in running_pods(pods)
                 if completion_index(p) == "0" and p["status"].get("podIP")), None)


def decide(body: dict, observed: Observed, now: datetime, image: str | None = None) -> Decision:
    meta, old = body["metadata"], body.get("status") or {}
    generation = meta.get("generation", 1)
    d = Decision(status=copy.deepcopy(old))
    d.status["observedGeneration"] = generation
    if old.get("phase") in TERMINAL:
        return d
    try:
        spec = FineTuneJobSpec.model_validate(body.get("spec") or {})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        _finish(d, Phase.Failed, "ConfigInvalid", problems, generation, now)
        return _transition(d, old, now)

    cm = children.config_map(meta, spec)
    if observed.config_map is None:
        d.create.append(cm)
    elif observed.config_map.get("data") != cm["data"]:
        d.update.append(cm)

    image = image or children.default_image()
    validated = get_condition(old, "Validated") or {}
    if validated.get("status") == "True" or _validate(d, meta, spec, observed, generation, now, image):
        _train(d, old, meta, spec, observed, generation, now, image)
    return _transition(d, old, now)


def _validate(d: Decision, meta, spec, observed: Observed, generation: int, now, image: str) -> bool:
    """Run the CPU validation Job; True once the data is known good."""
    job = observed.validation_job
    if job is None:
        d.create.append(children.validation_job(meta, spec, image))
        _set(d, Phase.Pending, "Accepted", "validating the dataset on CPU", generation, now)
        set_condition(d.status, "Validated", None, "Pending", "validation Job created", generation, now)
        return False
    done = job_finished(job)
    if done is None:
        _set(d, Phase.Validating, "Validating", "checking every record on CPU", generation, now)
        set_condition(d.status, "Validated", None, "Validating", "validation Job running", generation, now)
        return False
    if done["type"] == "Failed":
        reason, message = explain_failure(job, observed.validation_pods, children.VALIDATE_CONTAINER)
        reason = reason if reason in ("DatasetInvalid", "ConfigInvalid") else "ValidationFailed"
        set_condition(d.status, "Validated", False, reason, message, generation, now)
        _finish(d, Phase.Failed, reason, message, generation, now)
        return False
    ends = terminations(observed.validation_pods, children.VALIDATE_CONTAINER)
    message = (ends[0].get("message") or "").strip() if ends else ""
    set_condition(d.status, "Validated", True, "DatasetValid", message or "dataset valid", generation, now)
    return True


def _train(d: Decision, old: dict, meta, spec: FineTuneJobSpec, observed: Observed, generation: int, now,
           image: str) -> None:
    run = spec.run_policy
    if observed.service is None:
        d.create.append(children.service(meta, spec))
    job = observed.training_job
    if job is None:
        d.create.append(children.training_job(meta, spec, image))
        if run.suspend:
            _set(d, Phase.Suspended, "Suspended", "spec.runPolicy.suspend is true", generation, now)
        else:
            _set(d, Phase.Queued, "TrainingJobCreated", "training Job created", generation, now)
        return
    pods = observed.training_pods
    d.status["restarts"] = (job.get("status") or {}).get("failed", 0)
    done = job_finished(job)
    if done and done["type"] == "Complete":
        d.status["result"] = result_from_pods(pods, children.TRAINER_CONTAINER, spec.output.uri)
        final_progress(d.status, success_report(pods, children.TRAINER_CONTAINER))
        _finish(d, Phase.Succeeded, "Completed", f"published to {spec.output.uri}", generation, now)
        return
    if done:
        reason, message = explain_failure(job, pods, children.TRAINER_CONTAINER)
        _finish(d, Phase.Failed, reason, message, generation, now)
        return
    permanent = permanent_failure(pods, children.TRAINER_CONTAINER)
    if permanent:  # exit 1 through accelerate launch: the Job would retry; stop it (frees the GPUs)
        d.suspend_training = True
        _finish(d, Phase.Failed, *permanent, generation, now)
        return

    job_suspended = bool(job["spec"].get("suspend"))
    active = (job.get("status") or {}).get("active", 0)
    running = running_pods(pods)
    if run.suspend:
        if not job_suspended:
            d.suspend_training = True
        _set(d, Phase.Suspended, "Suspended", "spec.runPolicy.suspend is true; workers stopped",
             generation, now)
    elif old.get("restartingWorkers"):
        if not job_suspended:
            d.suspend_training = True
        elif not active and not running:
            d.suspend_training = False
            d.status["restartingWorkers"] = False
        _set(d, Phase.Queued, "RestartingWorkers", "restarting the workers from the last checkpoint",
             generation, now)
    elif job_suspended and spec.scheduling.queue_name:
        _set(d, Phase.Queued, "WaitingForAdmission",
             f"waiting for Kueue to admit the workload (queue {spec.scheduling.queue_name})", generation, now)
    elif job_suspended:
        d.suspend_training = False
        _set(d, Phase.Queued, "Resuming", "resuming from the last checkpoint", generation, now)
    elif running:
        _set(d, Phase.Running, "Training", f"{len(running)}/{spec.resources.workers} workers running",
             generation, now)
    else:
        _set(d, Phase.Queued, "WaitingForWorkers", "waiting for worker pods to start", generation, now)

    gpus = spec.resources.gpus_per_worker
    accounted = parse_time(d.status.get("gpuAccountedAt"))
    if running and gpus and accounted:
        d.status["gpuSeconds"] = round(d.status.get("gpuSeconds", 0) + len(running) * gpus *
                                       (now - accounted).total_seconds(), 1)
    d.status["gpuAccountedAt"] = rfc3339(now) if running and gpus else None
    if d.phase != Phase.Running:
        return
    d.status.setdefault("startTime", rfc3339(now))
    if old.get("phase") != Phase.Running or not d.status.get("lastProgressTime"):
        d.status["lastProgressTime"] = rfc3339(now)  # the hang clock starts when the workers do
    if observed.trainer_metrics:
        checkpoint_uri = spec.checkpoint.uri or join_uri(spec.output.uri, "checkpoints/")
        apply_metrics(d.status, observed.trainer_metrics, checkpoint_uri, now)
    _check_hang(d, run.hang_timeout_seconds, generation, now)


def _check_hang(d: Decision, timeout: int | None, generation: int, now: datetime) -> None:
    """No step for hangTimeoutSeconds: restart the workers once (suspend, then resume), then fail."""
    last = parse_time(d.status.get("lastProgressTime"))
    if not timeout or not last or (now - last).total_seconds() <= timeout:
        return
    d.suspend_training = True
    message = f"no training step for {int((now - last).total_seconds())}s (hangTimeoutSeconds {timeout})"
    if d.status.get("hangRestarts", 0) < 1:
        d.status["hangRestarts"] = d.status.get("hangRestarts", 0) + 1
        d.status["restartingWorkers"] = True
        d.events.append(("Warning", "WorkersHung",
                         message + "; restarting the workers from the last checkpoint"))
        _set(d, Phase.Queued, "RestartingWorkers", message + "; restarting the workers", generation, now)
    else:
        _finish(d, Phase.Failed, "Hung", message + " after a restart", generation, now)


def _set(d: Decision, phase: Phase, reason: str, message: str, generation: int, now: datetime) -> None:
    d.status.update(phase=phase.value, reason=reason, message=message)
    for type_, value in (("Running", phase == Phase.Running), ("Suspended", phase == Phase.Suspended)):
        set_condition(d.status, type_, value, reason, message, generation, now)


def _finish(d: Decision, phase: Phase, reason: str, message: str, generation: int, now: datetime) -> None:
    _set(d, phase, reason, message, generation, now)
    d.status["completionTime"] = rfc3339(now)
    d.status["gpuAccountedAt"] = None
    set_condition(d.status, "Succeeded", phase == Phase.Succeeded, reason, message, generation, now)
    set_condition(d.status, "Failed", phase == Phase.Failed, reason, message, generation, now)


def _transition(d: Decision, old: dict, now: datetime) -> Decision:
    """One Kubernetes Event per phase change."""
    d.status = {k: v for k, v in d.status.items() if v is not None}
    if d.phase != old.get("phase") and not any(e[1] == d.status.get("reason") for e in d.events):
        kind = "Warning" if d.phase == Phase.Failed else "Normal"
        message = f"{d.phase}: {d.status.get('message', '')}"
        d.events.append((kind, d.status.get("reason") or d.phase, message))
    return d
