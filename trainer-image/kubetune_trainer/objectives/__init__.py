"""Preference objectives (spec.objective dpo, orpo), each behind the `PreferenceObjective` interface of base.py.

The preference task (tasks/preference.py) runs the model on a batch of (chosen, rejected) pairs and hands the
objective each sequence's log-probabilities; the objective turns them into a loss per pair and its metrics. The
loop, the operator and the publishing know neither.
"""

from __future__ import annotations

from kubetune_api import Objective, ObjectiveParams

from .base import Logps, PreferenceObjective, prediction_targets, sequence_logps

__all__ = ["Logps", "PreferenceObjective", "objective_for", "prediction_targets", "sequence_logps"]


def objective_for(objective: Objective, params: ObjectiveParams) -> PreferenceObjective:
    if objective == Objective.dpo:
        from .dpo import DPO as cls
    elif objective == Objective.orpo:
        from .orpo import ORPO as cls
    else:
        raise ValueError(f"objective {objective.value} is not a preference objective")
    return cls(params)
