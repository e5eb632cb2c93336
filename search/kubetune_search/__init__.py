"""A FineTuneSweep's search, one implementation for the operator (`kubetune_operator.sweep.decide`, trials as
FineTuneJobs) and the trainer's local `kubetune sweep` (trials one after another in one process).

From the spec to Optuna: each of `spec.parameters` as a distribution, the sampler of `spec.algorithm` seeded with
`spec.seed` and the trial's number, the pruner of `spec.earlyStopping`, the study's direction from the objective,
algorithm grid's points in a seeded order; and from a parameter set to a trial: its name `<sweep>-<n>`, the
template with the values set by path, its output under the sweep's and the sweep's shared data cache.

Imports kubetune_api and optuna only: both images ship it (docs/architecture.md).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import random
from typing import Any, Protocol, TypeVar

import optuna
from kubetune_api import Algorithm, FineTuneSweepSpec, Goal, Kind, Pruning, TrialPhase, join_uri
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

TPE_STARTUP = (2, 10)  # TPE samples at random first: maxTrials // 3 trials, within these bounds
ASHA_REDUCTION = 3  # successive halving keeps the best third at each rung
MEDIAN_STARTUP = 2  # the median pruner waits for this many finished trials
TRIALS = "trials/"  # under the sweep's output.uri: each trial's output prefix, trials/<trial>/
DATA_CACHE = "data-cache/"  # under the sweep's output.uri: the trials' shared data cache
RETRAIN = "fit"  # promote retrain: the run <sweep>-fit (at most 50 characters, as a trial's name)
RETRAINED = "retrain/"  # under the sweep's output.uri: its output
PROMOTED = "best/"  # under the sweep's output.uri: where promote best (or retrain) copies the winner

optuna.logging.set_verbosity(optuna.logging.WARNING)  # the operator's log and Events, the local table say what matters
logging.getLogger("optuna").propagate = False

# How a trial ended, as Optuna's study records it.
ENDED = {TrialPhase.Succeeded: TrialState.COMPLETE, TrialPhase.Pruned: TrialState.PRUNED,
         TrialPhase.Failed: TrialState.FAIL}


def distributions(spec: FineTuneSweepSpec) -> dict[str, BaseDistribution]:
    out: dict[str, BaseDistribution] = {}
    for p in spec.parameters:
        if p.values is not None:
            out[p.path] = CategoricalDistribution(p.values)
        elif p.kind == Kind.int:
            out[p.path] = IntDistribution(int(p.min), int(p.max), log=p.log, step=1 if p.log else int(p.step or 1))
        else:
            out[p.path] = FloatDistribution(p.min, p.max, log=p.log, step=None if p.log else p.step)
    return out


def grid(spec: FineTuneSweepSpec) -> dict[str, list]:
    """algorithm grid: each parameter's finite set of values (a real range's to 12 significant digits, so that
    0.1 + 2 x 0.1 is 0.3, inside a range to 0.3)."""
    space = {}
    for path, dist in distributions(spec).items():
        if isinstance(dist, CategoricalDistribution):
            space[path] = list(dist.choices)
        else:
            step = dist.step or 1
            count = int(round((dist.high - dist.low) / step)) + 1
            space[path] = [dist.low + i * step if isinstance(dist.low, int) else float(f"{dist.low + i * step:.12g}")
                           for i in range(count)]
    return space


def grid_size(spec: FineTuneSweepSpec) -> int:
    return math.prod(len(values) for values in grid(spec).values())


def grid_point(spec: FineTuneSweepSpec, number: int) -> dict:
    """algorithm grid: trial `number` takes the number-th combination of a seeded shuffle of them all (the trials
    Optuna's GridSampler did not make itself it would not count as visited)."""
    space = grid(spec)
    combinations = list(itertools.product(*space.values()))
    random.Random(spec.seed).shuffle(combinations)
    return dict(zip(space, combinations[number % len(combinations)], strict=True))


def trial_count(spec: FineTuneSweepSpec) -> int:
    """How many trials the sweep runs in all: maxTrials, or fewer where a grid has fewer points."""
    return min(spec.max_trials, grid_size(spec)) if spec.algorithm == Algorithm.grid else spec.max_trials


def sampler(spec: FineTuneSweepSpec, number: int) -> optuna.samplers.BaseSampler:
    """The sampler for trial `number`: seeded from spec.seed and the number, so one API state gives one trial."""
    seed = (spec.seed * 1_000_003 + number) % 2**32
    if spec.algorithm == Algorithm.random:
        return optuna.samplers.RandomSampler(seed=seed)
    startup = min(max(spec.max_trials // 3, TPE_STARTUP[0]), TPE_STARTUP[1])
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


def pruner(spec: FineTuneSweepSpec) -> optuna.pruners.BasePruner:
    every = spec.template.evaluation.every_steps or 1
    if spec.early_stopping == Pruning.asha:
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=every, reduction_factor=ASHA_REDUCTION)
    if spec.early_stopping == Pruning.median:
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def study(spec: FineTuneSweepSpec) -> optuna.Study:
    """An empty in-memory study: the objective's direction and the spec's pruner; `ask` sets each trial's sampler."""
    return optuna.create_study(direction=spec.goal().value, pruner=pruner(spec),
                               sampler=optuna.samplers.RandomSampler(seed=spec.seed))


def ask(s: optuna.Study, spec: FineTuneSweepSpec, number: int) -> optuna.Trial:
    """Trial `number`, running in the study: its values from the sampler seeded for it, or the grid's point."""
    s.sampler = sampler(spec, number)
    if spec.algorithm == Algorithm.grid:
        s.enqueue_trial(grid_point(spec, number))
    return s.ask(distributions(spec))


def fits(dists: dict[str, BaseDistribution], parameters: dict) -> bool:
    """Whether a parameter set (an edited annotation, say) is one of the space's."""
    try:
        create_trial(params={p: parameters[p] for p in dists}, distributions=dists, value=0)
    except (KeyError, ValueError):
        return False
    return True


def pruned_why(s: optuna.Study, value: float, step: int) -> str:
    """Why the pruner stops a trial whose evaluation at `step` gave `value`."""
    return f"{value:.4g} at step {step} trails the other trials ({type(s.pruner).__name__})"


class Ranked(Protocol):
    number: int
    phase: TrialPhase
    metric: float | None


T = TypeVar("T", bound=Ranked)


def best_trial(spec: FineTuneSweepSpec, trials: list[T]) -> T | None:
    """The succeeded trial with the best metric for the objective's goal (the lower number on a tie)."""
    done = [t for t in trials if t.phase == TrialPhase.Succeeded and t.metric is not None]
    if not done:
        return None
    sign = 1 if spec.goal() == Goal.minimize else -1
    return min(done, key=lambda t: (sign * t.metric, t.number))


# -- the trials ----------------------------------------------------------------------------------------------------


def trial_name(sweep: str, number: int) -> str:
    return f"{sweep}-{number}"


def set_path(doc: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        doc = doc.setdefault(part, {})
    doc[last] = value


def trial_spec(template: dict, spec: FineTuneSweepSpec, name: str, parameters: dict) -> dict:
    """Trial `name`'s FineTuneJob spec: the template (as written, camelCase) with the parameters set by path, its
    output under the sweep's, and the sweep's shared data cache unless the template names one."""
    doc = copy.deepcopy(template)
    for path, value in parameters.items():
        set_path(doc, path, value)
    set_path(doc, "output.uri", join_uri(spec.output.uri, f"{TRIALS}{name}/"))
    if not spec.template.dataset.cache_uri:
        set_path(doc, "dataset.cacheUri", join_uri(spec.output.uri, DATA_CACHE))
    return doc


def retrain_name(sweep: str) -> str:
    return f"{sweep}-{RETRAIN}"


def retrain_spec(template: dict, spec: FineTuneSweepSpec, name: str, parameters: dict) -> dict:
    """promote retrain: the best trial's spec (the template with its parameters, the sweep's data cache) trained on
    train + validation (dataset.trainOnValidation), so evaluating on nothing while training (no
    evaluation.everySteps, early stopping or select best), published to <output.uri>retrain/; the test split stays
    held out."""
    doc = trial_spec(template, spec, name, parameters)
    set_path(doc, "output.uri", join_uri(spec.output.uri, RETRAINED))
    set_path(doc, "output.select", "last")
    set_path(doc, "dataset.trainOnValidation", True)
    for key in ("everySteps", "earlyStopping"):
        (doc.get("evaluation") or {}).pop(key, None)
    return doc


def promotion_record(sweep: str, spec: FineTuneSweepSpec, best, retrain: str | None = None) -> dict:
    """sweep.json beside the promoted output: the sweep, its best trial (name, parameters, metric and step) and,
    with promote retrain, the run that trained those parameters once more."""
    record = {"sweep": sweep, "trial": best.name, "parameters": best.parameters,
              "metric": {spec.metric(): best.metric}, "step": best.step}
    return {**record, "retrain": retrain} if retrain else record
