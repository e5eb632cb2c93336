"""Stage 5, evaluate: the task's metrics of the model on a split (validation or test), over every process.

The task scores batches (`Task.evaluation`, an `Evaluation`); this stage shares the split out, runs the model in
eval mode, and beats per batch. `baseline_difference` is what the manifest reports beside a baseline: fine-tuned
minus base.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .metrics import TrainerMetrics
    from .tasks.base import Task


class Evaluation(ABC):
    """One split's evaluation, accumulated batch by batch in every process; `result` combines the processes
    (a collective: every process calls it). Batches made by `Task.blank` must count for nothing."""

    @abstractmethod
    def add(self, model, batch: dict[str, torch.Tensor]) -> None:
        """Score one batch (already on the device, under autocast and no_grad)."""

    @abstractmethod
    def result(self, accelerator) -> dict[str, Any]:
        """The split's metrics over all processes: scalars at the top level ("loss", "accuracy", ...), details
        (per-class scores, a confusion matrix) nested. Every process gets the same result."""


def eval_batches(task: Task, examples: Sequence, rank: int, processes: int, batch_size: int) -> Iterator[dict]:
    """This process's share of an evaluation split, in batches. Every process yields as many batches as
    rank 0 (the largest share), topping up with blank batches: a sharded forward is a collective that all
    processes must join."""
    mine, most = examples[rank::processes], len(examples[0::processes])
    for i in range(0, most, batch_size):
        yield task.collate(list(mine[i : i + batch_size])) if i < len(mine) else task.blank(examples[0])


def evaluate(task: Task, model, examples: Sequence, split: str, accelerator, batch_size: int,
             metrics: TrainerMetrics | None = None) -> dict[str, Any]:
    """The task's metrics of `model` on `examples` (this process's share of them), combined over processes."""
    import torch  # torch: not for kubetune validate

    was_training = model.training
    model.eval()
    evaluation = task.evaluation(split)
    with torch.no_grad():
        for batch in eval_batches(task, examples, accelerator.process_index, accelerator.num_processes, batch_size):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                evaluation.add(model, batch)
            if metrics:
                metrics.beat()
        result = evaluation.result(accelerator)
    model.train(was_training)
    return result


def scalars(result: dict[str, Any]) -> dict[str, float]:
    """The top-level numbers of a result (its details, nested, left out)."""
    return {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def baseline_difference(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """Fine-tuned minus base, per scalar metric both have (counts such as tokens and samples left out)."""
    counts = ("tokens", "samples", "generated")
    both = scalars(result).keys() & scalars(baseline).keys()
    return {k: result[k] - baseline[k] for k in sorted(both)
            if k not in counts and math.isfinite(result[k]) and math.isfinite(baseline[k])}
