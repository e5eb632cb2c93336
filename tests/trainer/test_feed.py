"""feed.py: the prefetching StepFeed hands out exactly the batches the loop would build itself, in order, one
step ahead; HostFlags agrees on booleans (one process: the flags themselves)."""

from __future__ import annotations

import threading

import torch
from kubetune_trainer.feed import HostFlags, StepBatches, StepFeed


def test_the_feed_prepares_the_next_step_while_this_one_trains_and_changes_no_batch():
    prepared: list[tuple[int, str]] = []
    done = {s: threading.Event() for s in range(5)}

    def prepare(step: int) -> StepBatches:
        prepared.append((step, threading.current_thread().name))
        done[step].set()
        return StepBatches([{"input_ids": torch.full((2, 3), step)}], tokens=6, samples=2, units=step)

    feed = StepFeed(prepare, pin=False)
    try:
        got = []
        for step in range(2, 5):
            batches = feed.get(step, last=5)
            got.append(batches)
            if step + 1 < 5:
                assert done[step + 1].wait(10), "the next step is prepared without being asked for"
        assert [b.units for b in got] == [2, 3, 4]
        assert [next(b.on(torch.device("cpu")))["input_ids"][0, 0].item() for b in got] == [2, 3, 4]
        assert [s for s, _ in prepared] == [2, 3, 4], "nothing past the last step, no step twice"
        assert all(name.startswith("kubetune-feed") for _, name in prepared[1:])
        assert feed.get(0, last=5).units == 0, "a step out of order (a resume) is prepared on the spot"
    finally:
        feed.close()


def test_flags_of_a_single_process_are_its_own():
    assert HostFlags().any(True, False) == [True, False]
