"""The FineTuneJob status: its typed model (the CRD's status schema is generated from it), the phases and the
reasons the operator writes."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field

from .finetunejob import Model


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
    DataQuality = "DataQuality"  # a Warning Event: the validation's data-quality findings (status.dataset.quality)
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
    WorkerPreempted = "WorkerPreempted"  # also the Event of an attempt ended by a preemption
    InfrastructureFailed = "InfrastructureFailed"  # the Event of an attempt ended by the infrastructure
    WorkerFailed = "WorkerFailed"  # the Event of an attempt ended by a failure of the trainer
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
    ValidationFailed = "ValidationFailed"  # validation failed transiently (a crash, OOM, storage) too many times
    OutputInUse = "OutputInUse"
    ConfigInvalid = "ConfigInvalid"
    InvalidChildSpec = "InvalidChildSpec"
    ChildConflict = "ChildConflict"
    TrainingJobLost = "TrainingJobLost"
    # an attempt's budget (runPolicy) exhausted: the kind of incident it counts
    BackoffLimitExceeded = "BackoffLimitExceeded"  # failures: more than runPolicy.backoffLimit
    PreemptionLimitExceeded = "PreemptionLimitExceeded"  # preemptions: more than runPolicy.maxPreemptions
    InfrastructureLimitExceeded = "InfrastructureLimitExceeded"  # more than runPolicy.maxInfrastructureRetries
    Hung = "Hung"
    Failed = "Failed"  # a failed Job whose condition gives no reason
    # a FineTuneSweep's (its phase, conditions and Events)
    TrialCreated = "TrialCreated"
    TrialPruned = "TrialPruned"  # a Normal Event per pruned trial, with the pruner's judgement
    TrialFailed = "TrialFailed"
    TrialDeleted = "TrialDeleted"  # a trial's FineTuneJob was deleted before it ended
    NewBest = "NewBest"
    Searching = "Searching"
    BudgetExhausted = "BudgetExhausted"  # the next trial would take the sweep past spec.budget.gpuHours
    SearchCompleted = "SearchCompleted"
    TooManyFailedTrials = "TooManyFailedTrials"
    NoTrialSucceeded = "NoTrialSucceeded"
    Promoting = "Promoting"  # spec.promote best: the best trial's output is being copied
    Promoted = "Promoted"
    PromotionFailed = "PromotionFailed"
    Retraining = "Retraining"  # spec.promote retrain: the best parameters train on train + validation (<sweep>-fit)
    RetrainFailed = "RetrainFailed"  # that FineTuneJob failed: nothing is promoted


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


CHECKPOINTS_IN_STATUS = 5  # status.checkpoints keeps the newest ones; manifest.json lists them all


class CheckpointStatus(Model):
    step: int = Field(ge=0, description="The optimizer step it was taken at")
    uri: str = Field(description="Its folder (the output's URI for the published step when it has no checkpoint)")
    time: str | None = Field(None, description="RFC 3339 time it was written")
    validation: dict[str, float] | None = Field(
        None, description="The validation split's scalar metrics at that step (the newest evaluation up to it)")
    published: bool | None = Field(None, description="The step output.select published")


class ResultMetrics(Model):
    test: dict[str, float] | None = Field(None, description="The test split's scalar metrics on the fine-tuned model "
                                          "(loss, accuracy, f1, ...; every one is in manifest.json)")
    baseline: dict[str, float] | None = Field(None, description="The same on the base model, before fine-tuning "
                                              "(evaluation.baseline)")
    validation: dict[str, float] | None = Field(None, description="The validation split's scalar metrics on the "
                                                "published model (what a FineTuneSweep judges its trials on)")


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


Count = Annotated[int, Field(ge=0)]
QUALITY_CLASSES = 20  # status.dataset.quality.labels lists at most this many rare (or unseen) classes


class LeakageCounts(Model):
    """One evaluation split's records that the train split also holds."""

    exact: int | None = Field(None, ge=0, description="Records equal to a train record after normalization")
    near: int | None = Field(None, ge=0, description="Records whose estimated Jaccard similarity to a train record "
                             "is at least dataset.quality.nearThreshold")


class PersonalDataCounts(Model):
    """Personal data and secrets found in one split's text, by kind: counts only, never a value."""

    email: int | None = Field(None, ge=0, description="E-mail addresses")
    phone: int | None = Field(None, ge=0, description="Phone numbers")
    card: int | None = Field(None, ge=0, description="Payment card numbers (Luhn-checked)")
    secret: int | None = Field(None, ge=0, description="Credentials: key ids, private keys, bearer tokens")


