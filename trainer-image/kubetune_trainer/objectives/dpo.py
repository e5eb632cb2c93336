"""objective dpo: Direct Preference Optimization (Rafailov et al., 2023), and its IPO loss (Azar et al., 2023).

The implicit reward of an answer is beta times how much more likely the policy makes it than the reference model
does (log-probabilities summed over the answer's tokens). The sigmoid loss is -log sigmoid(chosen reward -
rejected reward); IPO regresses the difference of the per-token mean log-ratios to 1 / (2 beta). referenceFree:
the reference is uniform (its log-probabilities 0). The formulas are TRL's DPOTrainer's (loss_type sigmoid and ipo),
which tests/trainer/test_objectives.py checks them against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kubetune_api import DpoLoss, Objective

from .base import register
from .preference import Logps, PairObjective, rewards

if TYPE_CHECKING:
    import torch


@register(Objective.dpo)
class DPO(PairObjective):
    @property
    def uses_reference(self) -> bool:
        return not self.params.reference_free

    def pair_losses(self, policy: Logps, reference: Logps | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        import torch.nn.functional as F  # torch: not for kubetune validate

        beta = self.params.beta
        chosen_ratio = policy.chosen - (reference.chosen if reference is not None else 0)
        rejected_ratio = policy.rejected - (reference.rejected if reference is not None else 0)
        if self.params.loss == DpoLoss.ipo:
            delta = (chosen_ratio / policy.chosen_tokens.clamp(min=1)
                     - rejected_ratio / policy.rejected_tokens.clamp(min=1))
            losses = (delta - 1 / (2 * beta)) ** 2
        else:
            losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
        metrics = rewards(beta * chosen_ratio, beta * rejected_ratio)
        metrics.update(logps_chosen=policy.chosen.detach(), logps_rejected=policy.rejected.detach())
        return losses, metrics
