"""The kinds of fine-tuning (spec.task), each behind the `Task` interface of tasks/base.py."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kubetune_api import PREFERENCE_OBJECTIVES, TaskType

from .base import Evaluation, Task

if TYPE_CHECKING:
    from kubetune_api import TrainerConfig

    from ..storage import Storage

__all__ = ["Evaluation", "Task", "task_for"]


def task_for(config: TrainerConfig, model_dir: Path, storage: Storage | None = None) -> Task:
    """The Task of config.task (and config.objective), for the model folder `model_dir`."""
    if config.objective in PREFERENCE_OBJECTIVES:
        from .preference import Preference as cls
    elif config.task == TaskType.sequence_classification:
        from .sequence_classification import SequenceClassification as cls
    elif config.task == TaskType.image_classification:
        from .image_classification import ImageClassification as cls
    else:
        from .causal_lm import CausalLM as cls
    return cls(config, model_dir, storage)
