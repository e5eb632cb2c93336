"""One reconcile, as a pure function: (FineTuneJob, observed children and trainer metrics, now, the operator's
settings) -> Decision. No clock, no environment: `now` and the settings (settings.py) come in as arguments.

The state machine is derived from the API only (child objects and the FineTuneJob's own status), never
from operator memory, so a restarted operator picks up where the last one stopped:

    Pending -> Validating -> Queued -> Running -> Succeeded
                   |            ^  |       |
                   v            |  v       v
                 Failed      Suspended   Failed (BackoffLimitExceeded, DeadlineExceeded, Hung, ...)

Succeeded and Failed are sticky. The training Job carries the finalizer `kubetune.io/outcome`, so a Job
deleted by its TTL, by hand or by the garbage collector stays readable until its outcome is in the status;
`status.trainingJob` records what was created, so "created, then gone" is told from "not created yet".
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

from kubetune_api import TERMINAL, FineTuneJobSpec, Phase, Reason, join_uri
from pydantic import ValidationError

from . import children, kueue, policy
from .conditions import get_condition, parse_time, rfc3339, set_condition
from .observe import (
    FAILURE,
    INFRASTRUCTURE,
    PERMANENT,
    PREEMPTION,
    Incident,
    attempt_end,
    completed,
    completion_index,
    disrupted,
    disruption,
    explain_failure,
    job_finished,
    kube_owned,
    permanent_failure,
    pod_problem,
    success_report,
    terminations,
    validation_report,
)
from .progress import (
    apply_metrics,
    checkpoints_from_report,
    dataset_status,
    final_progress,
    quality_message,
    result_from_pods,
)
from .settings import OperatorSettings

GPU_ACCOUNTING_SECONDS = 30  # gpuSeconds is brought up to date at most this often while running
VALIDATION_RETRY_SECONDS = (10, 300)  # first and longest delay before a transient validation failure is retried
ATTEMPT_BACKOFF_SECONDS = (10, 300)  # after a failure or an infrastructure incident: first and longest delay
MAX_RECREATIONS = 1  # a running attempt's training Job that vanished is recreated this often, then the run fails


@dataclass
class Observed:
    """What exists in the API server for one FineTuneJob (None: absent)."""

    config_map: dict | None = None
    validation_job: dict | None = None
    validation_pods: list[dict] = field(default_factory=list)
    service: dict | None = None
    training_job: dict | None = None  # the current attempt's (status.attempts.current)
    training_pods: list[dict] = field(default_factory=list)
    previous_jobs: list[dict] = field(default_factory=list)  # the training Jobs of earlier attempts still there
    previous_pods: list[dict] = field(default_factory=list)  # the workers of earlier attempts still there
    trainer_metrics: dict | None = None  # rank 0's /metrics, parsed, from a recent scrape that succeeded
    scrape_failures: int = 0  # scrapes of rank 0 that failed in a row
    scrape_error: str | None = None
    admission_policy: str | None = None  # since when the API server enforces the admission policy (policy.py)
    # Before the first child (needs_output_check): the FineTuneJobs the operator may list, as of this job's
    # version or later (loop.apply: outputs.py's watch, else a LIST), for the refusal of a second unfinished job
    # on one output prefix. None: not read.
    finetunejobs: list[Output] | None = None
    workloads: list[dict] = field(default_factory=list)  # Kueue's Workloads in the FineTuneJob's namespace
    network_policy: dict | None = None  # children.network_policy

    @property
    def workload(self) -> dict | None:
        """The Workload Kueue made for the training Job (spec.scheduling.queueName), if any."""
        return kueue.of_job(self.workloads, self.training_job)


@dataclass
class Decision:
    """What one reconcile wants done, and the status it writes. It knows the FineTuneJob's generation and the
    reconcile's `now`, which every condition it sets records."""

    status: dict
    generation: int  # the FineTuneJob's metadata.generation: the conditions' observedGeneration
    now: datetime  # the reconcile's clock
    create: list[dict] = field(default_factory=list)  # create if absent (a 409 on our own object is fine)
    update: list[dict] = field(default_factory=list)  # replace (the ConfigMap, when its data changed)
    training_job: str | None = None  # the current attempt's training Job: suspend_training and training_spec
    suspend_training: bool | None = None  # set the training Job's spec.suspend
    workload_patch: tuple[dict, dict] | None = None  # (Kueue Workload, merge patch): deactivate or reactivate it
    training_spec: dict = field(default_factory=dict)  # mutable runPolicy fields to patch into the Job's spec
    delete: list[dict] = field(default_factory=list)  # after the status is written: finished validation Jobs
    release: list[dict] = field(default_factory=list)  # after the status is written: drop the Job's finalizer
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (Normal|Warning, reason, message)
    requeue_after: float | None = None  # reconcile again after this many seconds (a retry is due)
    metrics_url: str | None = None  # rank 0's /metrics while the workers run: the loop scrapes it

    @property
    def phase(self) -> str | None:
        return self.status.get("phase")

    def condition(self, type_: str, value: bool | None, reason: str, message: str) -> None:
        """Set one condition of the status (status.set_condition) at this generation and time."""
        set_condition(self.status, type_, value, reason, message, self.generation, self.now)

    def set_phase(self, phase: Phase, reason: str, message: str) -> None:
        """The phase, its reason and message, and the Running and Suspended conditions that follow from it."""
        self.status.update(phase=phase.value, reason=reason, message=message)
        for type_, value in (("Running", phase == Phase.Running), ("Suspended", phase == Phase.Suspended)):
            self.condition(type_, value, reason, message)

    def finish(self, phase: Phase, reason: str, message: str) -> None:
        """Enter a terminal phase (Succeeded or Failed): stop the GPU clock, record the completion time."""
        self.set_phase(phase, reason, message)
        _account_gpus(self, 0)
        self.status["completionTime"] = rfc3339(self.now)
        self.status.pop("validationRetryTime", None)
        self.condition("Succeeded", phase == Phase.Succeeded, reason, message)
        self.condition("Failed", phase == Phase.Failed, reason, message)

    def event(self, type_: str, reason: str, message: str) -> None:
        """A Kubernetes Event (Normal or Warning) to post once the status is written."""
        self.events.append((type_, reason, message))


