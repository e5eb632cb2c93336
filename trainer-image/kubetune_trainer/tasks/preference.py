"""causal-lm with objective dpo or orpo: preference tuning on (prompt, chosen, rejected) pairs.

The data are pairs (data/preference.py): each record is two sequences, prompt + chosen and prompt + rejected,
trained on the answers only; packing lays whole pairs end to end. A batch is one forward pass over both sequences
of every pair; the objective (objectives/) turns each sequence's summed log-probabilities into a loss per pair. The
loss the loop sees is summed over pairs, so a step's loss is the mean over its pairs.

The reference model DPO compares with is the base model: with lora and qlora the same model with the adapter
disabled (no second copy in memory), with full a frozen copy loaded beside it (its weights once more, in the
compute dtype; sharded like the policy under FSDP). ORPO and referenceFree DPO have none.

Metrics, per logging window and per evaluated split: the loss, rewards_chosen, rewards_rejected, rewards_margin,
rewards_accuracy (the share of pairs whose chosen answer gets the higher reward), logps_chosen, logps_rejected, and
for ORPO nll_loss, log_odds_ratio and log_odds_chosen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from kubetune_api import PREFERENCE_FORMATS, MethodType, TaskType

from ..data import preference
from ..data.cache import Cache
from ..kernels.loss import LossHead, unwrapped
from ..objectives import Logps, objective_for, prediction_targets, sequence_logps
from .base import Evaluation
from .causal_lm import CausalLM


class Preference(CausalLM):
    name = TaskType.causal_lm
    unit = "sample"  # a pair
    headline = "loss"
    formats = PREFERENCE_FORMATS
    pairs = True  # validate() and prepare() of CausalLM read and cache pairs

    def __init__(self, config, model_dir: Path, storage=None):
        super().__init__(config, model_dir, storage)
        self.objective = objective_for(config.objective, config.objective_params)
        self.reference = None  # method full with a reference: the frozen base model
        self._sharded = self._reference_placed = False
        self._mixed_precision = "no"
        self._window: torch.Tensor | None = None  # the metrics' sums and the pairs since the last log line

    # -- data ---------------------------------------------------------------------------------------------

    def examples(self, split: str, path: Path, uri: str, fmt) -> list:
        hp = self.config.hyperparameters
        examples = preference.tokenize_pairs(path, uri, fmt=fmt, tokenizer=self.processor,
                                             max_seq_length=hp.max_seq_length)
        self._keep_prompts(split, examples[0::2])
        return preference.pair_examples(examples, hp.max_seq_length, hp.packing, hp.seed)

    def load(self, split: str, cache: Cache):
        self._keep_prompts(split, cache.examples(split)[0::2])  # the chosen sequences: prompt and its answer
        return cache.sequences(split)

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        return preference.collate_pairs(examples, self.pad_id)

    def blank(self, example) -> dict[str, torch.Tensor]:
        return preference.blank_pairs(example, self.pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return (int(batch["sequence"].max()) + 1) // 2

    def size(self, example) -> tuple[int, int]:
        return preference.pair_size(example)

    # -- model --------------------------------------------------------------------------------------------

    def load_model(self, mixed_precision: str, sharded: bool):
        model = super().load_model(mixed_precision, sharded)
        self._sharded, self._mixed_precision = sharded, mixed_precision
        if self.config.method.type == MethodType.full and self.objective.uses_reference:
            from ..modeling import load_reference

            self.reference = load_reference(self.model_dir, mixed_precision,
                                            unwrapped(model).config._attn_implementation, **self.remote_code)
        return model

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        losses, metrics = self._pairs(model, batch)
        row = _row(losses, metrics, self.objective.metrics)
        self._window = row if self._window is None else self._window + row
        return losses.sum(), torch.tensor(losses.shape[0], device=losses.device)

    def _pairs(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each pair's loss and metrics: the reference pass first (no graph kept), then the policy's."""
        reference = self._reference_logps(model, batch) if self.objective.uses_reference else None
        return self.objective.pair_losses(_logps(self.head, model, batch), reference)

    def _reference_logps(self, model, batch: dict[str, torch.Tensor]) -> Logps:
        with torch.no_grad():
            if self.config.method.type != MethodType.full:
                with unwrapped(model).disable_adapter():
                    return _logps(self.head, model, batch)
            if not self._reference_placed:  # on the policy's device, sharded like it (FSDP: a collective)
                from .. import sharding

                device = batch["input_ids"].device
                self.reference = (sharding.shard(self.reference, device, self._mixed_precision)
                                  if self._sharded else self.reference.to(device))
                self._reference_placed = True
            return _logps(self.head, self.reference, batch)

    def window_metrics(self, accelerator) -> dict[str, float]:
        window = self._window if self._window is not None else torch.zeros(
            len(self.objective.metrics) + 2, dtype=torch.float64, device=accelerator.device)
        self._window = None
        return _means(accelerator.reduce(window, reduction="sum").tolist(), self.objective.metrics)

    def evaluation(self, split: str) -> Evaluation:
        return PairEvaluation(self)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "objective": self.config.objective.value,
                "objectiveParams": self.config.objective_params.dump()}


def _logps(head: LossHead, model, batch: dict[str, torch.Tensor]) -> Logps:
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "sequence")}
    tokens, inner = prediction_targets(batch)
    return sequence_logps(head.token_logps(model, inputs, tokens, inner), batch)


def _row(losses: torch.Tensor, metrics: dict[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    """[loss sum, each metric's sum, pairs] of a batch, float64, detached."""
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

    def __init__(self, task: Preference):
        self.task, self.totals = task, None

    def add(self, model, batch: dict[str, torch.Tensor]) -> None:
        losses, metrics = self.task._pairs(model, batch)
        row = _row(losses, metrics, self.task.objective.metrics)
        self.totals = row if self.totals is None else self.totals + row

    def result(self, accelerator) -> dict[str, Any]:
        names = self.task.objective.metrics
        totals = self.totals if self.totals is not None else torch.zeros(len(names) + 2, dtype=torch.float64,
                                                                         device=accelerator.device)
        totals = accelerator.reduce(totals, reduction="sum").tolist()
        means = _means(totals, names, with_loss=True)
        if not means:
            return {"loss": float("nan"), **{name: float("nan") for name in names}, "samples": 0}
        return {**means, "samples": int(totals[-1])}
