"""What a preference objective sees of a batch, and the interface it implements.

A batch (data/preference.collate_pairs) holds sequences numbered 0, 1, 2, ... (`sequence`, -1 on padding): the
chosen answer of the batch's pair p is sequence 2p, the rejected one 2p + 1, whether each has a row of its own or
several share a packed row. `sequence_logps` sums the per-token log-probabilities (kernels/loss.py) per sequence; the
objective turns the sums into a loss per pair.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from kubetune_api import Objective, ObjectiveParams

from ..data import IGNORE


@dataclass
class Logps:
    """Per pair ([P] tensors, float32): the summed log-probabilities of the answer tokens (the trained ones) of the
    chosen and the rejected sequence and their numbers of tokens; `chosen_nll`, `chosen_tokens_all`: the summed
    negative log-likelihood of every predicted token of the chosen sequence (prompt included) and their number."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    chosen_nll: torch.Tensor
    chosen_tokens_all: torch.Tensor

    @property
    def pairs(self) -> int:
        return self.chosen.shape[0]


def prediction_targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, T-1] each: the token that position t predicts (token t + 1) and whether it is scored: predicted from a
    token of the same sequence (a packed row's next sequence starts a new one)."""
    sequence = batch["sequence"]
    inner = (sequence[:, 1:] >= 0) & (sequence[:, 1:] == sequence[:, :-1])
    return torch.where(inner, batch["input_ids"][:, 1:], 0), inner


def sequence_logps(per_token: torch.Tensor, batch: dict[str, torch.Tensor]) -> Logps:
    """The Logps of a batch from the log-probabilities [R, T-1] of the `prediction_targets` (0 where not
    scored; kernels/loss.LossHead.token_logps)."""
    sequence = batch["sequence"]
    pairs = max(int(sequence.max()) + 1, 0) // 2
    labels, target_seq = batch["labels"][:, 1:], sequence[:, 1:]
    _, inner = prediction_targets(batch)
    trained = inner & (labels != IGNORE)
    index = target_seq.clamp(min=0).reshape(-1)

    def per_sequence(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros(2 * pairs, dtype=torch.float32, device=values.device)
        return sums.index_add(0, index, torch.where(mask, values, 0).reshape(-1).float())

    answer = per_sequence(per_token, trained)
    answer_tokens = per_sequence(torch.ones_like(per_token), trained)
    everything = per_sequence(per_token, inner)
    all_tokens = per_sequence(torch.ones_like(per_token), inner)
    return Logps(answer[0::2], answer[1::2], answer_tokens[0::2], answer_tokens[1::2], -everything[0::2],
                 all_tokens[0::2])


class PreferenceObjective(ABC):
    """A preference loss on (chosen, rejected) pairs."""

    name: ClassVar[Objective]
    # The metrics `pair_losses` returns (per pair, averaged over the pairs of a logging window or a split).
    metrics: ClassVar[tuple[str, ...]] = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy",
                                          "logps_chosen", "logps_rejected")

    def __init__(self, params: ObjectiveParams):
        self.params = params

    @property
    def uses_reference(self) -> bool:
        """Whether `pair_losses` needs the reference model's Logps of the same batch."""
        return False

    @abstractmethod
    def pair_losses(self, policy: Logps, reference: Logps | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(each pair's loss [P], with grad: their mean is the batch's loss; each of `metrics` per pair [P])."""


def rewards(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reward metrics every objective reports, per pair (detached)."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {"rewards_chosen": chosen, "rewards_rejected": rejected, "rewards_margin": chosen - rejected,
            "rewards_accuracy": (chosen > rejected).float()}
