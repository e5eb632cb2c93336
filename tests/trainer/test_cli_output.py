"""What `kubetune run` prints: readable lines per event, no Python reprs or one-line JSON of nested results, and
a final line with the task's headline test metric against the base model's."""

from __future__ import annotations

import io
import json

import pytest
from kubetune_trainer.cli import ProgressReporter, event_line, outcome, success_message
from rich.console import Console
from rich.progress import Progress

PER_CLASS = {"negative": {"precision": 0.9, "recall": 0.8, "f1": 0.847, "support": 40},
             "positive": {"precision": 0.82, "recall": 0.91, "f1": 0.8626, "support": 44}}
SAMPLES = [{"prompt": "How do I reset my password?", "reference": "Open settings.", "generated": "Open {it}."},
           {"prompt": "Refund?", "reference": "Within 30 days.", "generated": "['no']"}]
EVENTS = [
    {"event": "validation", "step": 8, "loss": 0.61234, "accuracy": 0.75, "f1": 0.7, "samples": 84,
     "per_class": PER_CLASS, "confusion_matrix": [[32, 8], [4, 40]]},
    {"event": "baseline", "split": "test", "loss": 0.6931, "accuracy": 0.3344, "f1": 0.25, "samples": 84,
     "per_class": PER_CLASS, "confusion_matrix": [[40, 0], [44, 0]]},
    {"event": "selected", "select": "best", "step": 32, "metric": "accuracy", "value": 0.9},
    {"event": "test", "step": 40, "loss": 0.31, "accuracy": 0.9123, "f1": 0.91, "f1_weighted": 0.91,
     "precision": 0.9, "recall": 0.92, "samples": 84, "per_class": PER_CLASS, "confusion_matrix": [[36, 4], [3, 41]]},
    {"event": "generation", "exact_match": 0.25, "bleu": 31.5, "rouge_l": 0.52, "generated": 2, "samples": SAMPLES},
    {"event": "baseline", "split": "test", "loss": 2.5, "perplexity": 12.18, "token_accuracy": 0.2, "tokens": 999,
     "exact_match": 0.0, "samples": SAMPLES},
]


def printed(events: list[dict]) -> str:
    console = Console(file=io.StringIO(), width=120, color_system=None)
    reporter = ProgressReporter(Progress(console=console), verbose=False)
    for event in events:
        reporter(event)
    return console.file.getvalue()


def test_results_are_readable_lines_without_reprs():
    text = printed(EVENTS)
    for repr_start in ("{'", "[[", '{"', "[{"):
        assert repr_start not in text, text
    lines = text.splitlines()
    assert lines[0] == "validation step 8: loss 0.6123, accuracy 0.75, f1 0.7, samples 84"
    assert lines[1] == "baseline test: loss 0.6931, accuracy 0.3344, f1 0.25, samples 84"
    assert lines[2] == "selected step 32 (best, validation accuracy 0.9)"
    assert lines[3].startswith("test step 40: loss 0.31, accuracy 0.9123, f1 0.91, f1_weighted 0.91")
    assert "generation: exact_match 0.25, bleu 31.5, rouge_l 0.52, generated 2" in lines
    assert "baseline test: loss 2.5, perplexity 12.18, token_accuracy 0.2, tokens 999, exact_match 0" in lines


def test_the_test_split_gets_a_small_per_class_table():
    rows = [line.split() for line in printed(EVENTS[3:4]).splitlines()[1:]]
    assert rows[0] == ["class", "precision", "recall", "f1", "support"]
    assert rows[1:] == [["negative", "0.9", "0.8", "0.847", "40"], ["positive", "0.82", "0.91", "0.8626", "44"]]
    many = {f"class-{i}": {"f1": 0.5} for i in range(30)}
    text = printed([{**EVENTS[3], "per_class": many}])
    assert "class-11" in text and "class-12" not in text and "18 more in manifest.json" in text
    listed = printed([{**EVENTS[3], "per_class": [{"label": "cat", "f1": 0.5}, {"label": "dog", "f1": 0.25}]}])
    assert "cat" in listed and "0.25" in listed and "label" not in listed.splitlines()[1]


def test_other_events_flatten_one_level():
    line = event_line({"event": "resumed", "step": 8, "checkpoint": "s3://c/step-8/",
                       "processes": {"before": 2, "now": 1}})
    assert line == "resumed step 8: checkpoint s3://c/step-8/, processes.before 2, processes.now 1"


