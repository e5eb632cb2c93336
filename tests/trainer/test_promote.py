"""`kubetune promote`: a sweep's best trial's output, copied under the sweep's output with sweep.json last."""

from __future__ import annotations

import json

import pytest
from kubetune_api import TrainerConfig
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.promote import promote
from kubetune_trainer.storage import Storage


def trial_config(tmp_path) -> TrainerConfig:
    return TrainerConfig(job_name="lr-3", base_model={"uri": "s3://m/"}, dataset={"train": "s3://d/t.jsonl"},
                         output={"uri": str(tmp_path / "sweep" / "trials" / "lr-3") + "/"}, work_dir=str(tmp_path))


def test_the_published_output_is_copied_and_named(tmp_path):
    config = trial_config(tmp_path)
    out = tmp_path / "sweep" / "trials" / "lr-3"
    for rel, text in {"adapter_model.safetensors": "weights", "adapter_config.json": "{}", "run.json": "{}",
                      "manifest.json": json.dumps({"job": "lr-3", "files": ["adapter_model.safetensors"]}),
                      "checkpoints/step-4/state.pt": "ckpt", ".staging/abc/x": "partial"}.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    best = str(tmp_path / "sweep" / "best") + "/"
    record = {"sweep": "lr", "trial": "lr-3", "parameters": {"method.lora.r": 4}, "metric": {"loss": 1.2}}
    doc = promote(config, best, record, Storage(config.storage))
    copied = sorted(p.relative_to(tmp_path / "sweep" / "best").as_posix()
                    for p in (tmp_path / "sweep" / "best").rglob("*") if p.is_file())
    assert copied == ["adapter_config.json", "adapter_model.safetensors", "manifest.json", "sweep.json"]
    assert json.loads((tmp_path / "sweep" / "best" / "sweep.json").read_text()) == doc
    assert doc["trial"] == "lr-3" and doc["parameters"] == {"method.lora.r": 4} and doc["files"] == 2
    assert doc["source"] == str(out) + "/" and len(doc["manifestSha256"]) == 64


def test_nothing_published_is_an_error(tmp_path):
    config = trial_config(tmp_path)
    with pytest.raises(ConfigError, match="no manifest.json"):
        promote(config, str(tmp_path / "best") + "/", {}, Storage(config.storage))
