"""The published folders are what serving stacks load as they are (docs/serving.md).

The contracts checked, from the servers' sources:

* vLLM's LoRA loading (`vllm serve BASE --enable-lora --lora-modules NAME=FOLDER`): `PEFTHelper.from_local_dir`
  (vllm/lora/peft_helper.py) reads FOLDER/adapter_config.json, requires `r`, `lora_alpha` and `target_modules`, and
  `validate_legal` refuses `modules_to_save` (anything but None/empty), `use_dora`, a `bias` other than "none" and
  an `r` above --max-lora-rank; `LoRAModel.from_local_checkpoint` (vllm/lora/lora_model.py) reads
  FOLDER/adapter_model.safetensors (else .bin/.pt) and refuses a tensor whose name is not
  `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (`parse_fine_tuned_lora_name`, vllm/lora/utils.py)
  or whose module is not one vLLM can adapt in the model (for Llama: q/k/v/o_proj, gate/up/down_proj).
* KServe's Hugging Face runtime (python/huggingfaceserver, vLLM backend): the storage initializer copies
  `storageUri` into /mnt/models, which the server loads as a model folder (AutoConfig's `architectures`, the
  tokenizer, safetensors weights), or, with `--model_id` naming the base, hands to vLLM as an adapter through
  `--enable-lora --lora-modules NAME=/mnt/models`: so the adapter's files lie at the top of the prefix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from kubetune_api import BaseModelSpec, OutputDtype
from kubetune_dev.tiny import make_tiny_base
from kubetune_trainer.merge import merge
from kubetune_trainer.modeling import load_adapter
from kubetune_trainer.publish import base_model_name
from kubetune_trainer.tasks import task_for
from safetensors import safe_open

from tests.trainer.test_merge import adapter, logits, trainer_config

LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
VLLM_TENSOR = re.compile(r"base_model\.model\.(?P<module>[\w.]+)\.lora_(?P<ab>[AB])\.weight")
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from kubetune_dev.demo_data import generic_texts

    return make_tiny_base(tmp_path_factory.mktemp("serving-base"), generic_texts(100), vocab_size=512, hidden_size=64,
                          layers=2, heads=4)


@pytest.fixture(scope="module")
def published(base, tmp_path_factory):
    """A causal-lm LoRA output folder of a base named hf://kubetune/tiny-llama at revision v1 (the tiny base stands
    in for the download), with random adapter weights."""
    work = tmp_path_factory.mktemp("serving")
    config = trainer_config("hf://kubetune/tiny-llama", work, baseModel={"revision": "v1"},
                            method={"lora": {"r": 8, "alpha": 16}})
    task = task_for(config, base)
    task.load_processor()
    return task, adapter(task, work / "output")


def test_adapter_folder_is_what_vllm_and_kserve_load(published, base):
    task, folder = published
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} | TOKENIZER_FILES <= names  # at the top, not nested
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 8, 16)
    assert config["r"] <= 16  # vLLM's default --max-lora-rank; docs/serving.md says to raise it for larger ranks
    assert (config["bias"], config["use_dora"], config["modules_to_save"]) == ("none", False, None)
    assert config["target_modules"] and {m.rsplit(".", 1)[-1] for m in config["target_modules"]} <= LLAMA_LORA_MODULES
    # The base as the spec names it, not the trainer's download folder.
    assert (config["base_model_name_or_path"], config["revision"]) == ("kubetune/tiny-llama", "v1")
    assert "base_model: kubetune/tiny-llama" in (folder / "README.md").read_text()

    modules = dict(task.load_base(torch.float32).named_modules())
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
        for key in keys:
            match = VLLM_TENSOR.fullmatch(key)
            assert match, key
            layer = modules[match["module"]]  # a module of the base model, which vLLM can adapt
            assert match["module"].rsplit(".", 1)[-1] in LLAMA_LORA_MODULES
            shape = (config["r"], layer.in_features) if match["ab"] == "A" else (layer.out_features, config["r"])
            assert tuple(f.get_slice(key).get_shape()) == shape, key
    assert len(keys) == 2 * len(config["target_modules"])


def test_adapter_loads_without_its_base_name(published, base):
    """PeftModel.from_pretrained(base, folder) (modeling.load_adapter) uses the base it is given, whatever
    base_model_name_or_path says (here a Hub name that does not exist)."""
    from transformers import AutoModelForCausalLM

    task, folder = published
    loaded = load_adapter(AutoModelForCausalLM.from_pretrained(base), folder)
    state = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert state and all(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)  # the saved weights
    assert logits(loaded, task.processor).isfinite().all()


def test_merged_folder_is_a_model_folder(published, tmp_path):
    """`vllm serve ./merged` and KServe's runtime on <output>merged/: config.json with the architecture, the weights
    in safetensors, the tokenizer, the generation config; no adapter files."""
    task, folder = published
    merged = merge(task, folder, tmp_path / "merged", OutputDtype.bf16)
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} | TOKENIZER_FILES <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((merged / "config.json").read_text())
    assert (config["architectures"], config["dtype"]) == (["LlamaForCausalLM"], "bfloat16")


@pytest.mark.parametrize("uri, revision, name", [
    ("hf://meta-llama/Llama-3.1-8B", None, "meta-llama/Llama-3.1-8B"),
    ("hf://Qwen/Qwen2.5-7B/", "main", "Qwen/Qwen2.5-7B"),
    ("s3://models/llama-3.1-8b/", None, "s3://models/llama-3.1-8b/"),
    ("pvc://models/llama", None, "pvc://models/llama"),
    ("/data/models/llama", None, "/data/models/llama"),
])
def test_base_model_name(uri, revision, name):
    assert base_model_name(BaseModelSpec(uri=uri, revision=revision)) == name
