"""The FineTuneJob status: its typed model (the CRD's status schema is generated from it) and pure helpers
that summarise observed child objects and the trainer's metrics. No API calls here.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from kubetune_trainer.errors import EXIT_CONFIG_INVALID, EXIT_DATA_INVALID, EXIT_OUTPUT_IN_USE, EXIT_PEER_LOST
from kubetune_trainer.spec import Model
from prometheus_client.parser import text_string_to_metric_families
from pydantic import Field
from pydantic.alias_generators import to_camel


class Phase(StrEnum):
    Pending = "Pending"
    Validating = "Validating"
    Queued = "Queued"
    Running = "Running"
    Suspended = "Suspended"
    Succeeded = "Succeeded"
    Failed = "Failed"


class Reason(StrEnum):
    """Every reason the operator writes itself: status.reason, the conditions' reasons and its Events' reasons.
    A str enum: each value is the string that goes into the status and the Events. Reasons copied from elsewhere
    (a waiting container's, the scheduler's, the Job controller's: BackoffLimitExceeded, DeadlineExceeded) stay
    plain strings."""

    # phases and conditions of a job on its way
    Accepted = "Accepted"  # the validation Job was created
    Pending = "Pending"  # the Validated condition, while its Job is created
    Validating = "Validating"
    ValidationPending = "ValidationPending"
    ValidationRetrying = "ValidationRetrying"
    Validated = "Validated"  # an Event: the validation's data report
    DatasetValid = "DatasetValid"
    TrainingJobCreated = "TrainingJobCreated"
    WaitingForWorkers = "WaitingForWorkers"
    WaitingForAdmission = "WaitingForAdmission"
    WorkloadInactive = "WorkloadInactive"
    Preempted = "Preempted"
    Resuming = "Resuming"
    Suspended = "Suspended"
    Training = "Training"
    Finishing = "Finishing"
    RestartingWorkers = "RestartingWorkers"
    Completed = "Completed"
    # what happened to the workers and the training Job (Events, and some of them the status)
    WorkerPreempted = "WorkerPreempted"
    PeerLost = "PeerLost"
    WorkerFailed = "WorkerFailed"
    WorkersHung = "WorkersHung"
    TrainingJobDeleted = "TrainingJobDeleted"
    TrainingJobRecreated = "TrainingJobRecreated"
    SpecUnreadable = "SpecUnreadable"
    RunPolicyNotApplied = "RunPolicyNotApplied"
    Created = "Created"  # an Event per Job created; the Blocked condition once creating works again
    CreateForbidden = "CreateForbidden"  # Blocked: retried
    QuotaExceeded = "QuotaExceeded"  # Blocked: retried
    Unschedulable = "Unschedulable"  # a pod the scheduler cannot place, when it gives no reason of its own
    # failures
    PolicyDenied = "PolicyDenied"
    DatasetInvalid = "DatasetInvalid"
    OutputInUse = "OutputInUse"
    ConfigInvalid = "ConfigInvalid"
    InvalidChildSpec = "InvalidChildSpec"
    ChildConflict = "ChildConflict"
    TrainingJobLost = "TrainingJobLost"
    PeerLostLoop = "PeerLostLoop"
    Hung = "Hung"
    Failed = "Failed"  # a failed Job whose condition gives no reason


TERMINAL = (Phase.Succeeded, Phase.Failed)
CONDITION_TYPES = ("Validated", "Blocked", "Running", "Suspended", "Succeeded", "Failed")


class Condition(Model):
    type: str = Field(description="Validated, Blocked, Running, Suspended, Succeeded or Failed")
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(description="CamelCase reason, e.g. DatasetInvalid, BackoffLimitExceeded, Hung")
    message: str = ""
    last_transition_time: str = Field(description="RFC 3339 time the status last changed")
    observed_generation: int | None = None


class Progress(Model):
    step: int = 0
    total_steps: int = 0
    epoch: float = 0
    percent: float = Field(0, ge=0, le=100)
    eta_seconds: int | None = None
    eta: str | None = Field(None, description="etaSeconds, for people: 1h02m")
    text: str | None = Field(None, description="step/totalSteps (percent), for kubectl get")


class LastCheckpoint(Model):
    time: str = Field(description="RFC 3339 time of the last uploaded checkpoint")
    count: int = Field(0, description="Checkpoints uploaded by the current workers")
    uri: str = Field(description="Checkpoint prefix; runs resume from its newest complete step-* folder")


class ResultMetrics(Model):
    test: dict[str, float] | None = Field(None, description="The test split's scalar metrics on the fine-tuned model "
                                          "(loss, accuracy, f1, ...; every one is in manifest.json)")
    baseline: dict[str, float] | None = Field(None, description="The same on the base model, before fine-tuning "
                                              "(evaluation.baseline)")


class Result(Model):
    adapter_uri: str = Field(description="Where the adapter (or full model) was published")
    manifest_uri: str
    sha256: str | None = Field(None, description="sha256 of manifest.json, when the trainer reported it")
    task: str | None = Field(None, description="causal-lm, sequence-classification or image-classification")
    selected_step: int | None = Field(None, description="The step whose weights were published (output.select)")
    metrics: ResultMetrics | None = Field(None, description="From rank 0's report; per-class scores and the "
                                          "rest are in manifest.json")
    summary: str | None = Field(None, description="The task's headline test metric, fine-tuned and baseline, for "
                                "kubectl get: accuracy 0.912 (base 0.334)")


class ChildRef(Model):
    name: str
    uid: str | None = None
    recreations: int | None = Field(None, description="Times it was recreated after it vanished mid-run")


class MetricsScrape(Model):
    failures: int = Field(0, description="Scrapes of rank 0's /metrics that failed in a row")
    last_error: str | None = None


class DatasetReport(Model):
    """What the CPU validation found the data to cost, before any GPU starts (its termination message)."""

    samples: int | None = Field(None, description="Training records")
    tokens: int | None = Field(None, description="Tokens of the training records, after truncation")
    trained_tokens: int | None = Field(None, description="Of those, the tokens the loss is computed on (answers, "
                                       "not prompts, unless the whole text is trained)")
    truncated: int | None = Field(None, description="Training records cut at hyperparameters.maxSeqLength")
    sequences: int | None = Field(None, description="Training sequences after packing (the records without it)")
    packing_efficiency: float | None = Field(None, description="Training tokens / (sequences x maxSeqLength)")
    planned_steps: int | None = Field(None, description="Optimizer steps the run will take")
    estimated_seconds: float | None = Field(None, description="Training time estimate: FLOPs / (GPUs x the chart's "
                                            "estimate.gpuTflops); progress.eta refines it once training runs")
    estimated_gpu_hours: float | None = Field(None, alias="estimatedGPUHours",
                                              description="estimatedSeconds x GPUs / 3600")
    cache_uri: str | None = Field(None, description="The tokenized data cache the workers memory-map")


class QueueStatus(Model):
    """Where Kueue has the training Job (spec.scheduling.queueName), from its Workload."""

    local_queue: str = Field(description="spec.scheduling.queueName")
    workload: str | None = Field(None, description="The Workload Kueue made for the training Job")
    cluster_queue: str | None = Field(None, description="The ClusterQueue that admitted it, while admitted")
    admitted: bool = Field(False, description="Kueue has admitted the workload (its quota is reserved)")
    position: int | None = Field(None, description="While pending: 1 = next among this namespace's pending "
                                 "workloads of the LocalQueue")
    pending: int | None = Field(None, description="While pending: this namespace's pending workloads of the "
                                "LocalQueue")
    preemptions: int | None = Field(None, description="Times Kueue preempted the workload (not charged: the workers "
                                    "checkpoint on SIGTERM and resume once readmitted)")


class FineTuneJobStatus(Model):
    phase: Phase | None = None
    reason: str | None = Field(None, description="Why the job is in its phase, e.g. DatasetInvalid")
    message: str | None = None
    observed_generation: int | None = None
    conditions: list[Condition] | None = None
    start_time: str | None = Field(None, description="When the first training worker started running")
    completion_time: str | None = None
    restarts: int | None = Field(
        None, description="Worker failures charged to runPolicy.backoffLimit (the training Job's status.failed); "
        "preemptions and PeerLost exits are not charged")
    preemptions: int | None = Field(
        None, description="Workers stopped by an eviction, a preemption or a node drain (DisruptionTarget); not "
        "charged: the workers checkpoint on SIGTERM and resume")
    peer_lost: int | None = Field(
        None, description="Workers of the training Job that stopped because another one did (exit 76); not charged")
    preempted_pods: list[str] | None = Field(
        None, description="Bookkeeping: the stopping workers already counted in preemptions")
    hang_restarts: int | None = Field(None, description="Restarts after hangTimeoutSeconds with no step")
    restarting_workers: bool | None = Field(None, description="A hang restart is suspending the workers")
    progress: Progress | None = None
    last_progress_time: str | None = Field(None, description="When the step count last increased")
    last_heartbeat_time: str | None = Field(
        None, description="The trainer's last heartbeat (every step, evaluation batch, checkpoint and upload)")
    metrics_scrape: MetricsScrape | None = Field(None, description="Set while scrapes of rank 0 fail")
    training_job: ChildRef | None = Field(None, description="The training Job this operator created")
    queue: QueueStatus | None = Field(None, description="Kueue's view of the training Job, with a queueName")
    validation_attempts: int | None = Field(None, description="Validation Jobs started; transient failures retry")
    dataset: DatasetReport | None = Field(None, description="The validation's report: the data's size, the planned "
                                          "steps and the estimated GPU-hours")
    validation_retry_time: str | None = Field(None, description="When a failed validation is retried")
    train_loss: float | None = None
    eval_loss: float | None = None
    train_metrics: dict[str, float] | None = Field(
        None, description="The objective's own training metrics over the last logging window (objective dpo and "
        "orpo: rewardsAccuracy, rewardsMargin, rewardsChosen, rewardsRejected, ...)")
    tokens_per_second: float | None = None
    tokens_trained: int | None = None
    gpu_seconds: float | None = Field(None, description="GPU time of running workers, brought up to date every 30 s")
    gpus_in_use: int | None = Field(None, description="GPUs of running workers since gpuAccountedAt")
    gpu_accounted_at: str | None = None
    last_checkpoint: LastCheckpoint | None = None
    result: Result | None = None


# -- time ---------------------------------------------------------------------------------------------------


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def human_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# -- conditions ---------------------------------------------------------------------------------------------


def get_condition(status: dict, type_: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), None)


def set_condition(status: dict, type_: str, value: bool | None, reason: str, message: str, generation: int,
                  now: datetime) -> None:
    """Set one condition in place; lastTransitionTime only moves when the True/False/Unknown value does."""
    new = {"type": type_, "status": {True: "True", False: "False", None: "Unknown"}[value], "reason": reason,
           "message": message, "observedGeneration": generation}
    old = get_condition(status, type_)
    same = old and old["status"] == new["status"]
    new["lastTransitionTime"] = old["lastTransitionTime"] if same else rfc3339(now)
    others = [c for c in status.get("conditions") or [] if c.get("type") != type_]
    status["conditions"] = sorted([*others, new], key=lambda c: CONDITION_TYPES.index(c["type"])
                                  if c["type"] in CONDITION_TYPES else len(CONDITION_TYPES))


# -- child objects ------------------------------------------------------------------------------------------


def job_finished(job: dict | None) -> dict | None:
    """The Complete or Failed condition of a batch/v1 Job, if it has finished."""
    for c in (job or {}).get("status", {}).get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            return c
    return None


def terminations(pods: list[dict], container: str) -> list[dict]:
    """`state.terminated` (or lastState) of `container` in each pod, newest first; `disrupted`: the pod was
    stopped by an eviction, a preemption or a drain."""
    found = []
    for pod in pods:
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            if cs.get("name") != container:
                continue
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if term:
                found.append({**term, "pod": pod["metadata"]["name"], "index": completion_index(pod),
                              "disrupted": disruption(pod) is not None})
    return sorted(found, key=lambda t: t.get("finishedAt") or "", reverse=True)


def disruption(pod: dict) -> dict | None:
    """The pod's DisruptionTarget condition: the API server, the scheduler or the kubelet is stopping it (an
    eviction, a preemption, a node drain). The Job's podFailurePolicy does not count such a pod as failed."""
    cond = get_condition(pod.get("status") or {}, "DisruptionTarget")
    return cond if cond and cond.get("status") == "True" else None


