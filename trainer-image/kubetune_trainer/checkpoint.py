"""Checkpoints: the trainable weights, optimizer, scheduler, per-rank RNG and data position of a run.

Each checkpoint is published like an adapter (files first, manifest.json last) under
`<checkpoint uri>step-00000040/`, so a checkpoint without a manifest is incomplete and ignored. Its manifest
says which run wrote it (`run`) and with what inputs (`fingerprint`): a run resumes only from its own
checkpoints, and only when the data, tokenizer and batch shape are the ones it was written with.

On start the trainer resumes from the newest complete checkpoint that loads; a corrupt one is reported and the
one before it is tried. Older ones beyond `keep` are deleted, but only those whose manifest names this run: a
folder another run wrote, or one without a manifest (an upload that did not finish, whoever made it), is never
pruned (`prune` returns what it left; the same step of this run, written again, replaces its files).
Nothing here runs code from storage: weights and RNG are safetensors, the optimizer state is read with
`torch.load(weights_only=True)`, the rest is JSON.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import OutputInUseError, TransientError
from .identity import RunIdentity
from .layout import BEST_DIR, STEP, STEP_DIR
from .record.history import HISTORY, read_records
from .storage import MANIFEST, Storage, publish, read_published


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    samples: int = 0  # training sequences consumed since the start of the run (the data position)
    tokens_trained: int = 0
    best_validation: dict | None = None  # {"step", "metric", "value"}: the best evaluation.metric so far
    last_validation: dict | None = None  # the newest validation result, with its "step"
    evals_without_improvement: int = 0
    baseline: dict | None = None  # {"test": metrics} of the model before training (evaluation.baseline)
    train_time_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # one entry per logging step
    checkpoints: list[dict] = field(default_factory=list)  # {"step", "uri", "time", "validation"} per checkpoint


@dataclass(frozen=True)
class Fingerprint:
    """What a checkpoint's step and data position mean. Resuming with other values would train on other data
    or with another step size, so it is refused; only the number of processes may change (the step keeps its
    size in samples, `step_samples`, and is dealt out to however many processes there are)."""

    datasets: dict[str, str]  # split -> sha256
    tokenizer: str  # sha256 of the tokenizer files
    max_seq_length: int
    packing: bool
    batch_size: int
    accumulation: int
    strategy: str
    processes: int
    step_samples: int  # sequences per optimizer step, over all processes
    task: dict = field(default_factory=dict)  # Task.describe(): the task and, for classification, its labels
    quality: dict = field(default_factory=dict)  # dataset.quality: which records the checks dropped

    def differences(self, saved: dict) -> list[str]:
        """The fields (but `processes`, `step_samples`) in which a saved fingerprint differs from this one."""
        return [f"{f.name} {saved.get(f.name)!r} (now {getattr(self, f.name)!r})" for f in fields(self)
                if f.name not in ("processes", "step_samples") and saved.get(f.name) != getattr(self, f.name)]


@dataclass
class Restored:
    """A checkpoint read back: everything the loop needs to continue where it stopped."""

    uri: str
    weights: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    state: TrainState
    rng: list[dict]  # per rank, as saved
    fingerprint: dict
    history: list[dict] = field(default_factory=list)  # its metrics.jsonl's records (record/history.py)


def step_uri(prefix: str, step: int) -> str:
    return f"{prefix.rstrip('/')}/step-{step:08d}/"


def rng_state() -> dict:
    """This process's random number generators."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(directory: Path, weights: dict[str, torch.Tensor], optimizer_state: dict, scheduler,
         state: TrainState, rng: list[dict]) -> Path:
    """Write a checkpoint folder: weights, optimizer and scheduler state, every rank's RNG, data position."""
    save_weights(directory, weights)
    torch.save(optimizer_state, directory / "optimizer.pt")
    (directory / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    tensors = {f"{rank}.{name}": s[name] for rank, s in enumerate(rng) for name in ("torch", "cuda") if name in s}
    save_file(tensors, directory / "rng.safetensors")
    (directory / "rng.json").write_text(json.dumps([s["python"] for s in rng]))
    (directory / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
    return directory


def save_weights(directory: Path, weights: dict[str, torch.Tensor]) -> None:
    """The trainable weights as directory/trainable.safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, directory / "trainable.safetensors")


def load(directory: Path) -> tuple[dict[str, torch.Tensor], dict, dict, TrainState, list[dict]]:
    """Read a checkpoint folder back (weights, optimizer, scheduler, state, per-rank RNG)."""
    python = json.loads((directory / "rng.json").read_text())
    tensors = load_file(directory / "rng.safetensors")
    rng = [{"python": p, **{name: tensors[f"{rank}.{name}"] for name in ("torch", "cuda")
                            if f"{rank}.{name}" in tensors}} for rank, p in enumerate(python)]
    return (load_file(directory / "trainable.safetensors"),
            torch.load(directory / "optimizer.pt", weights_only=True),
            json.loads((directory / "scheduler.json").read_text()),
            TrainState(**json.loads((directory / "trainer_state.json").read_text())), rng)


def upload(storage: Storage, directory: Path, prefix: str, step: int, run: RunIdentity,
           fingerprint: Fingerprint) -> str:
    uri = step_uri(prefix, step)
    publish(storage, directory, uri, {"kind": "checkpoint", "step": step, "run": run.dump(),
                                      "fingerprint": asdict(fingerprint)})
    return uri


def complete_steps(storage: Storage, prefix: str) -> list[int]:
    """Steps of the complete checkpoints under prefix, newest first."""
    steps = []
    for uri in storage.list(prefix.rstrip("/") + "/"):
        m = STEP_DIR.search(uri)
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps, reverse=True)


def restore_latest(storage: Storage, prefix: str, dest: Path, run: RunIdentity,
                   warn: Callable[[dict], None]) -> Restored | None:
    """The newest complete checkpoint of this run that downloads intact and loads; None if there is none.

    A checkpoint of another run is refused (OutputInUseError). A corrupt one (files that do not match its
    manifest, or do not parse) is reported through `warn` and the previous one is tried."""
    for step in complete_steps(storage, prefix):
        uri = step_uri(prefix, step)
        manifest = storage.get_json(uri + "manifest.json") or {}
        if not run.matches(manifest.get("run")):
            other = (manifest.get("run") or {}).get("uid", "a run from before run identity")
            raise OutputInUseError(
                f"{uri}: checkpoint of another run ({other}), not of this {run}; set checkpoint.uri (or "
                "output.uri) to a prefix of its own, or output.overwrite: true to move the old one aside")
        target = dest / f"step-{step:08d}"
        try:
            read_published(storage, uri, target)
            weights, optimizer, scheduler, state, rng = load(target)
            history = read_records(target / HISTORY)
        except TransientError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a corrupt file raises, the previous checkpoint is tried
            warn({"event": "checkpoint_unusable", "uri": uri, "error": str(e)[:500],
                  "action": "trying the previous checkpoint"})
            continue
        return Restored(uri, weights, optimizer, scheduler, state, rng, manifest.get("fingerprint") or {},
                        history)
    return None


def best_uri(prefix: str, step: int) -> str:
    return f"{prefix.rstrip('/')}/best-step-{step:08d}/"


def save_best(storage: Storage, directory: Path, weights: dict[str, torch.Tensor], prefix: str, best: dict,
              run: RunIdentity) -> str:
    """Publish the trainable weights of the best evaluated step (output.select: best) under
    `<prefix>best-step-N/`. Older ones stay until a checkpoint records the new best (prune_best): a run that
    resumes from an earlier checkpoint still finds the best that checkpoint knows."""
    save_weights(directory, weights)
    uri = best_uri(prefix, best["step"])
    publish(storage, directory, uri, {"kind": "best", **best, "run": run.dump()})
    return uri


def load_best(storage: Storage, prefix: str, step: int, dest: Path) -> dict[str, torch.Tensor]:
    target = dest / f"best-step-{step:08d}"
    read_published(storage, best_uri(prefix, step), target)
    return load_file(target / "trainable.safetensors")


def prune_best(storage: Storage, prefix: str, keep_step: int | None, run: RunIdentity) -> list[str]:
    """Delete this run's best-step-N/ weights but those of `keep_step` (the best the newest checkpoint records);
    returns the folders left because their manifest does not name this run."""
    return _delete_folders(storage, prefix, BEST_DIR, best_uri, lambda step: step != keep_step, run)


def _delete_folders(storage: Storage, prefix: str, folder: re.Pattern, uri_of: Callable[[str, int], str],
                    drop: Callable[[int], bool], run: RunIdentity) -> list[str]:
    """Delete every step folder under prefix that `folder` matches (its group: the step), `drop` says to and whose
    manifest names `run`; returns those it left because they have no manifest or it names another run."""
    steps = {int(m.group(1)) for uri in storage.list(prefix.rstrip("/") + "/") if (m := folder.search(uri))}
    left = []
    for step in sorted(s for s in steps if drop(s)):
        uri = uri_of(prefix, step)
        if not _ours(storage, uri, run):
            left.append(uri)  # another run's, or unfinished: not provably this run's, so never deleted
            continue
        storage.delete_prefix(uri)
    return left


def _ours(storage: Storage, folder: str, run: RunIdentity) -> bool:
    return run.matches((storage.get_json(folder + MANIFEST) or {}).get("run"))


def prune(storage: Storage, prefix: str, keep: int, run: RunIdentity) -> list[str]:
    """Keep the newest `keep` complete checkpoints; drop this run's older ones. Returns the older folders left
    because their manifest does not name this run (another run's, or an unfinished upload)."""
    steps = [step for step in complete_steps(storage, prefix) if _ours(storage, step_uri(prefix, step), run)]
    if not steps:
        return []
    oldest_kept = steps[: max(keep, 1)][-1]  # another run's newer checkpoints do not count
    return _delete_folders(storage, prefix, STEP, step_uri, lambda step: step < oldest_kept, run)
