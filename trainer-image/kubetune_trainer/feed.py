"""What keeps the training loop's host out of the accelerator's way.

- `StepFeed`: each step's micro-batches are read, collated and (on CUDA) pinned on a helper thread while the
  step before trains, so the copy to the GPU is asynchronous (non_blocking) and the GPU does not wait for the
  data. The order is the loop's own (`step_indices`): prefetching changes no batch.
- `HostFlags`: the processes agree on host booleans (a SIGTERM, a timed checkpoint being due) over a gloo
  group of CPU tensors, so that deciding to stop never waits for the GPU's queue of work (an all-reduce on the
  accelerator's group followed by `.item()` would).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch


@dataclass
class StepBatches:
    """One process's share of a step: its micro-batches and what they hold (tokens, samples, loss units)."""

    batches: list[dict[str, torch.Tensor]]
    tokens: int
    samples: int
    units: int

    def on(self, device: torch.device):
        """The micro-batches on `device`, one at a time (asynchronous copies from pinned memory)."""
        for batch in self.batches:
            yield {n: t.to(device, non_blocking=True) for n, t in batch.items()}


class StepFeed:
    """`prepare(step) -> StepBatches` for step after step, one step ahead on a thread."""

    def __init__(self, prepare: Callable[[int], StepBatches], pin: bool):
        self._prepare, self._pin = prepare, pin
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kubetune-feed")
        self._next: tuple[int, object] | None = None

    def _make(self, step: int) -> StepBatches:
        batches = self._prepare(step)
        if self._pin:
            batches.batches = [{n: t.pin_memory() for n, t in b.items()} for b in batches.batches]
        return batches

    def get(self, step: int, last: int) -> StepBatches:
        """Step `step`'s batches (waiting for them if the thread is not done), and starts preparing the next
        one unless `step` is the `last` to train."""
        if self._next is not None and self._next[0] == step:
            batches = self._next[1].result()
        else:
            batches = self._make(step)
        self._next = (step + 1, self._pool.submit(self._make, step + 1)) if step + 1 < last else None
        return batches

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class HostFlags:
    """Any-process agreement on booleans over a gloo group (the default group when it is gloo already)."""

    def __init__(self):
        import torch.distributed as dist

        self._group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def any(self, *flags: bool) -> list[bool]:
        """For each flag, whether it is set in any process (a collective: every process calls it)."""
        values = torch.tensor([float(f) for f in flags])
        if self._group is not None:
            import torch.distributed as dist

            dist.all_reduce(values, group=self._group)
        return [bool(v) for v in values.tolist()]