@pytest.mark.parametrize(("manifest", "expected"), [
    ({"steps": 40, "headline": "accuracy",
      "metrics": {"test": {"accuracy": 0.9123, "per_class": PER_CLASS}, "baseline": {"test": {"accuracy": 0.3344}}}},
     "40 steps, test accuracy 0.9123 vs base 0.3344"),
    ({"steps": 24, "headline": "loss", "metrics": {"test": {"loss": 1.23456}}}, "24 steps, test loss 1.235"),
    ({"steps": 24, "metrics": {"test": {"loss": 1.5}, "baseline": {"test": {"loss": 2.0}}}},  # an older manifest
     "24 steps, test loss 1.5 vs base 2"),
    ({"steps": 24, "metrics": {"train": {"loss": 1.0}}}, "24 steps"),
])
def test_final_line(manifest, expected):
    assert outcome(manifest) == expected


CLASSIFIER = {
    "steps": 40, "totalSteps": 40, "tokensTrained": 0, "task": "sequence-classification", "headline": "accuracy",
    "selected": {"select": "best", "step": 32, "metric": "accuracy", "value": 0.9},
    "metrics": {"test": {"loss": 0.31234567, "accuracy": 0.91234, "f1": float("nan"), "samples": 200,
                         "per_class": PER_CLASS, "confusion_matrix": [[90, 10], [8, 92]]},
                "baseline": {"test": {"loss": 0.69, "accuracy": 0.3344, "samples": 200}}},
}


def test_success_message_fits_a_termination_message():
    """At most 4096 bytes (Kubernetes' limit): with too many metrics, the headline ones are kept."""
    many = {f"metric_{i:03d}": i + 0.123456789 for i in range(300)}
    manifest = {**CLASSIFIER, "metrics": {"test": {**many, "accuracy": 0.9},
                                          "baseline": {"test": {**many, "accuracy": 0.3}}}}
    report = success_message(manifest, "s3://out/x/manifest.json", "ab" * 32)
    assert len(report.encode()) <= 4096
    assert json.loads(report)["metrics"] == {"test": {"accuracy": 0.9}, "baseline": {"accuracy": 0.3}}
    doc = json.loads(success_message(CLASSIFIER, "s3://out/x/manifest.json", "ab" * 32))
    assert doc["metrics"]["test"] == {"loss": 0.312346, "accuracy": 0.91234, "samples": 200}  # 6 significant digits
    assert doc["headline"] == "accuracy" and doc["selectedStep"] == 32 and doc["steps"] == 40


def test_validate_shows_the_records_of_each_class(tmp_path):
    """`kubetune validate` on a classification job: the split table, then one row per class and a column per
    split."""
    from kubetune_trainer.cli import app
    from typer.testing import CliRunner

    from tests.datafixtures import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text("{}")
    for split, n in (("train", 6), ("test", 2)):
        rows = [{"text": f"record {i} of {split}", "label": ("spam", "ham")[i % 2]} for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "spam"},
           "spec": {"task": "sequence-classification", "baseModel": {"uri": str(tmp_path / "model")},
                    "dataset": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
                    "output": {"uri": str(tmp_path / "out") + "/"}}}
    (tmp_path / "job.yaml").write_text(json.dumps(job))
    done = CliRunner().invoke(app, ["validate", "--config", str(tmp_path / "job.yaml")],
                              env={"COLUMNS": "120", "KUBETUNE_TERMINATION_LOG": str(tmp_path / "log")})
    assert done.exit_code == 0, done.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in done.output.splitlines() if line.startswith("│")}
    assert rows["ham"] == ["3", "1"] and rows["spam"] == ["3", "1"], done.output


SUMMARY = "train 2,000 samples, 90.0k tokens (30.0k trained); packed into 190 sequences (93% full); 24 steps"


def test_the_data_events_are_one_readable_line_each():
    text = printed([
        {"event": "data_cache", "cache": "downloaded", "uri": "s3://out/job/checkpoints/data-cache/ab12/",
         "key": "ab12"},
        {"event": "data_cache_rebuilt", "uri": "/work/data-cache/ab12", "problem": "train/ids.bin is truncated "
         "(8 of 16 bytes)"},
        {"event": "data", "splits": {"train": {"samples": 2000, "tokens": 90000, "trainedTokens": 30000,
                                               "truncated": 0}}, "sequences": 190, "plannedSteps": 24,
         "summary": SUMMARY},
    ])
    assert text.splitlines() == [
        "data cache downloaded: s3://out/job/checkpoints/data-cache/ab12/",
        "data cache /work/data-cache/ab12 not used: train/ids.bin is truncated (8 of 16 bytes)",
        f"data {SUMMARY}",
    ]
