"""bench/bench_sweep.py's summary (`make bench-sweep`): the best loss of the succeeded trials, the CPU-s until the
best so far reached the target, the ratios to TPE without pruning and issue 30's goal; pure functions of the
trials."""

from __future__ import annotations

from bench.bench_sweep import (
    TrialCost,
    best_metric,
    cpu_to_target,
    goal_met,
    parse_sweep,
    rung_agreement,
    spearman,
    summarize,
)


def trial(number: int, phase: str, metric: float | None, cpu_s: float, steps: int = 27,
          evaluations: dict | None = None) -> TrialCost:
    return TrialCost(number, phase, metric, cpu_s, wall_s=cpu_s, steps=steps, parameters={},
                     evaluations=evaluations or {})


NONE = [trial(0, "Succeeded", 2.0, 10), trial(1, "Succeeded", 1.5, 10), trial(2, "Succeeded", 1.8, 10)]
ASHA = [trial(0, "Succeeded", 2.0, 10), trial(1, "Succeeded", 1.51, 10), trial(2, "Pruned", None, 1, steps=3)]


def test_the_best_is_the_lowest_loss_of_a_succeeded_trial():
    assert best_metric(NONE) == 1.5
    assert best_metric([trial(0, "Pruned", None, 1), trial(1, "Failed", None, 1)]) is None


def test_cpu_to_target_counts_every_trial_until_the_first_that_reached_it_within_the_tolerance():
    assert cpu_to_target(NONE, 1.5, 0.0) == 20
    assert cpu_to_target(ASHA, 1.5, 0.0) is None  # 1.51 is above 1.5
    assert cpu_to_target(ASHA, 1.5, 0.01) == 20  # within 1%
    pruned_first = [trial(0, "Pruned", None, 1, steps=3), trial(1, "Succeeded", 1.4, 10)]
    assert cpu_to_target(pruned_first, 1.5, 0.0) == 11  # a pruned trial's compute counts, its loss does not


def test_summarize_compares_each_sweep_with_tpe_without_pruning():
    rows = summarize({"tpe+asha": ASHA, "tpe+none": NONE}, tolerance=0.01)
    assert rows["tpe+none"] == {"trials": 3, "cpu_s": 30, "steps": 81, "pruned": 0, "best": 1.5, "target": 1.5,
                                "cpu_to_target": 20, "ratio": 1.0, "total_ratio": 1.0}
    asha = rows["tpe+asha"]
    assert (asha["cpu_s"], asha["steps"], asha["pruned"], asha["best"]) == (21, 57, 1, 1.51)
    assert asha["cpu_to_target"] == 20 and asha["ratio"] == 1.0 and asha["total_ratio"] == 0.7


def test_the_goal_is_the_same_best_loss_for_at_most_60_percent_of_the_cpu():
    cheap = [trial(0, "Succeeded", 1.5, 15), trial(1, "Pruned", None, 1), trial(2, "Pruned", None, 1)]
    assert goal_met(summarize({"tpe+asha": cheap, "tpe+none": NONE}, 0.01)["tpe+asha"], 0.01)  # 17 of 30 CPU-s
    assert not goal_met(summarize({"tpe+asha": ASHA, "tpe+none": NONE}, 0.01)["tpe+asha"], 0.01)  # 70%
    worse = [trial(0, "Succeeded", 1.6, 15), trial(1, "Pruned", None, 1)]
    assert not goal_met(summarize({"tpe+asha": worse, "tpe+none": NONE}, 0.01)["tpe+asha"], 0.01)  # cheap, worse


def test_a_sweep_is_named_algorithm_plus_pruning_with_an_optional_trial_count():
    assert parse_sweep("tpe+asha") == ("tpe", "asha", None) and parse_sweep("tpe+asha@36") == ("tpe", "asha", 36)
    assert parse_sweep("grid+none") is parse_sweep("tpe+hyperband") is parse_sweep("tpe+asha@x") is None


def test_spearman_is_pearson_on_ranks_with_ties_sharing_their_mean_rank():
    assert abs(spearman([1, 1, 2], [1, 2, 3]) - 3 ** 0.5 / 2) < 1e-12  # tied 1s share rank 1.5 (ordinal: 1.0)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == 1.0  # any increasing relation
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_rung_agreement_ranks_the_trials_that_ran_to_the_end_by_a_step_against_their_final_loss():
    # at step 3 the order is reversed among the best two (a short-horizon bias), at step 9 it is the final one
    trials = [trial(0, "Succeeded", 1.3, 2, evaluations={3: 2.1, 9: 1.6}),
              trial(1, "Succeeded", 1.4, 2, evaluations={3: 2.0, 9: 1.7}),
              trial(2, "Succeeded", 2.0, 2, evaluations={3: 2.3, 9: 2.2}),
              trial(3, "Succeeded", 2.2, 2, evaluations={3: 2.4, 9: 2.3}),
              trial(4, "Pruned", None, 1, steps=3, evaluations={3: 2.5})]  # never ran to the end: not ranked
    assert rung_agreement(trials, 9) == (1.0, 4)
    rho, n = rung_agreement(trials, 3)
    assert n == 4 and 0 < rho < 1
    assert rung_agreement(trials, 3, share=3 / 4) == (0.5, 3)  # the best three: 2.1, 2.0, 2.3 against 1.3, 1.4, 2.0
