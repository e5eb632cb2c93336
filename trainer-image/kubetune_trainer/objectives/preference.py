"""Preference tuning (objective dpo, orpo) on (prompt, chosen, rejected) pairs: what DPO and ORPO share.

The data are pairs (data/preference.py): each record is two sequences, prompt + chosen and prompt + rejected,
trained on the answers only; packing lays whole pairs end to end. A batch is one forward pass over both sequences
of every pair; `sequence_logps` sums each sequence's log-probabilities, and the objective (`PairObjective.
pair_losses`: dpo.py, orpo.py) turns them into a loss per pair. The loss the loop sees is summed over pairs, so a
step's loss is the mean over its pairs.

A batch (data/preference.collate_pairs) holds sequences numbered 0, 1, 2, ... (`sequence`, -1 on padding): the
chosen answer of the batch's pair p is sequence 2p, the rejected one 2p + 1, whether each has a row of its own or
several share a packed row.

The reference model DPO compares with is the base model: with lora and qlora the same model with the adapter
disabled (no second copy in memory), with full a frozen copy loaded beside it (its weights once more, in the
compute dtype; sharded like the policy under FSDP). ORPO and referenceFree DPO have none.

Metrics, per logging window and per evaluated split: the loss, rewards_chosen, rewards_rejected, rewards_margin,
rewards_accuracy (the share of pairs whose chosen answer gets the higher reward), logps_chosen, logps_rejected, and
for ORPO nll_loss, log_odds_ratio and log_odds_chosen.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kubetune_api import DataFormat, MethodType

from .. import sharding
from ..data import IGNORE, preference
from ..evaluate import Evaluation
from ..kernels.loss import LossHead, unwrapped
from ..modeling import load_reference
from .base import CausalObjective

if TYPE_CHECKING:
    import torch


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


class PairObjective(CausalObjective):
    """A preference loss on (chosen, rejected) pairs; a subclass gives `pair_losses` (and `uses_reference`)."""

    unit = "sample"  # a pair
    pairs = True
    # The metrics `pair_losses` returns (per pair, averaged over the pairs of a logging window or a split).
    metrics: ClassVar[tuple[str, ...]] = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy",
                                          "logps_chosen", "logps_rejected")

    def __init__(self, task):
        super().__init__(task)
        self.reference = None  # method full with a reference: the frozen base model
        self._sharded = self._reference_placed = False
        self._mixed_precision = "no"
        self._window: torch.Tensor | None = None  # the metrics' sums and the pairs since the last log line

    @property
    def uses_reference(self) -> bool:
        """Whether `pair_losses` needs the reference model's Logps of the same batch."""
        return False

    @abstractmethod
    def pair_losses(self, policy: Logps, reference: Logps | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(each pair's loss [P], with grad: their mean is the batch's loss; each of `metrics` per pair [P])."""

    # -- data ---------------------------------------------------------------------------------------------

    def tokenize(self, path: Path, uri: str, fmt: DataFormat) -> list:
        return preference.tokenize_pairs(path, uri, fmt=fmt, tokenizer=self.task.processor,
                                         max_seq_length=self.config.hyperparameters.max_seq_length,
                                         fields=self.config.dataset.fields)

    def pack(self, examples: list) -> list:
        hp = self.config.hyperparameters
        return preference.pair_examples(examples, hp.max_seq_length, hp.packing, hp.seed)

    def prompted(self, examples: Sequence) -> Sequence:
        return examples[0::2]  # the chosen sequences: a prompt and its preferred answer

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        return preference.collate_pairs(examples, self.pad_id)

    def blank(self, example) -> dict[str, torch.Tensor]:
        return preference.blank_pairs(example, self.pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return (int(batch["sequence"].max()) + 1) // 2

    def size(self, example) -> tuple[int, int]:
        return preference.pair_size(example)

    # -- model --------------------------------------------------------------------------------------------

    def attach(self, model, mixed_precision: str, sharded: bool) -> None:
        super().attach(model, mixed_precision, sharded)
        self._sharded, self._mixed_precision = sharded, mixed_precision
        if self.config.method.type == MethodType.full and self.uses_reference:
            self.reference = load_reference(self.task.model_dir, mixed_precision,
                                            unwrapped(model).config._attn_implementation, **self.task.remote_code,
                                            **self.task.weight_formats)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch  # torch: not for kubetune validate

        losses, metrics = self.scored_pairs(model, batch)
        row = _row(losses, metrics, self.metrics)
        self._window = row if self._window is None else self._window + row
        return losses.sum(), torch.tensor(losses.shape[0], device=losses.device)

    def scored_pairs(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each pair's loss and metrics: the reference pass first (no graph kept), then the policy's."""
        reference = self._reference_logps(model, batch) if self.uses_reference else None
        return self.pair_losses(_logps(self.head, model, batch), reference)

    def _reference_logps(self, model, batch: dict[str, torch.Tensor]) -> Logps:
        import torch  # torch: not for kubetune validate

        with torch.no_grad():
            if self.config.method.type != MethodType.full:
                with unwrapped(model).disable_adapter():
                    return _logps(self.head, model, batch)
            if not self._reference_placed:  # on the policy's device, sharded like it (FSDP: a collective)
                device = batch["input_ids"].device
                self.reference = (sharding.shard(self.reference, device, self._mixed_precision)
                                  if self._sharded else self.reference.to(device))
                self._reference_placed = True
            return _logps(self.head, self.reference, batch)

    def window_metrics(self, accelerator) -> dict[str, float]:
        import torch  # torch: not for kubetune validate

        window = self._window if self._window is not None else torch.zeros(
            len(self.metrics) + 2, dtype=torch.float64, device=accelerator.device)
        self._window = None
        return _means(accelerator.reduce(window, reduction="sum").tolist(), self.metrics)

    def evaluation(self, split: str) -> Evaluation:
        return PairEvaluation(self)

    def describe(self) -> dict[str, Any]:
        return {"objective": self.config.objective.value, "objectiveParams": self.params.dump()}


def prediction_targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, T-1] each: the token that position t predicts (token t + 1) and whether it is scored: predicted from a
    token of the same sequence (a packed row's next sequence starts a new one)."""
    import torch  # torch: not for kubetune validate

    sequence = batch["sequence"]
    inner = (sequence[:, 1:] >= 0) & (sequence[:, 1:] == sequence[:, :-1])
    return torch.where(inner, batch["input_ids"][:, 1:], 0), inner


def sequence_logps(per_token: torch.Tensor, batch: dict[str, torch.Tensor]) -> Logps:
    """The Logps of a batch from the log-probabilities [R, T-1] of the `prediction_targets` (0 where not
    scored; kernels/loss.LossHead.token_logps). Padding positions add their 0 to one slot past the pairs, dropped:
    a blank batch (no pairs) gives empty Logps that are still part of the graph, so its backward pass joins the
    other processes'."""
    import torch  # torch: not for kubetune validate

    sequence = batch["sequence"]
    pairs = max(int(sequence.max()) + 1, 0) // 2
    labels, target_seq = batch["labels"][:, 1:], sequence[:, 1:]
    _, inner = prediction_targets(batch)
    trained = inner & (labels != IGNORE)
    index = torch.where(target_seq >= 0, target_seq, 2 * pairs).reshape(-1)

    def per_sequence(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros(2 * pairs + 1, dtype=torch.float32, device=values.device)
        return sums.index_add(0, index, torch.where(mask, values, 0).reshape(-1).float())[:-1]

    answer = per_sequence(per_token, trained)
    answer_tokens = per_sequence(torch.ones_like(per_token), trained)
    everything = per_sequence(per_token, inner)
    all_tokens = per_sequence(torch.ones_like(per_token), inner)
    return Logps(answer[0::2], answer[1::2], answer_tokens[0::2], answer_tokens[1::2], -everything[0::2],
                 all_tokens[0::2])


def rewards(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reward metrics every objective reports, per pair (detached)."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {"rewards_chosen": chosen, "rewards_rejected": rejected, "rewards_margin": chosen - rejected,
            "rewards_accuracy": (chosen > rejected).float()}


def _logps(head: LossHead, model, batch: dict[str, torch.Tensor]) -> Logps:
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "sequence")}
    tokens, inner = prediction_targets(batch)
    return sequence_logps(head.token_logps(model, inputs, tokens, inner), batch)


