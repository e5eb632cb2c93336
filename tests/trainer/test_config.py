"""The typed API and the trainer config: defaults, cross-field rules, and messages that name the field."""

import pytest
import yaml
from kubetune_api import EXIT_CONFIG_INVALID, FineTuneJobSpec, TrainerConfig
from kubetune_trainer.configfile import load_config
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.train import Plan, step_indices

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
    plan = Plan.make(sequences=40, config=config, processes=2)
    assert plan.step_samples == 12 and plan.accumulation == 2
    assert plan.steps_per_epoch == 3  # 40 // 12
    assert plan.total_steps == 6
    a = step_indices(plan, 42, 4, rank=0)
    assert a == step_indices(plan, 42, 4, rank=0) and [len(m) for m in a] == [3, 3]
    b = step_indices(plan, 42, 4, rank=1)
    assert not {i for m in a for i in m} & {i for m in b for i in m}  # processes see different sequences
    epoch0 = [i for step in range(3) for r in (0, 1) for m in step_indices(plan, 42, step, r) for i in m]
    assert len(set(epoch0)) == 36  # no sequence twice within an epoch


def test_a_step_has_the_same_samples_whatever_the_number_of_processes():
    config = TrainerConfig.model_validate(
        {"jobName": "j", "baseModel": {"uri": "/m"}, "dataset": {"train": "/d"}, "output": {"uri": "/o"},
         "hyperparameters": {"maxSteps": 10, "batchSize": 2, "gradientAccumulationSteps": 2}})
    two = Plan.make(sequences=64, config=config, processes=2)  # 8 samples a step
    for processes in (1, 3, 4):
        other = Plan.make(64, config, processes, step_samples=two.step_samples)
        for step in (0, 5, 9):
            def samples(plan, step=step):
                return sorted(i for r in range(plan.processes) for m in step_indices(plan, 7, step, r) for i in m)
            assert samples(other) == samples(two)
    three = Plan.make(64, config, 3, step_samples=8)
    assert three.accumulation == 2 and [len(m) for m in step_indices(three, 7, 0, 2)] == [2, 0]
