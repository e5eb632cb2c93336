"""The FineTuneSweep (kubetune.io/v1alpha1): a hyperparameter search over FineTuneJobs, its spec, defaults, status
and the rules the CRD's CEL checks say the same as (crd.py generates kubetune.io_finetunesweeps.yaml from it).

A sweep's trials are FineTuneJobs made from `spec.template` with the sampled `spec.parameters` set in it; the
operator's `sweep.decide` samples and prunes them with Optuna and writes the status. Metric names are the
validation metrics the trainer reports, camelCase (tokenAccuracy, rewardsAccuracy), as in the status.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, model_validator

from .finetunejob import (
    CLASSIFICATION_TASKS,
    FineTuneJob,
    FineTuneJobSpec,
    Model,
    Objective,
    OutputSpec,
    TaskType,
)
from .status import Condition

SWEEP_KIND = "FineTuneSweep"
MAX_TRIALS = 999  # trial names are <sweep>-<n>: a FineTuneJob name has at most 50 characters
MAX_SWEEP_NAME = 46
MAX_PARAMETERS = 16
MAX_VALUES = 64



def metric_key(metric: str) -> str:
    """An objective metric as the trainer names it in its events, manifest and metrics (snake_case):
    tokenAccuracy -> token_accuracy, rewardsAccuracy -> rewards_accuracy; f1 and bleu stay."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", metric).lower()

class Algorithm(StrEnum):
    tpe = "tpe"  # Optuna's TPESampler: models good and bad trials, samples where good ones are likelier
    random = "random"  # independent uniform (or log-uniform) samples
    grid = "grid"  # every combination of the parameters' values (ranges need a step), in a seeded order


class Pruning(StrEnum):
    asha = "asha"  # Optuna's SuccessiveHalvingPruner (asynchronous successive halving)
    median = "median"  # Optuna's MedianPruner: below the median of earlier trials at the same step
    none = "none"


class Goal(StrEnum):
    minimize = "minimize"
    maximize = "maximize"


class Promote(StrEnum):
    none = "none"  # the trials' outputs stay where they are; status.best names the best one's
    best = "best"  # copy the best trial's output to <output.uri>best/, with sweep.json naming the trial
    retrain = "retrain"  # train the best parameters once more on train + validation (<sweep>-fit), then publish


class Kind(StrEnum):
    """How a tunable field is sampled: integers, real numbers, or only from a list of values."""

    int = "int"
    float = "float"
    choice = "choice"


# The template fields a sweep may tune (paths under spec.template, camelCase as on the wire) and how.
TUNABLE: dict[str, Kind] = {
    "hyperparameters.learningRate": Kind.float,
    "hyperparameters.epochs": Kind.float,
    "hyperparameters.maxSteps": Kind.int,
    "hyperparameters.batchSize": Kind.int,
    "hyperparameters.gradientAccumulationSteps": Kind.int,
    "hyperparameters.maxSeqLength": Kind.int,
    "hyperparameters.warmupRatio": Kind.float,
    "hyperparameters.weightDecay": Kind.float,
    "hyperparameters.maxGradNorm": Kind.float,
    "hyperparameters.scheduler": Kind.choice,
    "hyperparameters.packing": Kind.choice,
    "method.lora.r": Kind.int,
    "method.lora.alpha": Kind.float,
    "method.lora.dropout": Kind.float,
    "objectiveParams.beta": Kind.float,
}
RANGES = tuple(p for p, kind in TUNABLE.items() if kind != Kind.choice)

MINIMIZED = ("loss", "perplexity")  # the goal of any other metric defaults to maximize

PATH_NOT_TUNABLE = "parameters[].path must be a tunable field of the template: " + ", ".join(TUNABLE)
RANGE_OR_VALUES = "parameters[]: give either min and max (a range) or values (a choice), not both"
MIN_ABOVE_MAX = "parameters[].min must not be above parameters[].max"
LOG_NEEDS_POSITIVE = "parameters[].log needs parameters[].min above 0 (a log range cannot reach 0)"
RANGE_NOT_NUMERIC = ("parameters[]: a range (min, max) applies to numeric fields only: give values for "
                     "hyperparameters.scheduler and hyperparameters.packing")
