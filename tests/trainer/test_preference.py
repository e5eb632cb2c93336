"""Preference tuning end to end on CPU (objective dpo and orpo), against the embedded S3 server.

The tiny support model learns to prefer the right topic's answer over another topic's (demo_data.preference_records):
the reward metrics reach the log, the manifest and the status report, early stopping and packing work as for SFT,
and a run resumes from its checkpoint over two processes (FSDP) and ends where the uninterrupted run ended.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from kubetune_dev.demo_data import write_preference_dataset
from kubetune_trainer import checkpoint
from kubetune_trainer.cli import success_message
from kubetune_trainer.pipeline import run

from tests.trainer.test_resume import _config_file, _train_cmd

pytestmark = pytest.mark.slow
REWARDS = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy", "logps_chosen",
           "logps_rejected")


@pytest.fixture(scope="module")
def pairs(storage, tmp_path_factory):
    data = write_preference_dataset(tmp_path_factory.mktemp("pairs"), train=96, validation=16, test=16)
    for split, path in data.items():
        storage.upload_file(path, f"s3://data/pairs/{split}.jsonl")
    return {s: f"s3://data/pairs/{s}.jsonl" for s in data}


def preference_config(make_config, pairs, name: str, objective: str, **sections):
    sections.setdefault("hyperparameters", {})
    sections["hyperparameters"] = {"maxSteps": 12, "batchSize": 4, "learningRate": 5e-4,
                                   "loggingSteps": 4,
                                   **sections["hyperparameters"]}
    return make_config(name, objective=objective, dataset=pairs, **sections)


@pytest.fixture(scope="module")
def dpo(make_config, pairs):
    """DPO with LoRA, packed pairs, validation every 4 steps with early stopping."""
    config = preference_config(make_config, pairs, "dpo-lora", "dpo",
                               evaluation={"everySteps": 4, "earlyStopping": {"patience": 2}})
    events = []
    manifest = run(config, report=events.append)
    return config, manifest, events


def test_dpo_learns_to_prefer_the_chosen_answers(dpo):
    _, manifest, events = dpo
    test, base = manifest["metrics"]["test"], manifest["metrics"]["baseline"]["test"]
    assert set(REWARDS) <= test.keys() and test["samples"] == 16
    # Before training the policy is the reference: every reward is 0, the loss log 2.
    assert base["loss"] == pytest.approx(0.6931, abs=1e-3) and base["rewards_accuracy"] == 0
    assert test["loss"] < base["loss"] and test["rewards_accuracy"] > 0.5 and test["rewards_margin"] > 0
    assert manifest["objective"] == "dpo" and manifest["objectiveParams"]["beta"] == 0.1
    assert manifest["metrics"]["difference"]["test"]["rewards_accuracy"] == test["rewards_accuracy"]
    logged = [e for e in events if e["event"] == "train"]
    assert logged and all(set(REWARDS) <= e.keys() for e in logged)
    assert manifest["history"] == logged
    validations = [e for e in events if e["event"] == "validation"]
    assert validations and all("rewards_accuracy" in e for e in validations)
    assert manifest["record"]["plots"]["Preference rewards"] == "plots/preference.png"  # the run record's plot


def test_dpo_packs_whole_pairs(dpo):
    _, manifest, events = dpo
    (data,) = [e for e in events if e["event"] == "data"]
    pairs = 96 - data["quality"]["dropped"].get("train", 0)  # less those the data-quality checks drop
    assert data["splits"]["train"]["samples"] == pairs and data["sequences"] < pairs  # several pairs a row


def test_the_success_report_carries_the_reward_metrics(dpo):
    _, manifest, _ = dpo
    report = json.loads(success_message(manifest, "s3://adapters/dpo-lora/manifest.json", "0" * 64))
    assert report["metrics"]["test"]["rewards_accuracy"] == manifest["metrics"]["test"]["rewards_accuracy"]


def test_orpo_without_packing_trains_the_chosen_answers(make_config, pairs, storage):
    config = preference_config(make_config, pairs, "orpo", "orpo", objectiveParams={"beta": 0.5},
                               hyperparameters={"packing": False}, evaluation={"everySteps": 6})
    events = []
    manifest = run(config, report=events.append)
    test, base = manifest["metrics"]["test"], manifest["metrics"]["baseline"]["test"]
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen", *REWARDS} <= test.keys()
    assert test["nll_loss"] < base["nll_loss"] and test["loss"] < base["loss"]
    (data,) = [e for e in events if e["event"] == "data"]
    assert data["sequences"] == 96 - data["quality"]["dropped"].get("train", 0)  # a pair per item (the checks
    #                                                                                drop a few repeats)


def test_full_dpo_compares_with_a_frozen_copy_of_the_base(make_config, pairs):
    config = preference_config(make_config, pairs, "dpo-full", "dpo", method={"type": "full"},
                               hyperparameters={"maxSteps": 4, "learningRate": 1e-4}, evaluation={"everySteps": 4})
    manifest = run(config, report=lambda e: None)
    test, base = manifest["metrics"]["test"], manifest["metrics"]["baseline"]["test"]
    assert base["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference before the first step
    assert test["rewards_margin"] > 0 and test["loss"] < base["loss"]


def test_fsdp_dpo_resumes_from_its_checkpoint_and_ends_like_the_uninterrupted_run(make_config, pairs, storage,
                                                                                  trainer_env, tmp_path):
    config = preference_config(make_config, pairs, "dpo-fsdp", "dpo", hyperparameters={"maxSteps": 8,
                               "strategy": "fsdp", "batchSize": 2}, evaluation={"everySteps": 4},
                               checkpoint={"everySteps": 4, "keep": 3})
    cmd = _train_cmd(_config_file(config, tmp_path), processes=2)
    first = subprocess.run(cmd, env=trainer_env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    manifest = storage.get_json(config.output.uri + "manifest.json")
    assert manifest["processes"] == 2 and manifest["steps"] == 8
    assert checkpoint.complete_steps(storage, config.checkpoint_uri) == [4]

    storage.delete(config.output.uri + "manifest.json")  # unpublished: the rerun resumes from step 4
    second = subprocess.run(cmd, env=trainer_env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert '"event": "resumed", "step": 4' in second.stdout
    again = storage.get_json(config.output.uri + "manifest.json")
    for key in ("loss", "rewards_accuracy", "rewards_margin"):
        assert again["history"][-1][key] == pytest.approx(manifest["history"][-1][key], rel=1e-3, abs=1e-5)
        assert again["metrics"]["test"][key] == pytest.approx(manifest["metrics"]["test"][key], rel=1e-3,
                                                              abs=1e-5)


def test_ddp_dpo_over_two_processes(make_config, pairs, storage, trainer_env, tmp_path):
    config = preference_config(make_config, pairs, "dpo-ddp", "dpo", hyperparameters={"maxSteps": 4,
                               "batchSize": 2, "loggingSteps": 2}, evaluation={"everySteps": 4})
    done = subprocess.run(_train_cmd(_config_file(config, tmp_path), processes=2), env=trainer_env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = storage.get_json(config.output.uri + "manifest.json")
    assert manifest["processes"] == 2 and manifest["metrics"]["test"]["samples"] == 16  # every pair once
    assert all("rewards_accuracy" in e for e in manifest["history"])


def test_sft_on_preference_data_is_refused_with_the_line(make_config, pairs):
    from kubetune_trainer.errors import DatasetError

    config = make_config("sft-on-pairs", dataset=pairs, hyperparameters={"maxSteps": 2})
    with pytest.raises(DatasetError, match=r"train\.jsonl:1: records are preference pairs.*set objective dpo or orpo"):
        run(config, report=lambda e: None)
