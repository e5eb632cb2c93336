"""manifest.json of a published run (kind FineTuneResult): what was trained, from what, how, and how well.

`publish` writes it last, after the files it lists (`files`, which publish adds), so a prefix with a manifest is
complete. The operator, `kubetune` and the tests read it: its keys and their order are the document's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

API_VERSION = "kubetune.io/v1alpha1"
KIND = "FineTuneResult"


@dataclass
class Manifest:
    job: str
    run: dict[str, str]  # RunIdentity.dump()
    task_fields: dict[str, Any]  # Task.describe(): "task" and, per task, "labels" or "objective": top-level keys
    headline: str  # the task's headline metric
    method: str
    base_model: dict[str, str]  # {"uri", "sha256"}
    datasets: dict[str, dict]  # split -> {"uri", "sha256", "samples", "tokens"}
    format: str
    hyperparameters: dict[str, Any]
    lora: dict[str, Any] | None  # None with method full
    steps: int
    total_steps: int
    epochs: float
    early_stopped: bool
    tokens_trained: int
    metrics: dict[str, Any]  # {"train": {"loss"}, per split, "baseline", "difference", "bestValidation"}
    selected: dict[str, Any]  # {"select", "step", and with select best "metric", "value"}
    history: list[dict]  # the loop's logging steps
    wall_time_seconds: float
    train_time_seconds: float
    processes: int
    precision: str  # accelerate's mixed_precision
    merged: dict[str, str] | None = None  # output.merged: {"path", "dtype"} of the merged model
    quality: dict[str, Any] | None = None  # the data report's quality section: what was found, and dropped (lines,
    #                                        fingerprints), so that a run can be reproduced and audited
    checkpoints: list[dict] | None = None  # record/history.checkpoint_table: each checkpoint, the published one marked
    record: dict[str, Any] | None = None  # the run record's files: {"metrics", "card", "plots": {name: path}}

    def dump(self) -> dict[str, Any]:
        """The JSON document, less `files` (publish adds them)."""
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "job": self.job,
            "run": self.run,
            **self.task_fields,
            "headline": self.headline,
            "method": self.method,
            "baseModel": self.base_model,
            "datasets": self.datasets,
            "format": self.format,
            "hyperparameters": self.hyperparameters,
            "lora": self.lora,
            "steps": self.steps,
            "totalSteps": self.total_steps,
            "epochs": self.epochs,
            "earlyStopped": self.early_stopped,
            "tokensTrained": self.tokens_trained,
            "metrics": self.metrics,
            "selected": self.selected,
            "history": self.history,
            "wallTimeSeconds": self.wall_time_seconds,
            "trainTimeSeconds": self.train_time_seconds,
            "processes": self.processes,
            "precision": self.precision,
            **({"merged": self.merged} if self.merged is not None else {}),
            **({"quality": self.quality} if self.quality is not None else {}),
            **({"checkpoints": self.checkpoints} if self.checkpoints is not None else {}),
            **({"record": self.record} if self.record is not None else {}),
        }