STEP_NEEDS_RANGE = "parameters[].step applies to a range (min, max) only"
GRID_NEEDS_VALUES = "algorithm grid needs a finite set per parameter: give values, or a step for a range"
DUPLICATE_PATH = "parameters[].path: each field may be tuned by one parameter only"
NEEDS_VALIDATION = "a sweep judges trials on the validation split: set template.dataset.validation"
TEMPLATE_TRAINS_ON_VALIDATION = ("template.dataset.trainOnValidation would leave the trials no validation split to "
                                 "be judged on: leave it unset (promote retrain trains the best parameters on "
                                 "train + validation once the search is done)")
PRUNING_NEEDS_EVALUATIONS = ("earlyStopping median and asha judge trials on their evaluations: set "
                             "template.evaluation.everySteps, or earlyStopping none")
NAME_TOO_LONG = (f"metadata.name must start with a letter, be a DNS label and have at most {MAX_SWEEP_NAME} "
                 "characters (its trials are named <sweep>-<n>)")


def metric_group(task: TaskType, objective: Objective) -> str:
    """Which METRICS entry a template with this task and objective reports."""
    if task in CLASSIFICATION_TASKS:
        return "classification"
    return "sft" if objective == Objective.sft else "preference"


# The validation metrics each kind of template reports (metric_group), which an objective may follow.
METRICS: dict[str, tuple[tuple[str, ...], str]] = {  # group -> (metrics, what reports them)
    "classification": (("loss", "accuracy", "f1"), "classification tasks"),
    "sft": (("loss", "perplexity", "tokenAccuracy"), "task causal-lm with objective sft"),
    "preference": (("loss", "rewardsAccuracy", "rewardsMargin"), "task causal-lm with objective dpo or orpo"),
}


def metric_problem(group: str) -> str:
    """The message for an objective metric the template cannot report (the same in the CRD's CEL rule)."""
    metrics, of = METRICS[group]
    return f"objective.metric must be a validation metric of {of}: {', '.join(metrics)}"


class Parameter(Model):
    """One searched field: a range {path, min, max, log, step} or a choice {path, values}."""

    path: str = Field(max_length=128, description="The template field, e.g. hyperparameters.learningRate or "
                      "method.lora.r")
    min: float | None = Field(None, description="A range's lower bound (inclusive)")
    max: float | None = Field(None, description="A range's upper bound (inclusive)")
    log: bool = Field(False, description="Sample the range on a log scale (min above 0)")
    step: float | None = Field(None, gt=0, description="A range's step (integer fields sample integers anyway)")
    values: list[Any] | None = Field(None, min_length=2, max_length=MAX_VALUES, description="A choice: the values "
                                     "to try (at least two)")

    @model_validator(mode="after")
    def _shape(self) -> Parameter:
        ranged = self.min is not None or self.max is not None
        half = (self.min is None) != (self.max is None)
        problem = (PATH_NOT_TUNABLE if self.path not in TUNABLE
                   else RANGE_OR_VALUES if ranged == (self.values is not None) or half
                   else STEP_NEEDS_RANGE if self.step is not None and not ranged
                   else RANGE_NOT_NUMERIC if ranged and self.path not in RANGES
                   else MIN_ABOVE_MAX if ranged and self.min > self.max
                   else LOG_NEEDS_POSITIVE if self.log and ranged and self.min <= 0
                   else None)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def kind(self) -> Kind:
        return TUNABLE[self.path]


class SweepObjective(Model):
    metric: str | None = Field(None, max_length=64, description="A validation metric the trainer reports (loss, "
                               "perplexity, tokenAccuracy; classification: accuracy, f1; dpo and orpo: "
                               "rewardsAccuracy, rewardsMargin); the template's evaluation.metric when unset")
    goal: Goal | None = Field(None, description="minimize or maximize; minimize for loss and perplexity, maximize "
                              "for the others, when unset")