def peer_lost(term: dict) -> bool:
    """The worker stopped because another one did (exit 76), and not for a disruption of its own."""
    return term.get("exitCode") == EXIT_PEER_LOST and not term.get("disrupted")


def charged(term: dict) -> bool:
    """A worker failure that the training Job counts against backoffLimit (see children._failure_policy)."""
    return bool(term.get("exitCode")) and not term.get("disrupted") and term.get("exitCode") != EXIT_PEER_LOST


def completion_index(pod: dict) -> str | None:
    meta = pod.get("metadata", {})
    return (meta.get("annotations") or {}).get("batch.kubernetes.io/job-completion-index") or (
        meta.get("labels") or {}).get("batch.kubernetes.io/job-completion-index")


STARTING = {"ContainerCreating", "PodInitializing"}


def pod_problem(pods: list[dict], container: str) -> tuple[str, str] | None:
    """(reason, message) of the first pod that cannot start: a waiting container (ImagePullBackOff,
    CreateContainerConfigError for a missing Secret, ...) or a pod the scheduler cannot place."""
    for pod in pods:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        name = pod["metadata"]["name"]
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if cs.get("name") == container and waiting.get("reason") and waiting["reason"] not in STARTING:
                detail = f": {waiting['message']}" if waiting.get("message") else ""
                return waiting["reason"], f"pod {name}: {waiting['reason']}{detail}"[:1000]
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                reason = c.get("reason") or Reason.Unschedulable
                return reason, f"pod {name} cannot be scheduled: {c.get('message') or reason}"[:1000]
    return None


