"""A run's plan: how many sequences one optimizer step takes and how many steps the run has.

A module of its own, without torch: the data report (data/report.py) of `kubetune validate` plans the steps as
the training loop (train.py) will.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kubetune_api import TrainerConfig


@dataclass
class Plan:
    """How many samples each step takes and how many steps the run has; fixed by the data and hyperparameters
    of the run's first start (a resumed run keeps `step_samples` whatever its number of processes)."""

    sequences: int
    step_samples: int  # sequences per optimizer step, over all processes
    steps_per_epoch: int
    total_steps: int
    batch_size: int  # per process and micro-batch
    processes: int

    @classmethod
    def make(cls, sequences: int, config: TrainerConfig, processes: int, step_samples: int | None = None) -> Plan:
        hp = config.hyperparameters
        step_samples = step_samples or hp.batch_size * hp.gradient_accumulation_steps * processes
        steps_per_epoch = max(1, sequences // step_samples)
        total = hp.max_steps or max(1, math.ceil(hp.epochs * steps_per_epoch))
        return cls(sequences, step_samples, steps_per_epoch, total, hp.batch_size, processes)

    @property
    def accumulation(self) -> int:
        """Micro-batches per process per step (the last may be short, or empty, for some processes)."""
        return math.ceil(self.step_samples / (self.batch_size * self.processes))

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch
