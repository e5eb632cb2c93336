"""Stage 6, publish: write the adapter (or full model) folder and its manifest to the output URI.

The folder loads with `peft.PeftModel.from_pretrained(base, folder)` (lora/qlora) or
`AutoModelForCausalLM.from_pretrained(folder)` (full; AutoModelFor{Sequence,Image}Classification for the
classification tasks, whose folder's config.json carries id2label/label2id). A LoRA folder is peft's layout
(adapter_config.json, adapter_model.safetensors) with the tokenizer beside it, naming the base model as the spec
does: what vLLM's --lora-modules and KServe's Hugging Face runtime load as they are (docs/serving.md). Files go
up first, to `<output>/.staging/<run uid>/`, and `identity.commit` moves them next to the claim marker and writes
manifest.json last, only while the prefix is still this run's claim: a reader that trusts only prefixes with a
manifest never sees a half-written adapter, and a run whose prefix was taken over never publishes into it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from .identity import RunIdentity, commit, staging_uri
from .manifest import Manifest
from .storage import MANIFEST, Storage

if TYPE_CHECKING:
    from kubetune_api import BaseModelSpec, TrainerConfig

    from .tasks import Task


def save_output(model, task: Task, directory: Path, state_dict: dict | None = None) -> Path:
    """The adapter (or model) folder, with what the task adds (its tokenizer or image processor, label names);
    `state_dict`: the weights gathered in full when the model is sharded."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    adapter, name = hasattr(model, "peft_config"), base_model_name(task.config.base_model)
    if adapter:  # what peft's model card (README.md) names as the base model
        base = model.get_base_model()
        base.name_or_path = base.config._name_or_path = name
    model.save_pretrained(directory, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    task.save(model, directory)
    if adapter:
        path = directory / "adapter_config.json"
        config = json.loads(path.read_text())
        config.update(base_model_name_or_path=name, revision=task.config.base_model.revision)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def base_model_name(base_model: BaseModelSpec) -> str:
    """The base model as the spec names it, for adapter_config.json's base_model_name_or_path (with `revision`)
    instead of the trainer's local copy: hf://org/name as org/name (what AutoPeftModel and the Hub resolve), other
    URIs as given. Written after saving: peft would look a Hub name up to check the vocabulary, and
    PeftModel.from_pretrained(base, folder) does not read it."""
    uri = base_model.uri
    return uri.removeprefix("hf://").strip("/") if uri.startswith("hf://") else uri


def publish_output(storage: Storage, directory: Path, config: TrainerConfig, identity: RunIdentity,
                   manifest: Manifest) -> dict:
    """Upload the folder to this run's staging prefix, then commit it (identity.commit) at output.uri with its
    manifest.json; returns the manifest as stored (with `files`)."""
    staging = staging_uri(config, identity)
    storage.delete_prefix(staging)  # what an earlier attempt of this run left
    files = storage.upload_dir(directory, staging, skip=(MANIFEST,))
    return commit(storage, config, identity, staging, {**manifest.dump(), "files": [asdict(e) for e in files]})
