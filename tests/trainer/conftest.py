"""Shared trainer fixtures: the embedded S3 server over HTTP, a tiny locally made base model, demo data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from filelock import FileLock
from kubetune_api import StorageEndpoint, TrainerConfig
from kubetune_dev.demo_data import chat_texts, generic_texts, support_records, write_support_dataset
from kubetune_dev.tiny import make_tiny_base
from kubetune_trainer.storage import Storage


@pytest.fixture(scope="session")
def s3(s3_server):
    """The run's one S3 server (tests/s3fixtures.py) with the trainer tests' buckets."""
    for bucket in ("models", "data", "adapters"):
        s3_server.create_bucket(bucket)
    return s3_server


@pytest.fixture(scope="session")
def storage(s3) -> Storage:
    return Storage(StorageEndpoint(endpoint=s3.endpoint))


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)`'s result, made once per pytest run: the xdist workers of a run share one copy (the first to
    ask builds it under a file lock), a run without workers gets its own. Only for what tests read, never write."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent / name  # the run's folder, above every worker's own
    with FileLock(f"{shared}.lock"):
        if not (shared / ".built").exists():
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir()
            result = build(shared)
            (shared / ".built").write_text(str(result))
        return Path((shared / ".built").read_text())


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A 2-layer Llama with a tokenizer trained on the demo's text; nothing comes from a hub. About a minute of
    pretraining on 2 cores, so the run's workers share it."""
    texts = generic_texts(300) + chat_texts(support_records(300, seed=1))
    return built_once(tmp_path_factory, "tiny-base", lambda out: make_tiny_base(
        out, texts, vocab_size=1024, hidden_size=64, layers=2, heads=4, pretrain_steps=150))


@pytest.fixture(scope="session")
def uploaded(s3, storage, tiny_base, tmp_path_factory):
    """The tiny base under s3://models/tiny/ and the chat splits under s3://data/support/."""
    data = write_support_dataset(tmp_path_factory.mktemp("data"), train=192, validation=32, test=32)
    storage.upload_dir(tiny_base, "s3://models/tiny/")
    for split, path in data.items():
        storage.upload_file(path, f"s3://data/support/{split}.jsonl")
    return {"model": "s3://models/tiny/", "data": {s: f"s3://data/support/{s}.jsonl" for s in data}}


@pytest.fixture(scope="session")
def make_config(s3, uploaded, tmp_path_factory):
    """A TrainerConfig for a short run of the tiny model; keyword arguments override sections."""

    def make(name: str, **sections) -> TrainerConfig:
        doc = {
            "jobName": name,
            "baseModel": {"uri": uploaded["model"]},
            "dataset": uploaded["data"],
            "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "hyperparameters": {"maxSteps": 24, "batchSize": 4, "learningRate": 5e-3, "maxSeqLength": 128,
                                "loggingSteps": 4, "warmupRatio": 0.0, "scheduler": "linear"},
            "evaluation": {"everySteps": 8},
            "checkpoint": {"everySteps": 8, "keep": 2},
            "output": {"uri": f"s3://adapters/{name}/"},
            "storage": {"endpoint": s3.endpoint},
            "metrics": {"port": 0},
            "workDir": str(tmp_path_factory.mktemp("work")),
        }
        for key, value in sections.items():
            doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
        return TrainerConfig.model_validate(doc)

    return make


@pytest.fixture(scope="session")
def trainer_env(s3):
    """Environment for trainer subprocesses: the embedded server's placeholder credentials."""
    env = dict(os.environ)
    env.update({k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    env["KUBETUNE_TERMINATION_LOG"] = os.devnull
    return env
