"""The model card and the plots of the run record (issue 31), from manifest documents like the trainer's: the card
parses with huggingface_hub, its model-index reads back as the test and baseline metrics, the body has the
before/after table and the ways to load the model; each plot is a valid, non-blank PNG."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from huggingface_hub import ModelCard, ModelCardData, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from kubetune_trainer.record.card import CardContext, model_card
from kubetune_trainer.record.files import write_record
from kubetune_trainer.record.plots import draw
from PIL import Image

SHA = "ab" * 32
CLASSIFIER = {
    "job": "tickets-clf", "run": {"uid": "uid-1"}, "task": "sequence-classification",
    "labels": ["billing", "shipping", "other"], "headline": "accuracy", "method": "lora",
    "baseModel": {"uri": "hf://org/tiny-bert", "sha256": SHA},
    "datasets": {split: {"uri": f"s3://data/tickets/{split}.jsonl", "sha256": SHA, "samples": 40, "tokens": 900}
                 for split in ("train", "validation", "test")},
    "hyperparameters": {"learningRate": 2e-4, "batchSize": 4, "maxSteps": 20, "scheduler": "cosine"},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targetModules": ["all-linear"]},
    "steps": 20, "totalSteps": 20, "epochs": 2.0, "earlyStopped": False, "tokensTrained": 18000,
    "metrics": {"test": {"loss": 0.41, "accuracy": 0.85, "f1": 0.8, "samples": 40,
                         "per_class": {"billing": {"f1": 0.9}},
                         "confusion_matrix": {"labels": ["billing", "shipping", "other"],
                                              "matrix": [[12, 1, 0], [2, 11, 1], [0, 2, 11]]}},
                "baseline": {"test": {"loss": 1.1, "accuracy": 0.33, "f1": 0.2, "samples": 40}}},
    "selected": {"select": "best", "step": 15, "metric": "accuracy", "value": 0.86},
    "wallTimeSeconds": 5400.0, "trainTimeSeconds": 4000.0, "processes": 2, "precision": "bf16",
    "checkpoints": [{"step": 10, "uri": "s3://out/clf/checkpoints/step-00000010/", "time": "2026-12-06T15:00:00Z",
                     "validation": {"loss": 0.6, "accuracy": 0.7}, "kept": False},
                    {"step": 15, "uri": "s3://out/clf/checkpoints/step-00000015/", "time": "2026-12-06T15:01:00Z",
                     "validation": {"loss": 0.45, "accuracy": 0.86}, "kept": True, "published": True}],
}
CONTEXT = CardContext(base_model="org/tiny-bert", output_uri="s3://out/clf/", license="apache-2.0",
                      data_summary="40 records, 900 tokens", quality_summary="2 duplicates dropped", gpus=2,
                      gpu_name="NVIDIA H100")
DPO = {**copy.deepcopy(CLASSIFIER), "job": "support-dpo", "task": "causal-lm", "objective": "dpo", "headline": "loss",
       "method": "full", "lora": None, "labels": None, "selected": {"select": "last", "step": 20},
       "metrics": {"test": {"loss": 0.5, "rewards_accuracy": 0.7, "tokens": 99}}}
for key in ("labels", "lora"):
    del DPO[key]


def _records(preference: bool = False) -> list[dict]:
    rows = []
    for step in range(1, 21):
        rows.append({"step": step, "kind": "train", "loss": 2.0 / step,
                     **({"rewards_margin": step / 10, "rewards_accuracy": min(1.0, step / 15)} if preference else {})})
        if step % 5 == 0:
            rows.append({"step": step, "kind": "validation", "loss": 1.5 / step, "accuracy": 0.5 + step / 50})
    return rows


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_the_card_parses_and_its_model_index_holds_the_test_and_baseline_metrics(tmp_path):
    path = tmp_path / "README.md"
    model_card(CLASSIFIER, CONTEXT).save(path)
    card, meta = ModelCard.load(path), metadata_load(path)
    assert card.data.to_dict() == meta
    assert meta["base_model"] == "org/tiny-bert" and meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-classification" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == [f"s3://data/tickets/{s}.jsonl" for s in ("train", "validation", "test")]
    assert meta["kubetune"]["datasets"]["test"] == {"uri": "s3://data/tickets/test.jsonl", "sha256": SHA}
    assert {"kubetune", "sequence-classification", "lora"} <= set(meta["tags"])
    name, results = model_index_to_eval_results(meta["model-index"])  # the Hub's reading: raises on a bad index
    assert name == "tickets-clf"
    got = {(r.metric_name, r.metric_value) for r in results}
    assert got == {("loss", 0.41), ("accuracy", 0.85), ("f1", 0.8), ("loss (base model, before fine-tuning)", 1.1),
                   ("accuracy (base model, before fine-tuning)", 0.33), ("f1 (base model, before fine-tuning)", 0.2)}
    assert {(r.task_type, r.dataset_type, r.dataset_split, r.dataset_revision) for r in results} == {
        ("text-classification", "s3://data/tickets/test.jsonl", "test", SHA)}
    ModelCardData(**meta, ignore_metadata_errors=False)  # strict: the metadata loads back whole


def test_the_body_tells_what_how_and_how_well(tmp_path):
    text = model_card(CLASSIFIER, CONTEXT).text
    for heading in ("## Task", "## Data", "## Training", "## Hardware and time", "## Results", "## Checkpoints",
                    "## Use it", "## Files"):
        assert heading in text
    assert "| accuracy | 0.33 | 0.85 | 0.52 |" in text  # base, fine-tuned, change
    assert "3 classes: billing, shipping, other" in text and "2 duplicates dropped" in text
    assert "| GPU-hours | 3.00 |" in text and "2 x NVIDIA H100" in text and "1 h 30 min" in text
    assert "PeftModel.from_pretrained" in text and 'pipeline("text-classification"' in text
    assert "None" not in text and "{'" not in text  # no Python reprs


def test_a_full_or_merged_model_is_a_transformers_card_with_vllm(tmp_path):
    meta = model_card(DPO, CardContext(base_model="s3://models/tiny/", output_uri="s3://out/dpo/")).data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "license" not in meta and "dpo" in meta["tags"]
    text = model_card(DPO, CardContext(base_model="s3://models/tiny/", output_uri="s3://out/dpo/")).text
    assert "vllm serve ./support-dpo --served-model-name support-dpo" in text and "No baseline" in text
    merged = model_card(CLASSIFIER | {"task": "causal-lm", "labels": None}, CONTEXT, merged=True)
    assert merged.data.library_name == "transformers" and "merged" in merged.data.tags
    assert "vllm serve ./tickets-clf-merged" in merged.text and "PeftModel" not in merged.text


def _check_png(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 300
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 5 and (pixels < 128).mean() > 0.005  # drawn on, not blank


def test_each_plot_is_a_valid_non_blank_png_and_the_card_links_it(tmp_path):
    record = write_record(tmp_path, CLASSIFIER, _records(), copy.deepcopy(CONTEXT))
    assert record["plots"] == {"Loss": "plots/loss.png", "Task metric": "plots/metric.png",
                               "Confusion matrix": "plots/confusion.png",
                               "Before and after fine-tuning": "plots/before-after.png"}
    for path in record["plots"].values():
        _check_png(tmp_path / path)
    card = (tmp_path / "README.md").read_text()
    assert "![Confusion matrix](plots/confusion.png)" in card
    preference = draw(tmp_path / "dpo", DPO, _records(preference=True))
    assert "Preference rewards" in preference and "Confusion matrix" not in preference
    _check_png(tmp_path / "dpo" / preference["Preference rewards"])


def test_a_merged_model_gets_its_own_card(tmp_path):
    (tmp_path / "merged").mkdir()
    doc = CLASSIFIER | {"merged": {"path": "merged/", "dtype": "bf16"}}
    record = write_record(tmp_path, doc, _records(), copy.deepcopy(CONTEXT))
    assert record["mergedCard"] == "merged/README.md"
    merged = ModelCard.load(tmp_path / "merged" / "README.md")
    assert merged.data.library_name == "transformers" and "](../plots/loss.png)" in merged.text
