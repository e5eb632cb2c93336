"""The metric history (metrics.jsonl, issue 31): what it records from the report stream, how a resume keeps one
history with no step twice, and the checkpoint table of the manifest."""

from __future__ import annotations

import json
import math

from kubetune_trainer.record.history import (
    HISTORY,
    History,
    checkpoint_entry,
    checkpoint_table,
    read_records,
)


def _clock():
    return 1_800_000_000.0


def _train(step: int) -> dict:
    return {"event": "train", "step": step, "loss": 1.0 / step, "learning_rate": 1e-4, "grad_norm": 0.5,
            "tokens_per_second": 100.0, "step_seconds": 0.1}


def test_the_metric_events_are_recorded_and_passed_on_one_json_line_each(tmp_path):
    history, seen = History(tmp_path / HISTORY, _clock), []
    history.resume([], 0)
    report = history.observe(seen.append)
    for event in ({"event": "phase", "phase": "training"}, {"event": "baseline", "split": "test", "loss": 2.0},
                  _train(1), {"event": "validation", "step": 1, "loss": 1.5, "accuracy": math.nan,
                                                     "confusion_matrix": [[1, 0], [0, 1]]},
                  {"event": "checkpoint", "step": 1, "uri": "s3://b/c/"}, {"event": "test", "step": 1, "loss": 1.4}):
        report(event)
    assert len(seen) == 6  # every event still reaches the log
    lines = (tmp_path / HISTORY).read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: NaN is null
    assert [(r["kind"], r["step"]) for r in records] == [("baseline", 0), ("train", 1), ("validation", 1),
                                                         ("test", 1)]
    assert records[1] == {"step": 1, "time": "2027-01-15T08:00:00.000Z", "kind": "train", "loss": 1.0,
                          "learning_rate": 1e-4, "grad_norm": 0.5, "tokens_per_second": 100.0, "step_seconds": 0.1}
    assert records[2]["accuracy"] is None and records[2]["confusion_matrix"] == [[1, 0], [0, 1]]
    assert read_records(tmp_path / HISTORY) == history.records


def test_a_process_other_than_rank_0_records_nothing(tmp_path):
    history = History(None, _clock)
    history.resume([], 0)
    history.observe(lambda e: None)(_train(1))
    history.save(tmp_path)
    assert history.records == [] and not list(tmp_path.iterdir())


def test_a_resumed_run_has_every_step_exactly_once(tmp_path):
    """Killed after step 7 with a checkpoint at step 4 and the lines of steps 5-7 already on its disk: the restarted
    run keeps the checkpoint's lines (steps 1-4), trains 5-8 again, and the file has each step once."""
    first = History(tmp_path / "first" / HISTORY, _clock)
    first.resume([], 0)
    report = first.observe(lambda e: None)
    checkpoint_dir = tmp_path / "checkpoint"
    checkpoint_dir.mkdir()
    for step in range(1, 8):
        report(_train(step))
        if step % 2 == 0:
            report({"event": "validation", "step": step, "loss": 1.0})
        if step == 4:
            first.save(checkpoint_dir)

    again = History(tmp_path / "first" / HISTORY, _clock)  # the same disk: its file has steps 1-7
    again.resume(read_records(checkpoint_dir / HISTORY), 4)
    report = again.observe(lambda e: None)
    for step in range(5, 9):
        report(_train(step))
    records = read_records(tmp_path / "first" / HISTORY)
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in records if r["kind"] == "validation"] == [2, 4]
    assert len({(r["kind"], r["step"]) for r in records}) == len(records)


def test_the_checkpoint_table_marks_the_published_step_and_what_was_pruned():
    validation = {"step": 4, "loss": 1.25, "accuracy": 0.5, "per_class": {"a": {"f1": 1.0}}}
    checkpoints = [checkpoint_entry(4, "s3://b/ck/step-00000004/", _clock(), validation),
                   checkpoint_entry(8, "s3://b/ck/step-00000008/", _clock(), validation)]
    assert checkpoints[1]["validation"] == {"loss": 1.25, "accuracy": 0.5} and checkpoints[1]["validationStep"] == 4
    assert "validationStep" not in checkpoints[0]
    published = checkpoint_entry(10, "s3://b/out/", _clock(), {"step": 10, "loss": 1.0})
    table = checkpoint_table(checkpoints, [8], 10, published)
    assert [(r["step"], r["kept"], r.get("published", False)) for r in table] == [
        (4, False, False), (8, True, False), (10, True, True)]
    best = checkpoint_table(checkpoints, [4, 8], 4, published)  # output.select best: the step-4 weights
    assert [(r["step"], r.get("published", False)) for r in best] == [(4, True), (8, False)]
