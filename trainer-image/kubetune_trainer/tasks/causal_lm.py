"""causal-lm: next-token prediction on chat, ShareGPT, instruction, completion or plain-text records.

The loss is over the trained tokens (the answer, not the prompt; see docs/data-formats.md); packing lays short
examples end to end. Evaluation: loss, perplexity and token accuracy, and with evaluation.generation the test
prompts' generated answers scored against the references (tasks/generation.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from kubetune_api import TASK_FORMATS, DataFormat, TaskType

from ..data import IGNORE, PackedExample, collate, pack_examples, tokenize_dataset, validate_dataset
from ..data.cache import Cache, SplitWriter
from ..kernels.loss import LossHead
from ..kernels.loss import choose as choose_loss
from ..sharding import is_sharded
from .base import Beat, Evaluation, Task


class CausalLM(Task):
    name = TaskType.causal_lm
    unit = "token"
    headline = "loss"
    formats = tuple(f for f in TASK_FORMATS[TaskType.causal_lm] if f != DataFormat.auto)

    def __init__(self, config, model_dir: Path, storage=None):
        super().__init__(config, model_dir, storage)
        self._prompts: list | None = None  # the test prompts generation scores, when evaluation.generation is set
        self.head = LossHead()  # how the loss scores tokens (kernels/loss.py); chosen for the model by load_model

    def load_processor(self):
        from ..modeling import load_tokenizer

        self.processor = load_tokenizer(self.model_dir, **self.remote_code)
        return self.processor

    @property
    def pad_id(self) -> int:
        return self.processor.pad_token_id

    caches = True
    pairs: ClassVar[bool] = False  # records are (chosen, rejected) pairs: tasks/preference.py

    def validate(self, split: str, path: Path, uri: str, fmt: DataFormat, min_samples: int):
        return validate_dataset(path, uri, fmt=fmt, tokenizer=self.processor,
                                max_seq_length=self.config.hyperparameters.max_seq_length,
                                min_samples=min_samples, split=split, pairs=self.pairs)

    def examples(self, split: str, path: Path, uri: str, fmt: DataFormat) -> list:
        hp = self.config.hyperparameters
        examples = tokenize_dataset(path, uri, fmt=fmt, tokenizer=self.processor, max_seq_length=hp.max_seq_length)
        self._keep_prompts(split, examples)
        return pack_examples(examples, hp.max_seq_length, seed=hp.seed) if hp.packing else examples

    def prepare(self, split: str, path: Path, uri: str, fmt: DataFormat, min_samples: int, into: Path,
                beat: Beat | None = None):
        hp = self.config.hyperparameters
        writer = SplitWriter(into)

        def sink(chunk) -> None:
            writer.add(chunk)
            if beat:
                beat()

        report = validate_dataset(path, uri, fmt=fmt, tokenizer=self.processor, max_seq_length=hp.max_seq_length,
                                  min_samples=min_samples, split=split, sink=sink, pairs=self.pairs)
        report.sequences = writer.close(hp.max_seq_length, hp.packing, hp.seed, pairs=self.pairs)
        return report

    def load(self, split: str, cache: Cache):
        self._keep_prompts(split, cache.examples(split))
        return cache.sequences(split)

    def _keep_prompts(self, split: str, examples) -> None:
        generation = self.config.evaluation.generation
        if split == "test" and generation is not None:
            from . import generation as gen

            self._prompts = gen.prompts(examples, self.processor, generation.max_samples)

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

    def load_model(self, mixed_precision: str, sharded: bool):
        from ..modeling import device_type, load_model

        hp = self.config.hyperparameters
        model = load_model(self.model_dir, self.config.method, mixed_precision, hp, sharded=sharded,
                           **self.remote_code)
        self.head = choose_loss(hp.performance.loss, model, device_type())
        model.kubetune_choices = {**getattr(model, "kubetune_choices", {}), "loss": self.head.reason}
        return model

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels, trained = targets(batch)
        return self.head.cross_entropy_sum(model, inputs, labels, trained), trained.sum()

    def evaluation(self, split: str) -> Evaluation:
        return TokenEvaluation(self.head)

    def generation_metrics(self, model, accelerator, beat: Beat) -> dict[str, Any]:
        spec = self.config.evaluation.generation
        if spec is None or self._prompts is None:
            return {}
        from . import generation as gen

        return gen.generation_metrics(model, self.processor, self._prompts, spec, accelerator, beat,
                                      is_sharded(self.config, accelerator))


def targets(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The model's inputs, the token each position predicts (its label) and the trained positions."""
    labels = batch["labels"][:, 1:]
    return {k: v for k, v in batch.items() if k != "labels"}, labels.clamp(min=0), labels != IGNORE


class TokenEvaluation(Evaluation):
    """Token-weighted loss, perplexity and token accuracy, summed over every process."""

    def __init__(self, head: LossHead):
        self.head, self.totals = head, None

    def add(self, model, batch: dict[str, torch.Tensor]) -> None:
        inputs, labels, trained = targets(batch)
        scores = self.head.scores(model, inputs, labels, trained, correct=True)
        row = torch.stack([-scores.logps.double().sum(), trained.sum().double(), scores.correct.sum().double()])
        self.totals = row if self.totals is None else self.totals + row

    def result(self, accelerator) -> dict[str, Any]:
        totals = self.totals if self.totals is not None else torch.zeros(3, dtype=torch.float64,
                                                                         device=accelerator.device)
        loss_sum, tokens, correct = accelerator.reduce(totals, reduction="sum").tolist()
        if tokens == 0:
            return {"loss": float("nan"), "perplexity": float("nan"), "token_accuracy": float("nan"), "tokens": 0}
        loss = loss_sum / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "token_accuracy": correct / tokens,
                "tokens": int(tokens)}
