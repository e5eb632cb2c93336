"""Stage 6, publish: write the adapter (or full model) folder and its manifest to the output URI.

The folder loads with `peft.PeftModel.from_pretrained(base, folder)` (lora/qlora) or
`AutoModelForCausalLM.from_pretrained(folder)` (full; AutoModelFor{Sequence,Image}Classification for the
classification tasks, whose folder's config.json carries id2label/label2id). Files go up first and
manifest.json last, so a reader that trusts only prefixes with a manifest never sees a half-written adapter.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .storage import Storage, publish

if TYPE_CHECKING:
    from .tasks import Task

MANIFEST_VERSION = "kubetune.io/v1alpha1"


def save_output(model, task: Task, directory: Path, state_dict: dict | None = None) -> Path:
    """The adapter (or model) folder, with what the task adds (its tokenizer or image processor, label names);
    `state_dict`: the weights gathered in full when the model is sharded."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    model.save_pretrained(directory, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    task.save(model, directory)
    return directory


def publish_output(storage: Storage, directory: Path, uri: str, manifest: dict) -> dict:
    return publish(storage, directory, uri, {"apiVersion": MANIFEST_VERSION, "kind": "FineTuneResult", **manifest})
