"""output.merged: the base model with the LoRA adapter folded in, published under <output>merged/ for servers that
load whole models (`vllm serve ./merged`, KServe's Hugging Face runtime, AutoModelFor*.from_pretrained).

The base is loaded afresh from the fetched model folder, on the CPU with every weight in the output dtype (never the
4-bit copy QLoRA trained on: a QLoRA adapter is folded into the real base weights). The published adapter folder
goes on it with peft and merge_and_unload() adds each adapted layer's (alpha / r) B A to its weight; a trained
classification head (peft's modules_to_save) takes the new head's place, so the merged config.json keeps
id2label/label2id. Memory: the base once more in CPU RAM, 2 bytes per parameter in bf16/fp16, 4 in fp32
(16 or 32 GB for an 8B model), beside the model that was trained.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from kubetune_api import OutputDtype

from .modeling import load_adapter

if TYPE_CHECKING:
    from .tasks import Task

MERGED = "merged"  # the folder under the output
MAX_SHARD_SIZE = "5GB"  # safetensors files per shard, with model.safetensors.index.json when there are several
TORCH_DTYPES = {OutputDtype.bf16: torch.bfloat16, OutputDtype.fp16: torch.float16, OutputDtype.fp32: torch.float32}
CONFIG_DTYPES = {"bfloat16": OutputDtype.bf16, "float16": OutputDtype.fp16, "float32": OutputDtype.fp32}


def base_dtype(model_dir: Path) -> OutputDtype:
    """The dtype the base model folder's config.json names (`dtype`, or `torch_dtype` before transformers 5);
    fp32 when it names none of bf16, fp16 and fp32."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return CONFIG_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), OutputDtype.fp32)


def merge_output(task: Task, out: Path, beat: Callable[[], None] = lambda: None) -> dict:
    """With output.merged, write the merged model into <out>/merged/ (published with the rest of `out`) and return
    the manifest's {"merged": {"path", "dtype"}}; {} otherwise."""
    output = task.config.output
    if not output.merged:
        return {}
    dtype = output.dtype or base_dtype(task.model_dir)
    merge(task, out, out / MERGED, dtype, beat)
    return {"merged": {"path": f"{MERGED}/", "dtype": dtype.value}}


def merge(task: Task, adapter_dir: Path, into: Path, dtype: OutputDtype,
          beat: Callable[[], None] = lambda: None) -> Path:
    """The folder `into`: the task's base model with the adapter of `adapter_dir` merged, in `dtype` (safetensors,
    in shards with their index when large), its config.json and generation_config.json, and the task's processor
    (tokenizer or image processor)."""
    base = task.load_base(TORCH_DTYPES[dtype])
    beat()
    model = load_adapter(base, adapter_dir).merge_and_unload()
    beat()
    if into.exists():
        shutil.rmtree(into)
    model.save_pretrained(into, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    beat()
    task.save(model, into)
    generation = task.model_dir / "generation_config.json"
    if generation.is_file():  # the base's own, as it is (save_pretrained writes one it has read or derived)
        shutil.copyfile(generation, into / generation.name)
    return into