def stopped(pods: list[dict]) -> bool:
    """No pod of `pods` runs any more (each has ended, or is gone)."""
    return all(p.get("status", {}).get("phase") in ("Succeeded", "Failed") for p in pods)


def running_pods(pods: list[dict]) -> list[dict]:
    return [p for p in pods if p.get("status", {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")]


def rank0_pod(pods: list[dict]) -> dict | None:
    """The running rank-0 worker (it serves the trainer's metrics), if it has an IP yet."""
    return next((p for p in running_pods(pods)
                 if completion_index(p) == "0" and p["status"].get("podIP")), None)


def deleting(obj: dict | None) -> bool:
    return bool(obj and obj["metadata"].get("deletionTimestamp"))


def decide(body: dict, observed: Observed, now: datetime, settings: OperatorSettings) -> Decision:
    """The reconcile of `body` as things are at `now`, under the operator's `settings` (settings.py)."""
    meta, old = body["metadata"], body.get("status") or {}
    d = Decision(status=copy.deepcopy(old), generation=meta.get("generation", 1), now=now)
    d.status["observedGeneration"] = d.generation
    if old.get("phase") in TERMINAL:
        _clean_up(d, observed)
        return d
    if get_condition(old, "Blocked"):  # a refused create is retried by the loop; this reconcile clears it
        d.condition("Blocked", False, Reason.Created, "")
    try:
        spec = FineTuneJobSpec.model_validate(body.get("spec") or {})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        _unreadable(d, body, observed, problems)
        return _transition(d, old)
    if not get_condition(old, "Validated"):  # before the first child; a job that started once keeps its rights
        denied = policy.violations(meta["namespace"], spec, settings.policy,
                                   policy.author_checked(meta, observed.admission_policy))
        if denied:
            d.finish(Phase.Failed, Reason.PolicyDenied, "; ".join(denied))
            return _transition(d, old)
        taken = output_taken(body, spec, observed.finetunejobs)
        if taken:
            d.finish(Phase.Failed, Reason.OutputInUse, taken)
            return _transition(d, old)
    elif observed.training_job is None:  # runPolicy is mutable: checked again before each training Job
        denied = policy.training_violations(spec, settings.policy,
                                            policy.author_checked(meta, observed.admission_policy))
        if denied:
            d.finish(Phase.Failed, Reason.PolicyDenied, "; ".join(denied))
            return _transition(d, old)

    cm = children.config_map(meta, spec, settings)
    if observed.config_map is None:
        d.create.append(cm)
    elif observed.config_map.get("data") != cm["data"]:
        d.update.append(cm)

    validated = get_condition(old, "Validated") or {}
    if validated.get("status") == "True" or _validate(d, meta, spec, observed, settings):
        _train(d, old, meta, spec, observed, settings)
    _clean_up(d, observed)
    return _transition(d, old)


def needs_output_check(body: dict) -> bool:
    """Whether the reconcile of `body` needs the other FineTuneJobs (Observed.finetunejobs): before its first
    child, as for the policy check; a job that has started keeps its output prefix."""
    status = body.get("status") or {}
    return status.get("phase") not in TERMINAL and not get_condition(status, "Validated")


class Output(NamedTuple):
    """What the output check (output_taken) reads of another FineTuneJob: a few strings, not its body (the
    operator keeps one per FineTuneJob, outputs.py)."""

    uid: str
    namespace: str
    name: str
    created: str  # metadata.creationTimestamp (RFC 3339, UTC: the strings order as the times do)
    uri: str  # spec.output.uri ("" when it has none)
    phase: str  # status.phase ("" before the first status)
    validated: bool  # has a Validated condition: past its own check, it keeps its prefix
    deleting: bool  # metadata.deletionTimestamp is set
    # The resourceVersion of its create where a watch saw it (its ADDED event): orders two jobs created within
    # one second of creationTimestamp. 0 where unknown (listed): those ties go by namespace and name.
    created_rv: int = 0


def output_of(body: dict, created_rv: int = 0) -> Output:
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    uri = ((body.get("spec") or {}).get("output") or {}).get("uri")
    return Output(meta.get("uid", ""), meta.get("namespace", ""), meta.get("name", ""),
                  meta.get("creationTimestamp") or "", uri if isinstance(uri, str) else "", status.get("phase") or "",
                  get_condition(status, "Validated") is not None, bool(meta.get("deletionTimestamp")), created_rv)


def _created(o: Output) -> tuple:
    """The order of two creates: creationTimestamp has whole seconds; within one, the watch's order."""
    return o.created, o.created_rv, o.namespace, o.name


def _output_key(namespace: str, uri: str) -> tuple[str, str]:
    """What two outputs share when one prefix lies in the other: an s3:// prefix is the same for every namespace,
    a pvc:// (or local) path only within one (each namespace has its own claims)."""
    folder = uri.rstrip("/") + "/"
    return ("", folder) if folder.startswith("s3://") else (namespace, folder)


def output_taken(body: dict, spec: FineTuneJobSpec, others: list[Output] | None) -> str | None:
    """Why `body` may not start: another unfinished FineTuneJob writes to its output prefix (the same, or one
    inside the other) and came first (created earlier, or already past validation). None: it may start."""
    meta = body["metadata"]
    scope, mine = _output_key(meta["namespace"], spec.output.uri)
    me = _created(next((o for o in others or [] if o.uid == meta.get("uid")), output_of(body)))
    for other in others or []:
        if other.uid == meta.get("uid") or other.phase in TERMINAL or other.deleting or not other.uri:
            continue
        oscope, theirs = _output_key(other.namespace, other.uri)
        if oscope != scope or not (theirs.startswith(mine) or mine.startswith(theirs)):
            continue
        if _created(other) < me or other.validated:
            return (f"output.uri {spec.output.uri} is in use: FineTuneJob {other.namespace}/{other.name}"
                    f" (phase {other.phase or 'Pending'}) writes to {other.uri} and has not finished; two runs "
                    "on one prefix would overwrite each other. Set another output.uri, or wait until that job has "
                    "finished (or delete it) and create this one again")
    return None


def _clean_up(d: Decision, observed: Observed) -> None:
    """Once the status holds the outcome: delete the validation Job, let go of a deleted training Job."""
    validated = (get_condition(d.status, "Validated") or {}).get("status")
    job = observed.validation_job
    if job and not deleting(job) and job_finished(job) and validated in ("True", "False") and job not in d.delete:
        d.delete.append(job)
    job = observed.training_job
    held = job and children.JOB_FINALIZER in (job["metadata"].get("finalizers") or [])
    if held and deleting(job) and (d.phase in TERMINAL or not job_finished(job)) and job not in d.release:
        d.release.append(job)
    for job in observed.previous_jobs:  # earlier attempts: their incident is in status.attempts
        workers = [p for p in observed.previous_pods if kube_owned(p, job)]
        if not deleting(job) and job not in d.delete and stopped(workers):
            d.delete.append(job)
        if children.JOB_FINALIZER in (job["metadata"].get("finalizers") or []) and job not in d.release:
            d.release.append(job)


def _validate(d: Decision, meta, spec, observed: Observed, settings: OperatorSettings) -> bool:
    """Run the CPU validation Job; True once the data is known good. Transient failures are retried until
    status.validationAttempts (the Jobs created) reaches settings.validation_max_attempts: then the job fails
    ValidationFailed with the last failure's reason and message."""
    job, old, now = observed.validation_job, d.status, d.now
    attempts = old.get("validationAttempts", 0)
    retry_at = parse_time(old.get("validationRetryTime"))
    if job is None or (deleting(job) and retry_at):
        if retry_at and now < retry_at:
            d.requeue_after = (retry_at - now).total_seconds()
            return False
        if job is None:
            d.create.append(children.validation_job(meta, spec, settings))
            d.status["validationAttempts"] = attempts + 1
            d.status.pop("validationRetryTime", None)
            again = f" (attempt {attempts + 1})" if attempts else ""
            d.set_phase(Phase.Pending, Reason.Accepted, f"validating the dataset on CPU{again}")
            d.condition("Validated", None, Reason.Pending, "validation Job created")
        return False
    done = completed(job, observed.validation_pods)
    if done is None:
        problem = pod_problem(observed.validation_pods, children.VALIDATE_CONTAINER)
        if problem:
            d.set_phase(Phase.Pending, *problem)
        elif running_pods(observed.validation_pods) or terminations(observed.validation_pods,
                                                                   children.VALIDATE_CONTAINER):
            d.set_phase(Phase.Validating, Reason.Validating, "checking every record on CPU")
        elif d.status.get("reason") != Reason.Accepted:  # just created: "Accepted" says enough until the pod runs
            d.set_phase(Phase.Pending, Reason.ValidationPending, "waiting for the validation pod to start")
        d.condition("Validated", None, Reason.Validating, "validation Job running")
        return False
    if done["type"] == "Failed":
        reason, message = explain_failure(job, observed.validation_pods, children.VALIDATE_CONTAINER)
        if reason in PERMANENT:
            d.condition("Validated", False, reason, message)
            d.finish(Phase.Failed, reason, message)
            return False
        if retry_at:  # this failure was handled: its Job is being deleted, the retry is scheduled
            d.requeue_after = max((retry_at - now).total_seconds(), 1)
            d.delete.append(job)
            return False
        if max(attempts, 1) >= settings.validation_max_attempts:  # counted in the status, never in memory
            message = (f"validation failed {max(attempts, 1)} times, as many as the operator tries "
                       f"(validation.maxAttempts); the last: {reason}: {message}")
            d.condition("Validated", False, Reason.ValidationFailed, message)
            d.finish(Phase.Failed, Reason.ValidationFailed, message)
            return False
        first, longest = VALIDATION_RETRY_SECONDS
        delay = min(first * 2 ** max(attempts - 1, 0), longest)
        message = f"attempt {max(attempts, 1)} failed ({message}); retrying in {delay}s"
        d.status["validationRetryTime"] = rfc3339(now + timedelta(seconds=delay))
        d.condition("Validated", None, Reason.ValidationRetrying, message)
        d.set_phase(Phase.Pending, Reason.ValidationRetrying, message)
        d.event("Warning", Reason.ValidationRetrying, message)
        d.delete.append(job)
        d.requeue_after = delay
        return False
    report = validation_report(observed.validation_pods, children.VALIDATE_CONTAINER)
    if report is None:  # an older trainer's plain text: the message as it is
        ends = terminations(observed.validation_pods, children.VALIDATE_CONTAINER)
        message = (ends[0].get("message") or "").strip() if ends else ""
    else:
        summary = report.get("summary")
        message = summary.strip()[:1000] if isinstance(summary, str) else ""
        d.status["dataset"] = dataset_status(report) or None
        if message:
            d.event("Normal", Reason.Validated, message)
        quality = quality_message((d.status["dataset"] or {}).get("quality"))
        if quality:  # once: the validation passes once
            d.event("Warning", Reason.DataQuality, f"data quality: {quality}")
            message = f"{message or 'dataset valid'}; data quality: {quality}"
    d.condition("Validated", True, Reason.DatasetValid, message or "dataset valid")
    d.status.pop("validationRetryTime", None)
    return True


def _train(d: Decision, old: dict, meta, spec: FineTuneJobSpec, observed: Observed,
           settings: OperatorSettings) -> None:
    run, now = spec.run_policy, d.now
    if settings.network_policy and observed.network_policy is None:  # before the workers: they never run unguarded
        d.create.append(children.network_policy(meta, settings))
    if observed.service is None:
        d.create.append(children.service(meta, spec, settings))
    job = observed.training_job
    if job is None:
        _create_training_job(d, old, meta, spec, observed, settings)
        return
    d.training_job = job["metadata"]["name"]
    pods = observed.training_pods
    done = completed(job, pods)
    if done and done["type"] == "Complete":
        _succeed(d, pods, spec.output.uri)
        return
    permanent = permanent_failure(pods, children.TRAINER_CONTAINER)
    if permanent:  # exit 1 through accelerate launch: the Job would retry; stop it (frees the GPUs)
        if not done:
            _stop_workers(d, spec, observed, "failed")
        d.finish(Phase.Failed, *permanent)
        return
    queue, workload = spec.scheduling.queue_name, observed.workload
    evicted = kueue.incident(workload) if queue else None
    attempts = d.status.get("attempts") or {}
    kind, _, evidence = (attempts.get("ending") or "").partition(": ")
    seen = Incident(kind, evidence) if evidence else None
    incident = None if deleting(job) else attempt_end(job, pods, children.TRAINER_CONTAINER, evicted, seen)
    if incident:
        _next_attempt(d, meta, spec, observed, incident, settings)
        return
    if done:
        reason, message = explain_failure(job, pods, children.TRAINER_CONTAINER)
        d.finish(Phase.Failed, reason, message)
        return
    if deleting(job) and run.suspend:  # nothing to resume yet: once it is gone, a suspended Job replaces it
        d.set_phase(Phase.Suspended, Reason.Suspended, "spec.runPolicy.suspend is true; workers stopped")
        return
    if deleting(job):
        message = (f"training Job {job['metadata']['name']} was deleted before the run finished; it is "
                   "recreated once and resumes from the last checkpoint")
        d.event("Warning", Reason.TrainingJobDeleted, message)
        d.set_phase(Phase.Queued, Reason.TrainingJobDeleted, message)
        return
    d.training_spec = {k: v for k, v in children.mutable_job_spec(spec).items() if job["spec"].get(k) != v}

    job_suspended = bool(job["spec"].get("suspend"))
    active = (job.get("status") or {}).get("active", 0)
    running = running_pods(pods)
    stopping = [p for p in pods if disruption(p)]
    if stopping and not seen:  # kept: the pod, and its condition, are gone once it has stopped
        found = disrupted(pods)
        d.status.setdefault("attempts", {"current": attempt(old)})["ending"] = f"{found.kind}: {found.message}"[:1000]
    problem = pod_problem(pods, children.TRAINER_CONTAINER)
    if queue:
        d.status["queue"] = kueue.queue_status(queue, workload, observed.workloads)
    if run.suspend:
        _stop_workers(d, spec, observed, "suspend")
        released = "; its Kueue workload is deactivated (no quota held)" if queue else ""
        d.set_phase(Phase.Suspended, Reason.Suspended, f"spec.runPolicy.suspend is true; workers stopped{released}")
    elif old.get("restartingWorkers"):
        if not (job_suspended and not active and not running):
            _stop_workers(d, spec, observed, "restart")
        else:
            _start_workers(d, spec, observed)
            d.status["restartingWorkers"] = False
        d.set_phase(Phase.Queued, Reason.RestartingWorkers, "restarting the workers from the last checkpoint")
    elif queue and (job_suspended or not (workload is None or kueue.condition(workload, "QuotaReserved"))):
        _start_workers(d, spec, observed)  # a workload the operator deactivated goes back in its queue
        d.set_phase(Phase.Queued, *_waiting(workload, d.status))
    elif job_suspended:
        _start_workers(d, spec, observed)
        d.set_phase(Phase.Queued, Reason.Resuming, "resuming from the last checkpoint")
    elif stopping:
        p, cond = stopping[0], disruption(stopping[0])
        message = (f"worker {completion_index(p)} (pod {p['metadata']['name']}) is being stopped "
                   f"({cond.get('reason') or 'DisruptionTarget'}); the workers write a checkpoint, then the next "
                   f"attempt resumes from it ({len(running)}/{spec.resources.workers} workers running)")
        d.set_phase(Phase.Running if running else Phase.Queued, Reason.WorkerPreempted, message)
    elif problem:
        phase = Phase.Running if running else Phase.Queued
        d.set_phase(phase, problem[0], problem[1])
    elif running:
        d.set_phase(Phase.Running, Reason.Training, f"{len(running)}/{spec.resources.workers} workers running")
    elif (job.get("status") or {}).get("succeeded"):
        d.set_phase(Phase.Running, Reason.Finishing, "the workers have finished; waiting for the Job to complete")
    else:
        d.set_phase(Phase.Queued, Reason.WaitingForWorkers, "waiting for worker pods to start")

    _account_gpus(d, len(running) * spec.resources.gpus_per_worker)
    if d.phase != Phase.Running:
        return
    rank0 = rank0_pod(pods)
    if rank0:  # the trainer's /metrics, on the port the operator's config gave it (children.trainer_config)
        d.metrics_url = f"http://{rank0['status']['podIP']}:{settings.trainer_metrics_port}/metrics"
    d.status.setdefault("startTime", rfc3339(now))
    attempts = d.status.setdefault("attempts", {"current": attempt(old)})
    attempts.setdefault("startTime", rfc3339(now))
    if old.get("phase") != Phase.Running or not d.status.get("lastProgressTime"):
        d.status["lastProgressTime"] = rfc3339(now)  # the hang clock starts when the workers do
    if observed.trainer_metrics:
        checkpoint_uri = spec.checkpoint.uri or join_uri(spec.output.uri, "checkpoints/")
        apply_metrics(d.status, observed.trainer_metrics, checkpoint_uri, now)
    _scrape_health(d, observed)
    if observed.trainer_metrics:  # positive evidence only: an unreachable trainer is never called hung
        _check_hang(d, spec, observed)


def attempt(status: dict) -> int:
    """The current training attempt's number (status.attempts.current; 1 before the first)."""
    return (status.get("attempts") or {}).get("current") or 1


# The budget of each kind of incident: (its runPolicy field, the reason when exhausted, the Event's reason)
BUDGETS = {
    PREEMPTION: ("maxPreemptions", Reason.PreemptionLimitExceeded, Reason.WorkerPreempted),
    INFRASTRUCTURE: ("maxInfrastructureRetries", Reason.InfrastructureLimitExceeded, Reason.InfrastructureFailed),
    FAILURE: ("backoffLimit", Reason.BackoffLimitExceeded, Reason.WorkerFailed),
}
INCIDENT_WORDS = {PREEMPTION: "a preemption", INFRASTRUCTURE: "the infrastructure", FAILURE: "a failure"}


def budget(spec: FineTuneJobSpec, kind: str) -> int | None:
    """How many attempts runPolicy allows to end by `kind` before the run fails; None: unlimited."""
    run = spec.run_policy
    return {PREEMPTION: run.max_preemptions, INFRASTRUCTURE: run.max_infrastructure_retries,
            FAILURE: run.backoff_limit}[kind]


def _next_attempt(d: Decision, meta: dict, spec: FineTuneJobSpec, observed: Observed, incident: Incident,
                  settings: OperatorSettings) -> None:
    """The current attempt ended (or must end) for `incident`: count it by kind (status first, then one Event
    naming the kind), end its Job (deleted once the status holds the count) and, within the kind's budget, go on
    with the next attempt, a new Job created as soon as the old one's workers are gone; else fail the run."""
    job, number = observed.training_job, attempt(d.status)
    attempts = d.status.setdefault("attempts", {})
    count = attempts.get(incident.kind, 0) + 1
    first, longest = ATTEMPT_BACKOFF_SECONDS  # a crash loop must not spend its budget in seconds
    delay = 0 if incident.kind == PREEMPTION else min(first * 2 ** (count - 1), longest)
    attempts.update({incident.kind: count, "current": number, "ending": None, "startTime": None,
                     "retryTime": rfc3339(d.now + timedelta(seconds=delay)) if delay else None,
                     "lastIncident": f"{incident.kind}: {incident.message}"[:1000]})
    field_, exhausted, event = BUDGETS[incident.kind]
    limit = budget(spec, incident.kind)
    step = (d.status.get("progress") or {}).get("step")
    at = f" at step {step}" if step else ""
    ended = f"attempt {number} ended by {INCIDENT_WORDS[incident.kind]}{at}: {incident.message}"
    of = f"{count} of runPolicy.{field_} {'unlimited' if limit is None else limit}"
    if limit is not None and count > limit:
        if not job_finished(job):  # its workers stop, its quota goes back to the queue
            d.delete.append(job)
            d.release.append(job)
        d.finish(Phase.Failed, exhausted, f"{ended}; {incident.kind} {count}, more than runPolicy.{field_} {limit}")
        return
    if stopped(observed.training_pods):  # else later (_clean_up): its Workload keeps the quota while they stop
        d.delete.append(job)
        d.release.append(job)
    attempts["current"] = number + 1
    # nulls: the status is merge-patched, and the old attempt's uid must not pass for the new one's
    d.status["trainingJob"] = {"name": children.Names(meta["name"]).training(number + 1), "uid": None,
                               "recreations": None}
    d.status.pop("preemptedPods", None)
    kind = "Normal" if incident.kind == PREEMPTION else "Warning"
    later = f" in {delay} s" if delay else ""
    d.event(kind, event, f"{ended} ({incident.kind} {of}); attempt {number + 1}, a new training Job, resumes from "
            f"the last checkpoint{later}")
    d.set_phase(Phase.Queued, Reason.WaitingForWorkers,
                f"attempt {number + 1} starts once the workers of attempt {number} are gone ({incident.kind}: "
                f"{incident.message})"[:1000])
    if stopped(observed.training_pods):
        _create_training_job(d, d.status, meta, spec, observed, settings)  # they are: no reconcile to wait for


def _create_training_job(d: Decision, old: dict, meta, spec, observed: Observed,
                         settings: OperatorSettings) -> None:
    """The current attempt's training Job is absent: not created yet (a new attempt: once the previous one's
    workers are gone), or created and then deleted before its outcome was read."""
    record, number = old.get("trainingJob") or {}, attempt(old)
    name = children.Names(meta["name"]).training(number)
    queue = spec.scheduling.queue_name
    if spec.run_policy.suspend and queue:  # a Job in the queue would be admitted: it holds no quota until resumed
        d.set_phase(Phase.Suspended, Reason.Suspended,
                    f"spec.runPolicy.suspend is true; the training Job goes to LocalQueue {queue} once it is false")
        return
    retry_at = parse_time((old.get("attempts") or {}).get("retryTime"))
    if retry_at and d.now < retry_at:  # the back-off after a failure or an infrastructure incident
        d.requeue_after = (retry_at - d.now).total_seconds()
        d.set_phase(Phase.Queued, Reason.WaitingForWorkers,
                    f"attempt {number} starts at {rfc3339(retry_at)} (back-off after {old['attempts']['lastIncident']})"
                    [:1000])
        return
    leaving = [p for p in observed.previous_pods if not stopped([p])]
    if leaving:  # a worker of an earlier attempt still writes its checkpoint (or holds the rendezvous port)
        d.set_phase(Phase.Queued, Reason.WaitingForWorkers,
                    f"attempt {number} starts once the workers of the previous attempt are gone "
                    f"({len(leaving)} still stopping)")
        return
    if record.get("uid"):
        recreations = record.get("recreations", 0)
        if recreations >= MAX_RECREATIONS:
            d.finish(Phase.Failed, Reason.TrainingJobLost,
                     f"training Job {name} was deleted before the run finished, again after it was recreated; "
                     "create a new FineTuneJob to train again")
            return
        message = (f"training Job {name} is gone before its outcome was seen; recreating it once (the trainer "
                   "resumes from the last checkpoint, or reports the adapter it already published)")
        d.event("Warning", Reason.TrainingJobRecreated, message)
        d.status["trainingJob"] = {"name": name, "recreations": recreations + 1}
    d.create.append(children.training_job(meta, spec, settings, number))
    d.status.setdefault("attempts", {}).update(current=number, retryTime=None)
    if spec.run_policy.suspend:
        d.set_phase(Phase.Suspended, Reason.Suspended, "spec.runPolicy.suspend is true")
    else:
        d.set_phase(Phase.Queued, Reason.TrainingJobCreated,
                    f"training Job {name} created" + (f" (attempt {number})" if number > 1 else ""))


def _stop_workers(d: Decision, spec: FineTuneJobSpec, observed: Observed, why: str) -> None:
    """Stop the workers (they checkpoint on SIGTERM): suspend the training Job, or, when Kueue owns its
    spec.suspend (a queueName), deactivate its Workload: Kueue then evicts it and suspends the Job itself."""
    workload = observed.workload if spec.scheduling.queue_name else None
    if workload is not None:
        if kueue.active(workload):
            d.workload_patch = (workload, kueue.deactivate(why))
    elif not observed.training_job["spec"].get("suspend"):
        d.suspend_training = True


def _start_workers(d: Decision, spec: FineTuneJobSpec, observed: Observed) -> None:
    """Undo _stop_workers: unsuspend the Job, or put a Workload the operator deactivated back in its queue."""
    if spec.scheduling.queue_name:
        if kueue.deactivated_by_us(observed.workload):
            d.workload_patch = (observed.workload, kueue.reactivate())
    elif observed.training_job["spec"].get("suspend"):
        d.suspend_training = False


def _waiting(workload: dict | None, status: dict) -> tuple[str, str]:
    """(reason, message) while Kueue holds the training Job; `status` holds status.queue already."""
    evicted = kueue.eviction(workload)
    waiting = kueue.waiting_message(status["queue"], workload)
    if workload is not None and not kueue.active(workload) and not kueue.deactivated_by_us(workload):
        return Reason.WorkloadInactive, (
            f"the Kueue workload {workload['metadata']['name']} was deactivated, not by the operator"
            + (f" ({evicted[1]})" if evicted and evicted[1] else "") +
            "; set its spec.active to true to queue it again")
    if evicted and evicted[0] == kueue.PREEMPTED:  # counted once Kueue has suspended the Job (_next_attempt)
        step = (status.get("progress") or {}).get("step")
        why = f" ({evicted[1]})" if evicted[1] else ""
        return Reason.Preempted, (f"preempted by Kueue{f' at step {step}' if step else ''}{why}; the workers write "
                                  f"a checkpoint on SIGTERM and the next attempt resumes from it; {waiting}")
    return Reason.WaitingForAdmission, waiting


def _succeed(d: Decision, pods: list[dict], output_uri: str) -> None:
    d.status["result"] = result_from_pods(pods, children.TRAINER_CONTAINER, output_uri)
    report = success_report(pods, children.TRAINER_CONTAINER)
    final_progress(d.status, report)
    checkpoints = checkpoints_from_report(report)
    if checkpoints:
        d.status["checkpoints"] = checkpoints
    d.finish(Phase.Succeeded, Reason.Completed, f"published to {output_uri}")


def _unreadable(d: Decision, body: dict, observed: Observed, problems: str) -> None:
    """A spec this operator cannot parse (say, a newer CRD). Without workers the job fails ConfigInvalid;
    running workers are never abandoned: their Job is still followed to its end, and the status says so."""
    job = observed.training_job
    if job is None or deleting(job):
        d.finish(Phase.Failed, Reason.ConfigInvalid, problems)
        return
    done = job_finished(job)
    output = ((body.get("spec") or {}).get("output") or {}).get("uri", "")
    if done and done["type"] == "Complete":
        _succeed(d, observed.training_pods, output)
    elif done:
        d.finish(Phase.Failed, *explain_failure(job, observed.training_pods, children.TRAINER_CONTAINER))
    else:
        message = (f"the operator cannot read this spec ({problems}); the workers keep running and their Job "
                   "is still supervised to its end (no spec changes are applied)")
        d.status.update(reason=Reason.SpecUnreadable, message=message)
        if (get_condition(body.get("status") or {}, "Running") or {}).get("reason") != Reason.SpecUnreadable:
            d.event("Warning", Reason.SpecUnreadable, message)
        d.condition("Running", d.phase == Phase.Running, Reason.SpecUnreadable, message)


def _account_gpus(d: Decision, gpus: int) -> None:
    """gpuSeconds += gpusInUse x the time since gpuAccountedAt, brought up to date when the number of GPUs in
    use changes and every GPU_ACCOUNTING_SECONDS (not at every reconcile, which would rewrite the status)."""
    now, accounted, before = d.now, parse_time(d.status.get("gpuAccountedAt")), d.status.get("gpusInUse") or 0
    elapsed = (now - accounted).total_seconds() if accounted else 0
    if accounted and (gpus == before and elapsed < GPU_ACCOUNTING_SECONDS):
        return
    if accounted and before:
        d.status["gpuSeconds"] = round(d.status.get("gpuSeconds", 0) + before * elapsed, 1)
    d.status["gpusInUse"] = gpus or None
    d.status["gpuAccountedAt"] = rfc3339(now) if gpus else None


def _scrape_health(d: Decision, observed: Observed) -> None:
    if observed.scrape_failures:
        d.status["metricsScrape"] = {"failures": observed.scrape_failures,
                                     "lastError": (observed.scrape_error or "")[:300]}
    else:
        d.status.pop("metricsScrape", None)


def _check_hang(d: Decision, spec: FineTuneJobSpec, observed: Observed) -> None:
    """No heartbeat and no step for hangTimeoutSeconds from a reachable trainer: restart the workers once
    (stop them, then start them again), then fail."""
    timeout, now = spec.run_policy.hang_timeout_seconds, d.now
    seen = [t for t in (parse_time(d.status.get("lastProgressTime")), parse_time(d.status.get("lastHeartbeatTime")))
            if t]
    last = max(seen) if seen else None
    if not timeout or not last or (now - last).total_seconds() <= timeout:
        return
    message = f"no heartbeat from the trainer for {int((now - last).total_seconds())}s (hangTimeoutSeconds {timeout})"
    if d.status.get("hangRestarts", 0) < 1:
        d.status["hangRestarts"] = d.status.get("hangRestarts", 0) + 1
        d.status["restartingWorkers"] = True
        _stop_workers(d, spec, observed, "restart")
        d.event("Warning", Reason.WorkersHung, message + "; restarting the workers from the last checkpoint")
        d.set_phase(Phase.Queued, Reason.RestartingWorkers, message + "; restarting the workers")
    else:
        _stop_workers(d, spec, observed, "failed")
        d.finish(Phase.Failed, Reason.Hung, message + " after a restart")


# -- what the loop reports when acting on a Decision failed ------------------------------------------------


def refused(body: dict, d: Decision, obj: dict, status: int, message: str) -> Decision:
    """A child create the API server refused. 400/422 (only the child's own validation catches it, e.g. an
    invalid toleration) end the job InvalidChildSpec; 403 (RBAC, quota, admission) is retried by the loop
    with a growing delay and shown as the Blocked condition and a Warning Event."""
    what = f"{obj['kind']} {obj['metadata']['name']}"
    if status in (400, 422):
        d.finish(Phase.Failed, Reason.InvalidChildSpec, f"the API server refused the {what}: {message}")
    else:
        reason = Reason.QuotaExceeded if "quota" in message.lower() else Reason.CreateForbidden
        text = f"the API server refused to create the {what} (HTTP {status}): {message}; retrying"
        d.condition("Blocked", True, reason, text)
        d.status.update(reason=reason, message=text)
        d.event("Warning", reason, text)
    return _transition(d, body.get("status") or {})


def conflict(body: dict, d: Decision, obj: dict, owner: str) -> Decision:
    """A child's name is taken by an object this FineTuneJob does not own."""
    what = f"{obj['kind']} {obj['metadata']['name']}"
    d.finish(Phase.Failed, Reason.ChildConflict,
             f"{what} already exists and is not owned by this FineTuneJob ({owner}); delete it, or create the "
             "FineTuneJob under another name")
    return _transition(d, body.get("status") or {})


def _finite(value):
    """The value with NaN and infinities dropped: they never reach the status patch."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items() if not (isinstance(v, float) and not math.isfinite(v))}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _transition(d: Decision, old: dict) -> Decision:
    """One Kubernetes Event per phase change."""
    d.status = _finite({k: v for k, v in d.status.items() if v is not None})
    if d.phase != old.get("phase") and not any(e[1] == d.status.get("reason") for e in d.events):
        kind = "Warning" if d.phase == Phase.Failed else "Normal"
        message = f"{d.phase}: {d.status.get('message', '')}"
        d.event(kind, d.status.get("reason") or d.phase, message)
    return d