class LabelQuality(Model):
    """Classification only: what the label checks found in the data."""

    conflicts: int | None = Field(None, ge=0, description="Train texts or images that appear under two labels")
    suspected: int | None = Field(None, ge=0, description="Train records whose label cleanlab's confident learning "
                                  "suspects")
    rare: list[str] | None = Field(None, max_length=QUALITY_CLASSES, description="Classes under "
                                   "dataset.quality.rareClassRatio x the mean train records per class")
    unseen: list[str] | None = Field(None, max_length=QUALITY_CLASSES, description="Classes of the validation or "
                                     "test split that train lacks")


class DatasetQuality(Model):
    """What the validation's data-quality checks found (docs/data-quality.md); keys of the maps are split names.
    Counts only: the lines are in the validation's report (`kubetune validate --json`), never a matched value."""

    duplicates: dict[str, Count] | None = Field(None, description="Per split: records that repeat an earlier record "
                                              "of the same split after normalization")
    leakage: dict[str, LeakageCounts] | None = Field(None, description="Per evaluation split (validation, test): "
                                                     "its exact and near copies of train records")
    pii: dict[str, PersonalDataCounts] | None = Field(None, description="Per split: personal data and secrets by "
                                                      "kind (dataset.quality.personalData)")
    labels: LabelQuality | None = Field(None, description="Classification: conflicting and suspected labels, rare "
                                        "and unseen classes")
    dropped: dict[str, Count] | None = Field(None, description="Per split: records the policy (dataset.quality) "
                                           "removed before training")
    findings: int | None = Field(None, ge=0, description="How many checks found something (0: clean data); above "
                                 "0 the Validated condition and a Warning DataQuality Event say the summary")
    summary: str | None = Field(None, description="The findings, for people, in one line")


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
    quality: DatasetQuality | None = Field(None, description="What the data-quality checks found: duplicates, "
                                           "train/evaluation leakage, personal data, label problems, and the "
                                           "records dropped")


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


class Attempts(Model):
    """The training attempts: each incident ends the attempt's training Job (`<name>-train-<current>`, labelled
    kubetune.io/attempt) and the next attempt, a new Job, resumes from the checkpoint written on SIGTERM. Counted
    by kind, each against its own budget in runPolicy."""

    current: int | None = Field(None, ge=1, description="The current attempt's number (its training Job's suffix)")
    start_time: str | None = Field(None, description="When the current attempt's workers started running")
    preemptions: int | None = Field(None, ge=0, description="Attempts ended by a preemption: a DisruptionTarget "
                                    "(eviction, scheduler preemption) or Kueue's eviction; runPolicy.maxPreemptions")
    infrastructure: int | None = Field(None, ge=0, description="Attempts ended by the infrastructure: a node lost, "
                                       "an image that cannot be pulled, a sidecar killed for memory, storage "
                                       "unreachable (exit 75); runPolicy.maxInfrastructureRetries")
    failures: int | None = Field(None, ge=0, description="Attempts ended by the trainer failing (its exit code); "
                                 "runPolicy.backoffLimit")
    last_incident: str | None = Field(None, description="The kind and evidence of the last incident")
    retry_time: str | None = Field(None, description="When the next attempt may start after a failure or an "
                                   "infrastructure incident: 10 s, doubling with each of that kind, up to 5 minutes "
                                   "(never after a preemption)")
    ending: str | None = Field(None, description="Bookkeeping: the kind and evidence of a disruption seen while the "
                               "current attempt ends (an evicted pod and its condition are gone once it stopped)")


class FineTuneJobStatus(Model):
    phase: Phase | None = None
    reason: str | None = Field(None, description="Why the job is in its phase, e.g. DatasetInvalid")
    message: str | None = None
    observed_generation: int | None = None
    conditions: list[Condition] | None = None
    start_time: str | None = Field(None, description="When the first training worker started running")
    completion_time: str | None = None
    attempts: Attempts | None = Field(None, description="The training attempts, by the kind of incident that "
                                      "ended each")
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
    eval_metrics: dict[str, float] | None = Field(
        None, description="The validation split's scalar metrics at the last evaluation (loss, perplexity, "
        "tokenAccuracy; classification: accuracy, f1, ...)")
    eval_step: int | None = Field(None, description="The step of the last evaluation on the validation split")
    tokens_per_second: float | None = None
    tokens_trained: int | None = None
    gpu_seconds: float | None = Field(None, description="GPU time of running workers, brought up to date every 30 s")
    gpus_in_use: int | None = Field(None, description="GPUs of running workers since gpuAccountedAt")
    gpu_accounted_at: str | None = None
    last_checkpoint: LastCheckpoint | None = None
    checkpoints: list[CheckpointStatus] | None = Field(
        None, max_length=CHECKPOINTS_IN_STATUS, description="The newest checkpoints: while the run trains, each one "
        "rank 0 uploads (its /metrics); once it succeeded, rank 0's list with the validation metrics at each step and "
        "the published step. manifest.json lists every one (kubetune checkpoints)")
    result: Result | None = None
