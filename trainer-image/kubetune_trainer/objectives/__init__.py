"""The objectives of the causal-LM task (spec.objective), each behind the `CausalObjective` interface of base.py and
registered for its spec.Objective: sft (sft.py), and the preference objectives on (chosen, rejected) pairs, dpo and
orpo (preference.py holds what they share). The loop, the operator and the publishing know none of them.
"""

from . import dpo, orpo, sft
from .base import OBJECTIVES, CausalObjective, objective_for, register

__all__ = ["OBJECTIVES", "CausalObjective", "dpo", "objective_for", "orpo", "register", "sft"]
