"""objective sft: supervised fine-tuning, the next-token loss over the trained tokens (the answer, not the prompt;
see docs/data-formats.md); packing lays short examples end to end. Evaluation: loss, perplexity and token accuracy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune_api import DataFormat, Objective

from ..data import IGNORE, PackedExample, collate, pack_examples, tokenize_dataset
from ..evaluate import Evaluation
from ..kernels.loss import LossHead
from .base import CausalObjective, register

if TYPE_CHECKING:
    import torch


@register(Objective.sft)
class SFT(CausalObjective):
    unit = "token"

    def tokenize(self, path: Path, uri: str, fmt: DataFormat) -> list:
        return tokenize_dataset(path, uri, fmt=fmt, tokenizer=self.task.processor,
                                max_seq_length=self.config.hyperparameters.max_seq_length,
                                fields=self.config.dataset.fields)

    def pack(self, examples: list) -> list:
        hp = self.config.hyperparameters
        return pack_examples(examples, hp.max_seq_length, seed=hp.seed) if hp.packing else examples

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_id)

    def blank(self, example) -> dict[str, torch.Tensor]:
        batch = collate([example], self.pad_id)
        batch["labels"].fill_(IGNORE)
        return batch

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def size(self, example) -> tuple[int, int]:
        return len(example.input_ids), len(example.lengths) if isinstance(example, PackedExample) else 1

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels, trained = targets(batch)
        return self.head.cross_entropy_sum(model, inputs, labels, trained), trained.sum()

    def evaluation(self, split: str) -> Evaluation:
        return TokenEvaluation(self.head)


def targets(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The model's inputs, the token each position predicts (its label) and the trained positions."""
    labels = batch["labels"][:, 1:]
    return {k: v for k, v in batch.items() if k != "labels"}, labels.clamp(min=0), labels != IGNORE


class TokenEvaluation(Evaluation):
    """Token-weighted loss, perplexity and token accuracy, summed over every process."""

    def __init__(self, head: LossHead):
        self.head, self.totals = head, None

    def add(self, model, batch: dict[str, torch.Tensor]) -> None:
        import torch  # torch: not for kubetune validate

        inputs, labels, trained = targets(batch)
        scores = self.head.scores(model, inputs, labels, trained, correct=True)
        row = torch.stack([-scores.logps.double().sum(), trained.sum().double(), scores.correct.sum().double()])
        self.totals = row if self.totals is None else self.totals + row

    def result(self, accelerator) -> dict[str, Any]:
        import torch  # torch: not for kubetune validate

        totals = self.totals if self.totals is not None else torch.zeros(3, dtype=torch.float64,
                                                                         device=accelerator.device)
        loss_sum, tokens, correct = accelerator.reduce(totals, reduction="sum").tolist()
        if tokens == 0:
            return {"loss": float("nan"), "perplexity": float("nan"), "token_accuracy": float("nan"), "tokens": 0}
        loss = loss_sum / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "token_accuracy": correct / tokens,
                "tokens": int(tokens)}
