"""objective orpo: Odds Ratio Preference Optimization (Hong et al., 2024), without a reference model.

The loss is the negative log-likelihood of the chosen sequence plus lambda (objectiveParams.beta) times
-log sigmoid of the log odds ratio of the chosen over the rejected answer, the odds computed from the per-token mean
log-probabilities of the answers. As in TRL's ORPOTrainer (which tests/trainer/test_objectives.py checks this
against), the likelihood term is the token mean over the whole chosen sequence, prompt included, of the batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kubetune_api import Objective

from .base import register
from .preference import Logps, PairObjective, rewards

if TYPE_CHECKING:
    import torch

LN_HALF = -0.6931471805599453


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    import torch  # torch: not for kubetune validate

    return torch.where(x < LN_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@register(Objective.orpo)
class ORPO(PairObjective):
    metrics = (*PairObjective.metrics, "nll_loss", "log_odds_ratio", "log_odds_chosen")

    def pair_losses(self, policy: Logps, reference: Logps | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        import torch.nn.functional as F  # torch: not for kubetune validate

        beta = self.params.beta
        chosen = policy.chosen / policy.chosen_tokens.clamp(min=1)
        rejected = policy.rejected / policy.rejected_tokens.clamp(min=1)
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        nll = policy.chosen_nll.sum() / policy.chosen_tokens_all.sum().clamp(min=1)  # the batch's token mean
        losses = nll - beta * ratio
        metrics = rewards(beta * chosen, beta * rejected)
        metrics.update(logps_chosen=chosen.detach(), logps_rejected=rejected.detach(),
                       nll_loss=nll.detach().expand_as(ratio), log_odds_ratio=ratio.detach(),
                       log_odds_chosen=log_odds.detach())
        return losses, metrics
