"""The kinds of fine-tuning (spec.task), each behind the `Task` interface of tasks/base.py and registered there for
its spec.TaskType: causal-lm (causal_lm.py, whose objectives are in objectives/), sequence-classification and
image-classification (classification.py holds what they share). A new task is one more module here, imported
below: docs/adding-a-task.md.

`kubetune validate` imports them all (validation.py), and for a data cache found in object storage uses no model:
the task modules, the objectives and what they import (modeling.py, kernels/, evaluate.py) import torch inside
the functions that use it, so that such a validation imports none (tests/trainer/test_imports.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..evaluate import Evaluation
from . import causal_lm, image_classification, sequence_classification
from .base import TASKS, CachesRows, GeneratesText, Task, TokenizesText, WindowMetrics, register

if TYPE_CHECKING:
    from kubetune_api import TrainerConfig

    from ..storage import Storage

__all__ = ["TASKS", "CachesRows", "Evaluation", "GeneratesText", "Task", "TokenizesText", "WindowMetrics",
           "causal_lm", "image_classification", "register", "sequence_classification", "task_for"]


def task_for(config: TrainerConfig, model_dir: Path, storage: Storage | None = None) -> Task:
    """The Task registered for config.task, for the model folder `model_dir`."""
    if config.task not in TASKS:
        raise ConfigError(f"task {config.task.value} is not implemented by this trainer image")
    return TASKS[config.task](config, model_dir, storage)