PERMANENT_REASONS = {EXIT_DATA_INVALID: Reason.DatasetInvalid, EXIT_OUTPUT_IN_USE: Reason.OutputInUse,
                     EXIT_CONFIG_INVALID: Reason.ConfigInvalid}
PERMANENT = frozenset(PERMANENT_REASONS.values())  # reasons no retry can help with


def failure_reason(term: dict) -> str | None:
    """DatasetInvalid/OutputInUse/ConfigInvalid when the trainer failed on purpose: by exit code (`kubetune
    validate`, `kubetune launch`), or by its termination message's prefix, because plain `accelerate launch`
    turns every child failure into exit 1."""
    reason = PERMANENT_REASONS.get(term.get("exitCode"))
    message = (term.get("message") or "").strip()
    return reason or next((r for r in PERMANENT_REASONS.values() if message.startswith(f"{r}:")), None)


def permanent_failure(pods: list[dict], container: str) -> tuple[str, str] | None:
    """(reason, message) of the newest purposeful trainer failure among the pods, if any."""
    for t in terminations(pods, container):
        reason = t.get("exitCode") and failure_reason(t)
        if reason:
            return reason, last_line(t)
    return None


def explain_failure(job: dict, pods: list[dict], container: str) -> tuple[str, str]:
    """(reason, message) for a failed Job: the trainer's own reason and one-line message when it exited on
    purpose (65/73/78), else the Job controller's reason with the last termination message of a worker that
    failed itself (not one that stopped because a peer did)."""
    cond = job_finished(job) or {}
    permanent = permanent_failure(pods, container)
    if permanent:
        return permanent[0], permanent[1] or cond.get("message", "")
    ends = [t for t in terminations(pods, container) if t.get("exitCode")]
    ends = [t for t in ends if charged(t)] or ends
    reason = cond.get("reason") or Reason.Failed
    detail = last_line(ends[0]) if ends else ""
    message = cond.get("message") or reason
    return reason, f"{message}: {detail}" if detail else message


