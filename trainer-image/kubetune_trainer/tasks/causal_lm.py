"""causal-lm: a language model trained on chat, ShareGPT, instruction, completion or plain-text records, or on
(prompt, chosen, rejected) pairs, for the objective spec.objective names (objectives/: sft, dpo, orpo).

The task loads the tokenizer and the model, checks the records and caches them tokenized (data/cache.py), and with
evaluation.generation scores the test prompts' generated answers against the references (tasks/generation.py).
What a record is, the batches, the loss and the metrics are the objective's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune_api import DataFormat, TaskType

from ..data import validate_dataset
from ..data.cache import Cache, SplitWriter
from ..evaluate import Evaluation
from ..modeling import load_model, load_tokenizer, quiet_transformers
from ..objectives import objective_for
from ..sharding import is_sharded
from . import generation
from .base import Beat, CachesRows, GeneratesText, Task, TokenizesText, WindowMetrics, register

if TYPE_CHECKING:
    import torch


@register(TaskType.causal_lm)
class CausalLM(Task, CachesRows, GeneratesText, WindowMetrics, TokenizesText):
    headline = "loss"

    def __init__(self, config, model_dir: Path, storage=None):
        super().__init__(config, model_dir, storage)
        self.objective = objective_for(self)
        self._prompts: list | None = None  # the test prompts generation scores, when evaluation.generation is set

    @property
    def unit(self) -> str:
        return self.objective.unit

    def load_processor(self):
        self.processor = load_tokenizer(self.model_dir, **self.remote_code)
        return self.processor

    # -- data ---------------------------------------------------------------------------------------------

    def validate(self, split: str, path: Path, uri: str, fmt: DataFormat, min_samples: int):
        return validate_dataset(path, uri, fmt=fmt, tokenizer=self.processor,
                                max_seq_length=self.config.hyperparameters.max_seq_length,
                                min_samples=min_samples, split=split, pairs=self.objective.pairs,
                                fields=self.config.dataset.fields, checks=self.checks(split, uri))

    def examples(self, split: str, path: Path, uri: str, fmt: DataFormat) -> list:
        examples = self.objective.tokenize(path, uri, fmt)
        self._keep_prompts(split, examples)
        return self.objective.pack(examples)

    def prepare(self, split: str, path: Path, uri: str, fmt: DataFormat, min_samples: int, into: Path,
                beat: Beat | None = None):
        hp, pairs = self.config.hyperparameters, self.objective.pairs
        writer = SplitWriter(into)

        def sink(chunk) -> None:
            writer.add(chunk)
            if beat:
                beat()

        report = validate_dataset(path, uri, fmt=fmt, tokenizer=self.processor, max_seq_length=hp.max_seq_length,
                                  min_samples=min_samples, split=split, sink=sink, pairs=pairs,
                                  fields=self.config.dataset.fields, checks=self.checks(split, uri))
        report.sequences = writer.close(hp.max_seq_length, hp.packing, hp.seed, pairs=pairs)
        return report

    def load(self, split: str, cache: Cache):
        self._keep_prompts(split, cache.examples(split))
        return cache.sequences(split)

    def _keep_prompts(self, split: str, examples) -> None:
        spec = self.config.evaluation.generation
        if split == "test" and spec is not None:
            self._prompts = generation.prompts(self.objective.prompted(examples), self.processor, spec.max_samples)

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        return self.objective.collate(examples)

    def blank(self, example) -> dict[str, torch.Tensor]:
        return self.objective.blank(example)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return self.objective.units(batch)

    def size(self, example) -> tuple[int, int]:
        return self.objective.size(example)

    # -- model --------------------------------------------------------------------------------------------

    def load_model(self, mixed_precision: str, sharded: bool):
        model = load_model(self.model_dir, self.config.method, mixed_precision, self.config.hyperparameters,
                           sharded=sharded, **self.remote_code, **self.weight_formats)
        self.objective.attach(model, mixed_precision, sharded)
        return model

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.objective.loss(model, batch)

    def window_metrics(self, accelerator) -> dict[str, float]:
        return self.objective.window_metrics(accelerator)

    def evaluation(self, split: str) -> Evaluation:
        return self.objective.evaluation(split)

    def generation_metrics(self, model, accelerator, beat: Beat) -> dict[str, Any]:
        spec = self.config.evaluation.generation
        if spec is None or self._prompts is None:
            return {}
        return generation.generation_metrics(model, self.processor, self._prompts, spec, accelerator, beat,
                                             is_sharded(self.config, accelerator))

    # -- what is recorded and published ---------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.objective.describe()}

    def load_base(self, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype, **self.remote_code,
                                                        **self.weight_formats)
