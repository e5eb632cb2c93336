"""Run identity: which run made an object in storage.

A run is (uid, specHash): the FineTuneJob's uid (`kubetune run`: a hash of the whole config) and a hash of the
fields that determine what is trained (base model, data, method, hyperparameters). The published manifest and
every checkpoint carry it, so a run never mistakes another run's output or checkpoints for its own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from .config import TrainerConfig

TRAINING_FIELDS = ("baseModel", "dataset", "method", "hyperparameters")


def _sha256(doc) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class RunIdentity:
    uid: str
    spec_hash: str

    @classmethod
    def of(cls, config: TrainerConfig) -> RunIdentity:
        doc = config.dump()
        spec_hash = _sha256({k: doc.get(k) for k in TRAINING_FIELDS})
        if config.run_id:
            return cls(config.run_id, spec_hash)
        local = {k: v for k, v in doc.items() if k not in ("workDir", "metrics", "runId")}
        return cls("local-" + _sha256(local)[:32], spec_hash)

    def dump(self) -> dict:
        """The manifest's `run` entry."""
        return {"uid": self.uid, "specHash": self.spec_hash}

    def matches(self, run: dict | None) -> bool:
        """Whether a manifest's `run` entry (None: a manifest from before run identity) is this run."""
        return bool(run) and run.get("uid") == self.uid and run.get("specHash") == self.spec_hash

    def __str__(self) -> str:
        return f"run {self.uid} (spec {self.spec_hash[:12]})"