def last_line(term: dict) -> str:
    text = (term.get("message") or "").strip()
    return text.splitlines()[-1][:1000] if text else ""


def success_report(pods: list[dict], container: str) -> dict:
    """Rank 0's termination message after a successful run, when the trainer wrote it as JSON
    ({"manifestUri", "manifestSha256", "steps", "totalSteps", "tokensTrained", "task", "headline", "selectedStep",
    "metrics": {"test": {...}, "baseline": {...}}}: kubetune_trainer.cli.success_message); {} otherwise."""
    for t in terminations(pods, container):
        if t.get("exitCode") == 0 and t.get("index") in ("0", None):
            try:
                doc = json.loads(t.get("message") or "")
            except ValueError:
                continue
            if isinstance(doc, dict):
                return doc
    return {}


def validation_report(pods: list[dict], container: str) -> dict | None:
    """The validation pod's termination message when the trainer wrote it as JSON (kubetune validate: {"valid",
    "splits", "sequences", "packingEfficiency", "plannedSteps", "estimate", "cache", "summary"}); None for an older
    trainer's plain text."""
    ends = terminations(pods, container)
    try:
        doc = json.loads((ends[0].get("message") or "") if ends else "")
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


CACHE_LOCATIONS = ("s3://", "pvc://", "/")  # where dataset.cacheUri may point (a local path: a mounted volume)


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _number(value) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return value if ok else None


