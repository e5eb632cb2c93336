"""`kubetune validate`: the validation pod's work, before any GPU is requested (docs/architecture.md, step 2).

Apart from pipeline.py, which trains: this module imports only what validating needs. For a task that caches
(causal-lm) whose data cache is in object storage already (every trial of a sweep but the first), that is no
model library at all: no torch, no transformers; for one that tokenizes, no torch (`without_torch`;
tests/trainer/test_imports.py).
"""

from __future__ import annotations

from kubetune_api import TrainerConfig

from .data import DatasetReport
from .data.report import data_report
from .fetch import fetch
from .identity import RunIdentity, claim
from .modeling import hide_torch_from_transformers
from .prepare import inputs_of, prepare
from .storage import Storage
from .tasks import TASKS, TokenizesText, task_for


def validates_without_torch(config: TrainerConfig) -> bool:
    """Whether nothing the validation of `config` does needs torch: a task whose processor is a tokenizer
    (TokenizesText), no code from the model folder (baseModel.trustRemoteCode: it may import torch), and no GPU
    estimate (hardware.gpus: data/report.py builds the model on the meta device)."""
    task = TASKS.get(config.task)
    return (task is not None and issubclass(task, TokenizesText) and not config.hardware.gpus
            and not config.base_model.trust_remote_code)


def without_torch(config: TrainerConfig) -> bool:
    """For a `kubetune validate` process, before anything imports transformers: where the validation does not need
    torch (validates_without_torch), the tokenizer is loaded without it (modeling.hide_torch_from_transformers):
    4.4 CPU-s for a validation that tokenizes a small data set, 2.2 without (docs/testing.md). The tokenizer is the
    same (the tokenizers library's), and so are the tokens. Returns whether torch is hidden."""
    return validates_without_torch(config) and hide_torch_from_transformers()


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
