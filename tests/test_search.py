"""kubetune_search: a FineTuneSweep's spec as Optuna's search (distributions, sampler, pruner, direction, grid) and a
parameter set as a trial's spec; the one implementation the operator and the local `kubetune sweep` share."""

from __future__ import annotations

from dataclasses import dataclass

import optuna
import pytest
from kubetune_api import FineTuneSweepSpec, TrialPhase
from kubetune_search import (
    ask,
    best_trial,
    distributions,
    fits,
    grid_point,
    pruner,
    sampler,
    study,
    trial_count,
    trial_name,
    trial_spec,
)
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

LR = {"path": "hyperparameters.learningRate", "min": 1e-5, "max": 1e-2, "log": True}
RANK = {"path": "method.lora.r", "min": 4, "max": 16, "step": 4}
SCHEDULER = {"path": "hyperparameters.scheduler", "values": ["cosine", "linear"]}
TEMPLATE = {"baseModel": {"uri": "s3://m/"}, "dataset": {"train": "s3://d/t.jsonl", "validation": "s3://d/v.jsonl"},
            "evaluation": {"everySteps": 5}, "method": {"lora": {"r": 8, "alpha": 16}}}


def spec(**fields) -> FineTuneSweepSpec:
    return FineTuneSweepSpec.model_validate({"template": TEMPLATE, "parameters": [LR, RANK, SCHEDULER],
                                             "output": {"uri": "s3://o/sweep/"}, "maxTrials": 9, **fields})


def test_each_parameter_is_a_distribution_of_its_field_kind():
    assert distributions(spec()) == {
        "hyperparameters.learningRate": FloatDistribution(1e-5, 1e-2, log=True),
        "method.lora.r": IntDistribution(4, 16, step=4),
        "hyperparameters.scheduler": CategoricalDistribution(["cosine", "linear"]),
    }


@pytest.mark.parametrize(("algorithm", "kind"), [("tpe", optuna.samplers.TPESampler),
                                                 ("random", optuna.samplers.RandomSampler)])
def test_the_sampler_is_the_algorithm_seeded_by_the_seed_and_the_trial(algorithm, kind):
    s = spec(algorithm=algorithm, seed=7)
    assert isinstance(sampler(s, 0), kind)
    first, again, other = ([ask(study(s), s, n).params for n in numbers] for numbers in ([0, 1], [0, 1], [2, 3]))
    assert first == again and first != other


def test_tpe_starts_at_random_for_a_third_of_the_trials_within_bounds():
    assert sampler(spec(maxTrials=9), 0)._n_startup_trials == 3
    assert sampler(spec(maxTrials=3), 0)._n_startup_trials == 2
    assert sampler(spec(maxTrials=90), 0)._n_startup_trials == 10


def test_the_pruner_and_the_direction_follow_the_spec():
    asha = pruner(spec())
    assert isinstance(asha, optuna.pruners.SuccessiveHalvingPruner) and asha._min_resource == 5
    assert isinstance(pruner(spec(earlyStopping="median")), optuna.pruners.MedianPruner)
    assert isinstance(pruner(spec(earlyStopping="none")), optuna.pruners.NopPruner)
    assert study(spec()).direction == optuna.study.StudyDirection.MINIMIZE  # loss
    assert study(spec(objective={"metric": "tokenAccuracy"})).direction == optuna.study.StudyDirection.MAXIMIZE


def test_a_grid_visits_each_point_once_in_a_seeded_order():
    s = spec(algorithm="grid", parameters=[RANK, SCHEDULER], seed=3)
    assert trial_count(s) == 8 and trial_count(spec()) == 9
    points = [ask(study(s), s, n).params for n in range(8)]
    assert points == [grid_point(s, n) for n in range(8)]
    assert len({tuple(p.values()) for p in points}) == 8


def test_a_real_grid_stays_inside_its_range():
    s = spec(algorithm="grid", parameters=[{"path": "hyperparameters.warmupRatio", "min": 0.1, "max": 0.3,
                                            "step": 0.1}])
    points = [ask(study(s), s, n).params["hyperparameters.warmupRatio"] for n in range(3)]
    assert sorted(points) == [0.1, 0.2, 0.3]
    assert all(fits(distributions(s), {"hyperparameters.warmupRatio": p}) for p in points)


def test_a_parameter_set_fits_the_space_or_not():
    dists = distributions(spec())
    good = {"hyperparameters.learningRate": 1e-3, "method.lora.r": 8, "hyperparameters.scheduler": "linear"}
    assert fits(dists, good)
    assert not fits(dists, {**good, "method.lora.r": 6})  # off the step
    assert not fits(dists, {"method.lora.r": 8})


def test_a_trial_spec_is_the_template_with_the_values_its_output_and_the_shared_cache():
    s = spec()
    doc = trial_spec(TEMPLATE, s, trial_name("lr", 3), {"method.lora.r": 12, "hyperparameters.learningRate": 1e-4})
    assert doc["method"]["lora"] == {"r": 12, "alpha": 16} and doc["hyperparameters"] == {"learningRate": 1e-4}
    assert doc["output"]["uri"] == "s3://o/sweep/trials/lr-3/"
    assert doc["dataset"]["cacheUri"] == "s3://o/sweep/data-cache/"
    assert TEMPLATE["method"]["lora"]["r"] == 8 and "output" not in TEMPLATE  # the template itself is untouched
    own = {**TEMPLATE, "dataset": {**TEMPLATE["dataset"], "cacheUri": "s3://c/"}}
    assert trial_spec(own, spec(template=own), "lr-0", {})["dataset"]["cacheUri"] == "s3://c/"


@dataclass
class Row:
    number: int
    phase: TrialPhase
    metric: float | None


def test_the_best_trial_is_the_succeeded_one_best_for_the_goal():
    rows = [Row(0, TrialPhase.Succeeded, 2.0), Row(1, TrialPhase.Pruned, 0.5), Row(2, TrialPhase.Succeeded, 1.0),
            Row(3, TrialPhase.Succeeded, 1.0), Row(4, TrialPhase.Succeeded, None)]
    assert best_trial(spec(), rows).number == 2  # loss: the lowest; a tie goes to the earlier trial
    assert best_trial(spec(objective={"metric": "tokenAccuracy"}), rows).number == 0
    assert best_trial(spec(), rows[1:2]) is None