def dataset_status(report: dict) -> dict:
    """status.dataset from the validation report: only the fields the status schema has, each only when it is
    there and of its type. Nothing else of the message is copied (it names the data; the cache URI is ours)."""
    def part(key: str) -> dict:
        return report.get(key) if isinstance(report.get(key), dict) else {}

    train, estimate, cache = part("splits").get("train"), part("estimate"), part("cache")
    train = train if isinstance(train, dict) else {}
    uri = cache.get("uri")
    fields = {
        "samples": _count(train.get("samples")), "tokens": _count(train.get("tokens")),
        "trainedTokens": _count(train.get("trainedTokens")), "truncated": _count(train.get("truncated")),
        "sequences": _count(report.get("sequences")), "packingEfficiency": _number(report.get("packingEfficiency")),
        "plannedSteps": _count(report.get("plannedSteps")), "estimatedSeconds": _number(estimate.get("seconds")),
        "estimatedGPUHours": _number(estimate.get("gpuHours")),
        "cacheUri": uri if isinstance(uri, str) and uri.startswith(CACHE_LOCATIONS) and len(uri) <= 2048 else None,
    }
    return {k: v for k, v in fields.items() if v is not None}


def result_from_pods(pods: list[dict], container: str, output_uri: str) -> dict:
    """status.result once training succeeded; the sha256, the task, the published step and the test metrics come
    from rank 0's success report (what a trainer without them leaves out stays out)."""
    res = {"adapterUri": output_uri, "manifestUri": output_uri.rstrip("/") + "/manifest.json"}
    report = success_report(pods, container)
    if report.get("manifestSha256") or report.get("sha256"):
        res["sha256"] = report.get("manifestSha256") or report["sha256"]
    if isinstance(report.get("task"), str):
        res["task"] = report["task"]
    if isinstance(report.get("selectedStep"), int) and not isinstance(report["selectedStep"], bool):
        res["selectedStep"] = report["selectedStep"]
    reported = report.get("metrics") if isinstance(report.get("metrics"), dict) else {}
    metrics = {model: _scalars(reported.get(model)) for model in ("test", "baseline")}
    metrics = {model: values for model, values in metrics.items() if values}
    if metrics:
        res["metrics"] = metrics
    summary = result_summary(metrics, report.get("headline") if isinstance(report.get("headline"), str) else "loss")
    if summary:
        res["summary"] = summary
    return res