class TemplateOutput(OutputSpec):
    uri: str | None = Field(None, description="Unused: each trial publishes under the sweep's "
                            "output.uri (<output.uri>trials/<trial>/)")


class SweepTemplate(FineTuneJobSpec):
    """A FineTuneJob spec; its output.uri may be left out (each trial's is under the sweep's)."""

    output: TemplateOutput = Field(default_factory=TemplateOutput)


class SweepOutput(Model):
    uri: str = Field(max_length=1024, description="s3:// or pvc:// prefix: the trials publish under "
                     "<uri>trials/<trial>/, share the data cache <uri>data-cache/, and promote: best copies the "
                     "winner to <uri>best/")


class SweepBudgetSpec(Model):
    gpu_hours: float | None = Field(None, gt=0, alias="gpuHours", description="Start no trial that would take "
                                    "the sweep's GPU-hours past this: the data report's estimate before a trial "
                                    "has run, the GPU-hours trials measured once some have")


class FineTuneSweepSpec(Model):
    template: SweepTemplate = Field(description="The FineTuneJob spec every trial starts from")
    parameters: list[Parameter] = Field(min_length=1, max_length=MAX_PARAMETERS, description="The searched "
                                        "fields: ranges and choices")
    objective: SweepObjective = Field(default_factory=SweepObjective)
    algorithm: Algorithm = Field(Algorithm.tpe, description="tpe, random or grid (Optuna's samplers)")
    seed: int = Field(0, ge=0, description="Seeds the sampler, so the same trials give the same next trial")
    early_stopping: Pruning = Field(Pruning.asha, description="asha, median or none: stop (prune) trials whose "
                                    "validation metric trails the others' at the same step")
    max_trials: int = Field(10, ge=1, le=MAX_TRIALS, description="Trials in all")
    parallel_trials: int = Field(2, ge=1, le=MAX_TRIALS, description="Trials running at once")
    max_failed_trials: int = Field(3, ge=1, le=MAX_TRIALS, description="The sweep fails once this many trials "
                                   "have failed (bad data, an impossible setting), with their reason")
    output: SweepOutput
    budget: SweepBudgetSpec = Field(default_factory=SweepBudgetSpec)
    promote: Promote = Field(Promote.none, description="none; best: copy the best trial's output to "
                             "<output.uri>best/ with a manifest (sweep.json) naming the trial and its parameters; "
                             "retrain: once the trials are done, train the best parameters once more on train + "
                             "validation (the FineTuneJob <sweep>-fit, dataset.trainOnValidation), then publish "
                             "its output there")

    def metric(self) -> str:
        """The metric trials are judged on: objective.metric, else the template's evaluation.metric."""
        return self.objective.metric or self.template.evaluation.metric.value

    def goal(self) -> Goal:
        if self.objective.goal:
            return self.objective.goal
        return Goal.minimize if self.metric() in MINIMIZED else Goal.maximize

    @model_validator(mode="after")
    def _fits_template(self) -> FineTuneSweepSpec:
        template = self.template
        paths = [p.path for p in self.parameters]
        group = metric_group(template.task, template.objective)
        problem = (DUPLICATE_PATH if len(set(paths)) != len(paths)
                   else metric_problem(group) if self.metric() not in METRICS[group][0]
                   else NEEDS_VALIDATION if template.dataset.validation is None
                   else TEMPLATE_TRAINS_ON_VALIDATION if template.dataset.train_on_validation
                   else PRUNING_NEEDS_EVALUATIONS if self.early_stopping != Pruning.none
                   and template.evaluation.every_steps is None
                   else GRID_NEEDS_VALUES if self.algorithm == Algorithm.grid
                   and any(p.values is None and p.step is None and p.kind != Kind.int for p in self.parameters)
                   else None)
        if problem:
            raise ValueError(problem)
        return self


