"""The typed API and the trainer config: defaults, cross-field rules, and messages that name the field."""

import pytest
import yaml
from kubetune_trainer.config import TrainerConfig, load_config
from kubetune_trainer.errors import EXIT_CONFIG_INVALID, ConfigError
from kubetune_trainer.spec import FineTuneJobSpec
from kubetune_trainer.train import Plan, micro_batch_indices

JOB = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "support-bot"},
    "spec": {
        "baseModel": {"uri": "s3://models/llama/"},
        "dataset": {"train": "s3://data/train.jsonl", "validation": "s3://data/val.jsonl", "format": "auto"},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]}},
        "hyperparameters": {"maxSteps": 20, "learningRate": 0.001, "batchSize": 4},
        "checkpoint": {"everySteps": 5, "keep": 2},
        "output": {"uri": "s3://adapters/support-bot/"},
        "storage": {"endpoint": "http://minio:9000", "secretRef": {"name": "s3-credentials"}},
    },
}


def write(tmp_path, doc):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_manifest_becomes_trainer_config(tmp_path):
    config = load_config(write(tmp_path, JOB))
    assert config.job_name == "support-bot"
    assert config.hyperparameters.max_steps == 20 and config.hyperparameters.epochs is None
    assert config.checkpoint_uri == "s3://adapters/support-bot/checkpoints/"
    assert config.storage.endpoint == "http://minio:9000"
    assert "secret" not in config.to_yaml().lower()  # credentials never travel in the config
    again = TrainerConfig.model_validate(yaml.safe_load(config.to_yaml()))
    assert again == config


def test_epochs_default_and_exclusive():
    spec = FineTuneJobSpec.model_validate({**JOB["spec"], "hyperparameters": {}})
    assert spec.hyperparameters.epochs == 1
    with pytest.raises(ValueError, match="either epochs or maxSteps"):
        FineTuneJobSpec.model_validate({**JOB["spec"], "hyperparameters": {"epochs": 2, "maxSteps": 5}})


def test_qlora_without_gpus_is_refused():
    spec = {**JOB["spec"], "method": {"type": "qlora"}, "resources": {"gpusPerWorker": 0}}
    with pytest.raises(ValueError, match="qlora needs GPUs"):
        FineTuneJobSpec.model_validate(spec)


def test_bad_config_names_the_field(tmp_path):
    doc = {**JOB, "spec": {**JOB["spec"], "hyperparameters": {"learningRate": -1}}}
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, doc))
    assert "spec.hyperparameters.learningRate" in e.value.message
    assert e.value.exit_code == EXIT_CONFIG_INVALID


def test_unknown_field_is_refused(tmp_path):
    doc = {**JOB, "spec": {**JOB["spec"], "hyperparameter": {}}}
    with pytest.raises(ConfigError, match="spec.hyperparameter"):
        load_config(write(tmp_path, doc))


def test_not_yaml(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("a: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_plan_and_data_order_are_deterministic():
    config = TrainerConfig.model_validate(
        {"jobName": "j", "baseModel": {"uri": "/m"}, "dataset": {"train": "/d"}, "output": {"uri": "/o"},
         "hyperparameters": {"epochs": 2, "batchSize": 3, "gradientAccumulationSteps": 2}})
    plan = Plan.make(sequences=20, config=config, processes=2)
    assert plan.micro_per_epoch == 3  # 20 // (3 * 2)
    assert plan.total_steps == 3  # ceil(2 epochs * 3 micro-batches / 2 accumulation)
    a = micro_batch_indices(plan, 42, 4, rank=0, batch_size=3)
    assert a == micro_batch_indices(plan, 42, 4, rank=0, batch_size=3)
    b = micro_batch_indices(plan, 42, 4, rank=1, batch_size=3)
    assert not set(a) & set(b)  # processes see different sequences in the same micro-batch
    epoch0 = [i for m in range(3) for r in (0, 1) for i in micro_batch_indices(plan, 42, m, r, 3)]
    assert len(set(epoch0)) == 18  # no sequence twice within an epoch