def _scalars(values) -> dict[str, float]:
    """The finite numbers of a reported split (the status schema takes numbers only, and JSON no NaN)."""
    if not isinstance(values, dict):
        return {}
    return {str(k): float(v) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def _three(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"


def result_summary(metrics: dict, headline: str) -> str | None:
    """The printer column's text: `accuracy 0.912 (base 0.334)`, `loss 1.234 (base 2.345)`, `loss 1.234` without
    a baseline; None without a test split."""
    test = (metrics.get("test") or {}).get(headline)
    if test is None:
        return None
    base = (metrics.get("baseline") or {}).get(headline)
    return f"{headline} {_three(test)}" + (f" (base {_three(base)})" if base is not None else "")


def final_progress(status: dict, report: dict) -> None:
    """On success, status.progress and tokensTrained say where the run ended (rank 0's success report), not
    what the last scrape saw, which may be many steps earlier or count only the tokens since a resume; no ETA."""
    if isinstance(report.get("tokensTrained"), int):
        status["tokensTrained"] = report["tokensTrained"]
    progress = {k: v for k, v in (status.get("progress") or {}).items() if k not in ("eta", "etaSeconds")}
    step, total = report.get("steps"), report.get("totalSteps")
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        percent = round(100 * min(step / total, 1.0), 1)
        progress.update(step=step, totalSteps=total, percent=percent, text=f"{step}/{total} ({percent:g}%)")
    if progress:
        status["progress"] = progress


# -- trainer metrics ----------------------------------------------------------------------------------------

TRAINER_PREFIX = "kubetune_trainer_"
TRAIN_METRIC = "train_metric:"  # kubetune_trainer_train_metric{metric="x"} is parsed as "train_metric:x"


def parse_trainer_metrics(text: str, job_name: str) -> dict[str, float | str]:
    """The rank-0 trainer's /metrics text -> {"step": 12.0, ..., "phase": "training"} for this job; the objective's
    training metrics as "train_metric:<name>"."""
    values: dict[str, float | str] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("finetunejob") != job_name or not sample.name.startswith(TRAINER_PREFIX):
                continue
            name = sample.name.removeprefix(TRAINER_PREFIX)
            if name == "phase":
                if sample.value == 1:
                    values["phase"] = sample.labels.get("phase", "")
            elif name == "train_metric" and math.isfinite(sample.value):
                values[f"{TRAIN_METRIC}{sample.labels.get('metric', '')}"] = sample.value
            elif name.endswith("_created") or "gpu" in sample.labels or "split" in sample.labels or \
                    not math.isfinite(sample.value):  # per-GPU and evaluation families: not status fields
                continue
            else:
                values[name] = sample.value
    return values


def apply_metrics(status: dict, m: dict, checkpoint_uri: str, now: datetime) -> None:
    """Copy what the trainer reported into status (in place). Zero losses mean "not measured yet"."""
    step, total = int(m.get("step", 0)), int(m.get("total_steps", 0))
    old = status.get("progress") or {}
    percent = round(100 * min(m.get("progress_ratio", step / total if total else 0), 1.0), 1)
    progress = {"step": step, "totalSteps": total, "epoch": round(m.get("epoch", 0), 3), "percent": percent,
                "text": f"{step}/{total} ({percent:g}%)" if total else None}
    if m.get("eta_seconds") is not None and total:
        progress["etaSeconds"] = int(m["eta_seconds"])
        progress["eta"] = human_duration(m["eta_seconds"])
    status["progress"] = {k: v for k, v in progress.items() if v is not None}
    if step > old.get("step", 0) or not status.get("lastProgressTime"):
        status["lastProgressTime"] = rfc3339(now)
    for key, metric, cast in (("trainLoss", "train_loss", float), ("evalLoss", "validation_loss", float),
                              ("tokensPerSecond", "tokens_per_second", float),
                              ("tokensTrained", "tokens_trained_total", int)):
        value = m.get(metric)
        if value is not None and (value > 0 or key == "tokensTrained"):
            status[key] = round(cast(value), 4) if cast is float else cast(value)
    objective = {to_camel(k.removeprefix(TRAIN_METRIC)): round(float(v), 4) for k, v in m.items()
                 if k.startswith(TRAIN_METRIC)}
    if objective:
        status["trainMetrics"] = objective
    beat = m.get("heartbeat_timestamp_seconds")
    if beat:
        status["lastHeartbeatTime"] = rfc3339(datetime.fromtimestamp(beat, UTC))
    stamp = m.get("last_checkpoint_timestamp_seconds")
    if stamp:
        status["lastCheckpoint"] = {"time": rfc3339(datetime.fromtimestamp(stamp, UTC)),
                                    "count": int(m.get("checkpoints_total", 0)), "uri": checkpoint_uri}
