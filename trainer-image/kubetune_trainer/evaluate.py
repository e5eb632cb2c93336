"""Stage 5, evaluate: loss, perplexity and token accuracy of the model on a split (validation or test)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .metrics import TrainerMetrics


def forward_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over trained tokens, their count, and how many argmax got right."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                               reduction="sum")
    correct = ((logits.argmax(-1) == labels) & mask).sum()
    return loss_sum, mask.sum(), correct


@torch.no_grad()
def evaluate(model, batches, accelerator, metrics: TrainerMetrics | None = None) -> dict[str, float]:
    """Token-weighted metrics over this process's batches, summed across all processes; beats per batch."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            loss_sum, tokens, correct = forward_loss(model, batch)
        totals += torch.stack([loss_sum.double(), tokens.double(), correct.double()])
        if metrics:
            metrics.beat()
    totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    loss_sum, tokens, correct = totals.tolist()
    if tokens == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "token_accuracy": float("nan"), "tokens": 0}
    loss = loss_sum / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700)),
        "token_accuracy": correct / tokens,
        "tokens": int(tokens),
    }