def _row(losses: torch.Tensor, metrics: dict[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    """[loss sum, each metric's sum, pairs] of a batch, float64, detached."""
    import torch  # torch: not for kubetune validate

    sums = [losses.detach().sum()] + [metrics[name].sum() for name in names]
    return torch.stack([s.double() for s in sums] + [torch.tensor(float(losses.shape[0]), dtype=torch.float64,
                                                                  device=losses.device)])


def _means(totals: list[float], names: tuple[str, ...], with_loss: bool = False) -> dict[str, float]:
    """The metrics' means over the pairs of summed rows (the loss too when asked: the loop reports its own)."""
    pairs_seen = totals[-1]
    if not pairs_seen:
        return {}
    values = dict(zip(("loss", *names), (t / pairs_seen for t in totals[:-1]), strict=True))
    return values if with_loss else {k: v for k, v in values.items() if k != "loss"}


class PairEvaluation(Evaluation):
    """The objective's loss and metrics, averaged over the split's pairs in every process."""

    def __init__(self, objective: PairObjective):
        self.objective, self.totals = objective, None

    def add(self, model, batch: dict[str, torch.Tensor]) -> None:
        losses, metrics = self.objective.scored_pairs(model, batch)
        row = _row(losses, metrics, self.objective.metrics)
        self.totals = row if self.totals is None else self.totals + row

    def result(self, accelerator) -> dict[str, Any]:
        import torch  # torch: not for kubetune validate

        names = self.objective.metrics
        totals = self.totals if self.totals is not None else torch.zeros(len(names) + 2, dtype=torch.float64,
                                                                         device=accelerator.device)
        totals = accelerator.reduce(totals, reduction="sum").tolist()
        means = _means(totals, names, with_loss=True)
        if not means:
            return {"loss": float("nan"), **{name: float("nan") for name in names}, "samples": 0}
        return {**means, "samples": int(totals[-1])}
