"""`kubetune validate`: the validation pod's work, before any GPU is requested (docs/architecture.md, step 2).

Apart from pipeline.py, which trains: this module imports only what validating needs. For a task that caches
(causal-lm) whose data cache is in object storage already (every trial of a sweep but the first), that is no
model library at all: no torch, no transformers (tests/trainer/test_imports.py).
"""

from __future__ import annotations

from kubetune_api import TrainerConfig

from .data import DatasetReport
from .data.report import data_report
from .fetch import fetch
from .identity import RunIdentity, claim
from .prepare import inputs_of, prepare
from .storage import Storage
from .tasks import task_for


def validate_only(config: TrainerConfig, storage: Storage | None = None) -> tuple[dict[str, DatasetReport], dict]:
    """`kubetune validate`: the same checks, on CPU, without downloading the model weights; for a task that
    caches, the same pass leaves the tokenized cache in object storage for the training pods. Returns the
    reports and the data report (data/report.py)."""
    storage = storage or Storage(config.storage)
    identity = RunIdentity.of(config)
    claim(storage, config, identity, write=False)  # another run's output: refused before a GPU pod
    storage = storage.with_run(identity.uid)  # the cache it uploads says which run made it
    fetched = fetch(config, storage, weights=False)
    task = task_for(config, fetched.model_dir, storage)  # its processor: loaded by prepare if it reads records
    data = prepare(config, task, fetched, storage, inputs_of(fetched), examples=False)
    return data.reports, data_report(config, task, data.reports, fetched.model_dir, data.cache)
