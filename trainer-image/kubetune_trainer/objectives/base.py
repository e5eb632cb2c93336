"""What the causal-LM task trains for (spec.objective), behind the `CausalObjective` interface, and its registry.

The causal-LM task (tasks/causal_lm.py) loads the tokenizer and the model, reads, checks and caches the records,
and generates for metrics. Its objective decides the rest: what a record is (a sequence, or a (chosen, rejected)
pair), how the tokenized records are packed and batched, the loss, and the metrics of training and evaluation.
An objective registers itself for its spec.Objective value with `@register`; the task looks it up in OBJECTIVES,
so adding one touches neither the task nor the loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kubetune_api import DataFormat, Objective

from ..errors import ConfigError
from ..kernels.loss import LossHead
from ..kernels.loss import choose as choose_loss
from ..modeling import device_type
from ..registry import Registry

if TYPE_CHECKING:
    import torch

    from ..data import Example
    from ..evaluate import Evaluation
    from ..tasks.base import Task


class CausalObjective(ABC):
    name: ClassVar[Objective]  # set by @register
    unit: ClassVar[str]  # what the loss is a mean over: "token", or "sample" (a pair)
    pairs: ClassVar[bool] = False  # its records are (chosen, rejected) pairs: how the data stage reads them

    def __init__(self, task: Task):
        """`task`: the causal-LM task, for its config, model folder and tokenizer (task.processor, once loaded)."""
        self.task, self.config, self.params = task, task.config, task.config.objective_params
        self.head = LossHead()  # how the loss scores tokens (kernels/loss.py); chosen for the model by attach

    @property
    def pad_id(self) -> int:
        return self.task.processor.pad_token_id

    # -- data ---------------------------------------------------------------------------------------------

    @abstractmethod
    def tokenize(self, path: Path, uri: str, fmt: DataFormat) -> list[Example]:
        """A split's records as tokenized sequences (a pair as its chosen then its rejected sequence)."""

    @abstractmethod
    def pack(self, examples: list[Example]) -> Sequence:
        """The tokenized sequences as training-ready examples (packed where hyperparameters.packing asks)."""

    def prompted(self, examples: Sequence[Example]) -> Sequence[Example]:
        """The sequences that are a prompt and its reference answer, for generation metrics: all of them."""
        return examples

    @abstractmethod
    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        """Task.collate."""

    @abstractmethod
    def blank(self, example) -> dict[str, torch.Tensor]:
        """Task.blank."""

    @abstractmethod
    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Task.units."""

    @abstractmethod
    def size(self, example) -> tuple[int, int]:
        """Task.size."""

    # -- model --------------------------------------------------------------------------------------------

    def attach(self, model, mixed_precision: str, sharded: bool) -> None:
        """Get ready to train `model` (the task's, just loaded): choose the loss head for it, and note the choice
        in model.kubetune_choices."""
        self.head = choose_loss(self.config.hyperparameters.performance.loss, model, device_type())
        model.kubetune_choices = {**getattr(model, "kubetune_choices", {}), "loss": self.head.reason}

    @abstractmethod
    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Task.loss."""

    @abstractmethod
    def evaluation(self, split: str) -> Evaluation:
        """Task.evaluation."""

    def window_metrics(self, accelerator) -> dict[str, float]:
        """WindowMetrics.window_metrics: none beside the loss."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What the manifest records of the objective beside the task: nothing for the default, sft."""
        return {}


OBJECTIVES: Registry[type[CausalObjective]] = Registry("objective")  # spec.objective -> its class
register = OBJECTIVES.register  # class decorator: @register(Objective.x)


def objective_for(task: Task) -> CausalObjective:
    """The objective of task.config.objective, for `task`."""
    objective = task.config.objective
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective {objective.value} is not implemented by this trainer image")
    return OBJECTIVES[objective](task)
