"""Checkpoints: the trainable weights, optimizer, scheduler, RNG and data position of a run.

Each checkpoint is published like an adapter (files first, manifest.json last) under
`<checkpoint uri>step-00000040/`, so a checkpoint without a manifest is incomplete and ignored.
On start the trainer resumes from the newest complete one; older ones beyond `keep` are deleted.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .storage import Storage, publish, read_published

STEP_DIR = re.compile(r"step-(\d{8})/manifest\.json$")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    micro_batch: int = 0  # global micro-batches consumed since the start of the run (the data position)
    tokens_trained: int = 0
    best_validation_loss: float | None = None
    last_validation: dict | None = None  # the newest validation result, with its "step"
    evals_without_improvement: int = 0
    train_time_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # one entry per logging step


def step_uri(prefix: str, step: int) -> str:
    return f"{prefix.rstrip('/')}/step-{step:08d}/"


def save(directory: Path, weights: dict[str, torch.Tensor], optimizer_state: dict, scheduler,
         state: TrainState) -> Path:
    """Write a checkpoint folder: the trainable weights, optimizer and scheduler state, RNG, data position."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, directory / "trainable.safetensors")
    torch.save(optimizer_state, directory / "optimizer.pt")
    torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, directory / "rng.pt")
    (directory / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
    return directory


def load(directory: Path, scheduler) -> tuple[dict[str, torch.Tensor], dict, TrainState]:
    """Restore the scheduler and RNG; return the weights and optimizer state for the caller to load."""
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=False))
    rng = torch.load(directory / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = TrainState(**json.loads((directory / "trainer_state.json").read_text()))
    optimizer_state = torch.load(directory / "optimizer.pt", weights_only=False)
    return load_file(directory / "trainable.safetensors"), optimizer_state, state


def upload(storage: Storage, directory: Path, prefix: str, step: int) -> str:
    uri = step_uri(prefix, step)
    publish(storage, directory, uri, {"kind": "checkpoint", "step": step})
    return uri


def complete_steps(storage: Storage, prefix: str) -> list[int]:
    """Steps of the complete checkpoints under prefix, newest first."""
    steps = []
    for uri in storage.list(prefix.rstrip("/") + "/"):
        m = STEP_DIR.search(uri)
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps, reverse=True)


def download_latest(storage: Storage, prefix: str, dest: Path) -> Path | None:
    """The newest complete checkpoint, verified against its manifest, on local disk; None if there is none."""
    steps = complete_steps(storage, prefix)
    if not steps:
        return None
    target = dest / f"step-{steps[0]:08d}"
    read_published(storage, step_uri(prefix, steps[0]), target)
    return target


def prune(storage: Storage, prefix: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and abandoned partial uploads."""
    steps = complete_steps(storage, prefix)
    if not steps:
        return
    oldest_kept = steps[: max(keep, 1)][-1]
    seen = set()
    for uri in storage.list(prefix.rstrip("/") + "/"):
        m = re.search(r"step-(\d{8})/", uri)
        if m and int(m.group(1)) < oldest_kept and m.group(1) not in seen:
            seen.add(m.group(1))
            storage.delete_prefix(step_uri(prefix, int(m.group(1))))
