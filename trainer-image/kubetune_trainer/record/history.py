"""The run's metric history: `metrics.jsonl`, one JSON object per line, written by rank 0 as the run goes.

Each line has the `step`, the `time` (RFC 3339, UTC), the `kind` and the values:
- `train`: every hyperparameters.loggingSteps (loss, learning_rate, grad_norm, tokens_per_second, step_seconds,
  gpu_memory_bytes on a GPU, the objective's own: rewards_accuracy, ...);
- `validation`: every evaluation.everySteps, all the task's metrics;
- `baseline` (step 0) and `test` (the published step): the test split before and after training.

The history rides along the report stream (`History.observe`: the events it records are the ones the log has), and
goes into every checkpoint (`save`); a resumed run starts from the checkpoint's copy (`resume`), so a preempted run
has one history with no step twice. `checkpoint_table` is the list of checkpoints the manifest and the status carry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

HISTORY = "metrics.jsonl"  # the file, in the output and in each checkpoint
KINDS = ("train", "validation", "baseline", "test")  # the report events the history keeps, by their name
Reporter = Callable[[dict], None]


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def plain(value):
    """`value` as strict JSON takes it: a non-finite number becomes null (json would write NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def read_records(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl; [] when there is none (a checkpoint from before the history)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class History:
    """The records of this run, appended to `path` one line at a time (`path` None: a process other than rank 0,
    which records nothing). `clock`: seconds since the epoch."""

    def __init__(self, path: Path | None, clock: Callable[[], float]):
        self.path, self.clock = path, clock
        self.records: list[dict] = []

    def observe(self, report: Reporter) -> Reporter:
        """`report`, recording on the way the events of the KINDS."""
        def recording(event: dict) -> None:
            self.add(event)
            report(event)
        return recording

    def add(self, event: dict) -> None:
        if self.path is None or event.get("event") not in KINDS:
            return
        values = {k: v for k, v in event.items() if k not in ("event", "step")}
        record = plain({"step": event.get("step", 0), "time": rfc3339(self.clock()), "kind": event["event"],
                        **values})
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def resume(self, records: Iterable[dict], step: int) -> None:
        """Start over from a checkpoint's records at `step` (none, at step 0): the lines up to that step are kept,
        and the file says the same (a restart on the same disk drops the lines after the checkpoint)."""
        if self.path is None:
            return
        self.records = [r for r in records if r["step"] <= step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write(self.path)

    def write(self, path: Path) -> Path:
        """Write the records to `path` (a checkpoint's copy, the output's)."""
        path.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in self.records))
        return path

    def save(self, directory: Path) -> None:
        """The copy a checkpoint carries."""
        if self.path is not None:
            self.write(directory / HISTORY)

    def of_kind(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["kind"] == kind]


def scalars(values: dict | None) -> dict[str, float]:
    """The finite top-level numbers of a result (nested details and counts as they are)."""
    return {k: v for k, v in (values or {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def checkpoint_entry(step: int, uri: str, seconds: float, validation: dict | None) -> dict:
    """One checkpoint as the run's state keeps it: its step, URI, time and the newest validation's metrics at that
    step (with the step they were measured at, when earlier)."""
    entry = {"step": step, "uri": uri, "time": rfc3339(seconds)}
    if validation:
        entry["validation"] = scalars({k: v for k, v in validation.items() if k != "step"})
        if validation.get("step") != step:
            entry["validationStep"] = validation.get("step")
    return entry


def checkpoint_table(checkpoints: list[dict], kept: Iterable[int], selected: int, published: dict) -> list[dict]:
    """The manifest's checkpoints: every one the run wrote (`kept`: whether it is still in storage, checkpoint.keep
    prunes older ones), and the published model as the entry of its step (`published`: {"step", "uri", "time",
    "validation"}), marked `"published": true`."""
    kept = set(kept)
    rows = [{**c, "kept": c["step"] in kept} for c in checkpoints]
    rows = [{**r, "published": True} if r["step"] == selected else r for r in rows]
    if all(r["step"] != selected for r in rows):
        rows.append({**published, "kept": True, "published": True})
    return sorted(rows, key=lambda r: r["step"])