# -- status ---------------------------------------------------------------------------------------------------


class SweepPhase(StrEnum):
    Pending = "Pending"
    Running = "Running"
    Succeeded = "Succeeded"
    Failed = "Failed"


class TrialPhase(StrEnum):
    Pending = "Pending"  # created; validating or queued
    Running = "Running"
    Succeeded = "Succeeded"
    Pruned = "Pruned"  # stopped early (suspended after a checkpoint): its metric trailed the others'
    Failed = "Failed"


SWEEP_TERMINAL = (SweepPhase.Succeeded, SweepPhase.Failed)
TRIAL_DONE = (TrialPhase.Succeeded, TrialPhase.Pruned, TrialPhase.Failed)


class TrialPoint(Model):
    step: int = Field(ge=0)
    value: float


class TrialStatus(Model):
    name: str = Field(description="The trial's FineTuneJob, <sweep>-<n>")
    number: int = Field(ge=0, description="The trial's number: n of <sweep>-<n>")
    parameters: dict[str, Any] = Field(description="The sampled values, by template path")
    phase: TrialPhase
    metric: float | None = Field(None, description="The objective metric: the final validation value once "
                                 "succeeded, the last evaluation's before")
    step: int | None = Field(None, description="The step of that value")
    gpu_hours: float | None = Field(None, alias="gpuHours", description="GPU-hours the trial used")
    reason: str | None = Field(None, description="Why it failed or was pruned")
    history: list[TrialPoint] | None = Field(None, max_length=100, description="The evaluations observed so far "
                                             "(step, value): what pruning judges; past 100, the first 99 and the "
                                             "last")


class BestTrial(Model):
    trial: str
    metric: float
    parameters: dict[str, Any]
    adapter_uri: str | None = None


class TrialCounts(Model):
    total: int = 0
    pending: int = 0
    running: int = 0
    succeeded: int = 0
    pruned: int = 0
    failed: int = 0


class SweepBudget(Model):
    gpu_hours: float | None = Field(None, alias="gpuHours", description="spec.budget.gpuHours")
    used: float = Field(0, description="GPU-hours the trials used")
    left: float | None = Field(None, description="gpuHours - used")


class RetrainStatus(Model):
    job: str = Field(description="The FineTuneJob training the best parameters on train + validation, <sweep>-fit")
    phase: str = Field(description="Its phase (status.phase)")
    progress: str | None = Field(None, description="Its progress (status.progress.text)")
    message: str | None = Field(None, description="Why it failed")


class PromotionStatus(Model):
    trial: str = Field(description="The trial promoted: status.best.trial")
    uri: str = Field(description="Where its output was copied: <output.uri>best/, with sweep.json naming it")
    phase: Literal["Running", "Succeeded", "Failed"]
    message: str | None = None
    retrain: RetrainStatus | None = Field(None, description="promote retrain: the best parameters trained once "
                                          "more on train + validation; its output is what is copied")


class FineTuneSweepStatus(Model):
    phase: SweepPhase | None = None
    reason: str | None = None
    message: str | None = None
    observed_generation: int | None = None
    conditions: list[Condition] | None = None
    objective: str | None = Field(None, description="The metric and goal trials are judged on, e.g. loss "
                                  "(minimize)")
    trials: list[TrialStatus] | None = Field(None, max_length=MAX_TRIALS)
    best: BestTrial | None = None
    counts: TrialCounts | None = None
    progress: str | None = Field(None, description="Trials done / maxTrials, for kubectl get")
    budget: SweepBudget | None = None
    promotion: PromotionStatus | None = Field(None, description="spec.promote best and retrain: the copy of the "
                                              "best trial's output (retrain: of its retrain's)")
    start_time: str | None = None
    completion_time: str | None = None


class FineTuneSweep(FineTuneJob):
    """A whole manifest."""

    kind: Literal["FineTuneSweep"]
    spec: FineTuneSweepSpec
