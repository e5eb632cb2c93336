"""Nothing the trainer loads from storage runs code unless the spec opts in (baseModel.trustRemoteCode).

A model folder whose config.json points at its own Python (`auto_map`, a model type transformers does not know)
is refused with a ConfigError naming baseModel, and its code never runs; with trustRemoteCode it loads.
Checkpoints are safetensors and JSON, the optimizer state `torch.load(weights_only=True)` (test_resume.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubetune_api import TrainerConfig
from kubetune_dev.tiny import make_tiny_base
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.tasks import task_for

CODE = '''
import os
import pathlib

pathlib.Path(os.environ["KUBETUNE_REMOTE_CODE_MARKER"]).write_text("the folder's code ran")

from transformers import LlamaConfig, LlamaForCausalLM


class MarkedConfig(LlamaConfig):
    model_type = "marked-llama"


class MarkedForCausalLM(LlamaForCausalLM):
    config_class = MarkedConfig
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny Llama whose config asks for the folder's own classes."""
    base = make_tiny_base(tmp_path_factory.mktemp("remote-code"), ["a few words", "of text"], vocab_size=300,
                          hidden_size=32, layers=1, heads=2)
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="marked-llama", architectures=["MarkedForCausalLM"],
                  auto_map={"AutoConfig": "marked.MarkedConfig", "AutoModelForCausalLM": "marked.MarkedForCausalLM"})
    (base / "config.json").write_text(json.dumps(config))
    (base / "marked.py").write_text(CODE)
    return base


def task(tmp_path: Path, base: Path, trust: bool):
    config = TrainerConfig.model_validate({
        "jobName": "remote", "baseModel": {"uri": str(base), "trustRemoteCode": trust},
        "dataset": {"train": str(tmp_path / "train.jsonl")}, "method": {"type": "lora", "lora": {"r": 2}},
        "output": {"uri": str(tmp_path / "out")}, "metrics": {"enabled": False}, "workDir": str(tmp_path / "w")})
    return task_for(config, base)


def test_a_folder_that_needs_its_own_code_is_refused(tmp_path, folder, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("KUBETUNE_REMOTE_CODE_MARKER", str(marker))
    t = task(tmp_path, folder, trust=False)
    t.processor = None
    with pytest.raises(ConfigError, match="baseModel"):
        t.load_model("no", sharded=False)
    assert not marker.exists()


def test_trust_remote_code_runs_it(tmp_path, folder, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("KUBETUNE_REMOTE_CODE_MARKER", str(marker))
    model = task(tmp_path, folder, trust=True).load_model("no", sharded=False)
    assert marker.exists() and type(model.get_base_model()).__name__ == "MarkedForCausalLM"
