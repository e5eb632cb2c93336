"""What a trainer process imports: every pod pays its imports before its first step and its first byte checked
(issue 30, the fixed cost per trial), so a process imports what its work uses and no more.

The validation pod of a run whose data cache is in object storage already (every trial of a sweep but the first)
loads no tokenizer and no model library: no transformers, no peft, no torch (about 1.5 CPU-s of imports). The
modules it reads import torch inside the functions that use it (validation.py, not pipeline.py, runs it). One that
tokenizes loads the tokenizer without torch (validation.without_torch), and writes the cache a process with torch
writes. A GPU run's estimate (data/report.py) still builds the model on the meta device, with torch and
transformers.
A LoRA process does not import bitsandbytes (QLoRA's), which peft imports when it can.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from kubetune_api import MethodType
from kubetune_trainer.modeling import without_bitsandbytes
from kubetune_trainer.validation import validate_only, validates_without_torch, without_torch

# Runs the command line as `kubetune` does and writes the names of the modules it imported to $MODULES at exit.
LISTING = """
import atexit, json, os, sys
atexit.register(lambda: open(os.environ["MODULES"], "w").write(json.dumps(sorted(
    name for name, module in sys.modules.items() if module is not None))))  # None: marked absent
from kubetune_trainer.cli import app
sys.argv = ["kubetune", *sys.argv[1:]]
app()
"""
MODEL_LIBRARIES = ("torch", "safetensors.torch", "transformers", "tokenizers", "peft", "bitsandbytes", "accelerate",
                   "matplotlib", "sympy")


def imported(args: list[str], env: dict, tmp_path) -> set[str]:
    modules = tmp_path / "modules.json"
    done = subprocess.run([sys.executable, "-c", LISTING, *args], env={**env, "MODULES": str(modules)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PyTorch" not in done.stderr, done.stderr[-3000:]  # no advice about a torch hidden on purpose
    return set(json.loads(modules.read_text()))


def validated(config, env: dict, tmp_path) -> tuple[dict, set[str]]:
    """`kubetune validate` of `config` in a fresh process: its report (the termination message) and its modules."""
    path = tmp_path / "trainer.yaml"
    path.write_text(config.to_yaml())
    termination = tmp_path / "termination-log"
    modules = imported(["validate", "--config", str(path)], {**env, "KUBETUNE_TERMINATION_LOG": str(termination)},
                       tmp_path)
    return json.loads(termination.read_text()), modules


def test_validation_with_its_data_cache_in_storage_loads_no_model_library(make_config, storage, trainer_env,
                                                                         tmp_path):
    config = make_config("imports-validate")
    _, first = validate_only(config, storage)  # here: tokenizes and writes the cache
    assert not first["cache"]["reused"]
    report, modules = validated(config, trainer_env, tmp_path)
    assert report["valid"] and report["cache"] == {**first["cache"], "reused": True}
    assert report["splits"] == first["splits"]
    assert [m for m in MODEL_LIBRARIES if m in modules] == []


def test_a_validation_that_tokenizes_writes_without_torch_the_cache_it_writes_with_torch(make_config, storage,
                                                                                       trainer_env, tmp_path):
    """Cold (no cache anywhere yet): the command line hides torch from transformers, says nothing about it, and
    its cache and report are those of a validation in this process, which has torch."""
    with_torch = make_config("imports-tokenize-torch", dataset={"cacheUri": "s3://data/cache-with-torch/"})
    without = make_config("imports-tokenize", dataset={"cacheUri": "s3://data/cache-without-torch/"})
    report, modules = validated(without, trainer_env, tmp_path)
    assert "torch" not in modules and {"transformers", "tokenizers"} <= modules
    assert not report["cache"]["reused"]

    _, expected = validate_only(with_torch, storage)  # this process has torch
    assert (report["splits"], report["cache"]["key"]) == (expected["splits"], expected["cache"]["key"])
    written = {uri.removeprefix(report["cache"]["uri"]) for uri in storage.list(report["cache"]["uri"])}
    assert written == {uri.removeprefix(expected["cache"]["uri"]) for uri in storage.list(expected["cache"]["uri"])}
    for name in written - {"meta.json"}:  # the arrays, byte for byte (meta.json names the run that wrote it)
        ours, theirs = (storage.download_to(cache["uri"] + name, tmp_path / side / name).read_bytes()
                        for side, cache in (("without", report["cache"]), ("with", expected["cache"])))
        assert ours == theirs, name


@pytest.mark.parametrize("sections", [{}, {"task": "sequence-classification"}, {"task": "image-classification"},
                                      {"hardware": {"gpus": 1}}, {"baseModel": {"trustRemoteCode": True}}],
                         ids=["causal-lm", "text-classification", "image-task", "gpus", "remote-code"])
def test_torch_stays_where_the_validation_may_need_it(make_config, sections):
    """An image task (transformers' fast image processors compute with torch), a GPU estimate (the model on the
    meta device) and code from the model folder keep torch; and a process that imported it already keeps it."""
    config = make_config("imports-keep", **sections)
    assert validates_without_torch(config) == (sections in ({}, {"task": "sequence-classification"}))
    assert not without_torch(config) and sys.modules["torch"] is not None  # this process has imported torch


def test_qlora_keeps_bitsandbytes(monkeypatch):
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    without_bitsandbytes(MethodType.qlora)
    assert "bitsandbytes" not in sys.modules


@pytest.mark.slow
def test_a_lora_process_trains_without_bitsandbytes(tmp_path):
    """peft without bitsandbytes: LoRA layers as usual, and none of torch's compiler that bitsandbytes' import
    pulls in."""
    script = """
import sys, torch
from kubetune_api import MethodType
from kubetune_trainer.modeling import without_bitsandbytes
without_bitsandbytes(MethodType.lora)
from peft import LoraConfig, get_peft_model
model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
model(torch.ones(1, 4)).sum().backward()
print(sum(p.grad is not None for p in model.parameters()), sys.modules["bitsandbytes"],
      "torch._inductor.compile_fx" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["2", "None", "False"]  # lora_A and lora_B have gradients
