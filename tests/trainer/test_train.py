"""Acceptance tests of the trainer against the embedded S3 server over HTTP (boto3), on CPU."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from kubetune_api import EXIT_CONFIG_INVALID, EXIT_DATA_INVALID, DataFormat
from kubetune_trainer import checkpoint
from kubetune_trainer.data import pack_examples, tokenize_dataset
from kubetune_trainer.evaluate import evaluate
from kubetune_trainer.pipeline import run
from kubetune_trainer.storage import read_published
from kubetune_trainer.tasks import task_for

from tests.faults import FaultProxy

pytestmark = pytest.mark.slow
RECORDED: list[dict] = []


@pytest.fixture(scope="module")
def trained(make_config):
    """One complete run, shared by the tests that inspect its result."""
    config = make_config("support-lora")
    manifest = run(config, report=RECORDED.append)
    return config, manifest


def test_tiny_model_trains_and_loss_falls(trained, storage):
    config, manifest = trained
    losses = [e["loss"] for e in manifest["history"]]
    assert manifest["steps"] == manifest["totalSteps"] == 24
    assert losses[-1] < losses[0] * 0.9, losses
    validations = [e["loss"] for e in RECORDED if e["event"] == "validation"]
    assert validations[-1] < validations[0]
    test = manifest["metrics"]["test"]
    assert test["perplexity"] == pytest.approx(torch.tensor(test["loss"]).exp().item(), rel=1e-6)
    assert 0 < test["token_accuracy"] <= 1
    assert manifest["tokensTrained"] > 0 and manifest["baseModel"]["sha256"]
    assert set(manifest["datasets"]) == {"train", "validation", "test"}
    names = {f["path"] for f in manifest["files"]}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    # The run record (issue 31): the metric history, the model card and the plots it links, each with its sha256.
    assert manifest["record"]["plots"]["Loss"] == "plots/loss.png"
    assert {"metrics.jsonl", "README.md", *manifest["record"]["plots"].values()} <= names
    card = storage.download_to(config.output.uri + "README.md", Path(config.work_dir) / "card.md").read_text()
    assert card.startswith("---\nbase_model:") and "library_name: peft" in card and "](plots/loss.png)" in card
    # Checkpoints every 8 steps, the newest `keep` kept; the final step has no checkpoint (the adapter is final).
    assert checkpoint.complete_steps(storage, config.checkpoint_uri) == [16, 8]


def test_metrics_endpoint_exports_the_run(trained):
    port = next(e["port"] for e in RECORDED if e["event"] == "metrics")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'kubetune_trainer_step{finetunejob="support-lora"} 24.0' in text
    assert 'kubetune_trainer_phase{finetunejob="support-lora",phase="done"} 1.0' in text
    assert 'kubetune_trainer_last_checkpoint_step{finetunejob="support-lora"} 16.0' in text  # every 8 steps
    for name in ("kubetune_trainer_tokens_trained_total", "kubetune_trainer_checkpoints_total",
                 "kubetune_trainer_test_loss", "kubetune_trainer_validation_loss",
                 "kubetune_trainer_tokens_per_second", "kubetune_trainer_eta_seconds"):
        assert f'{name}{{finetunejob="support-lora"}}' in text


def reload_published(storage, config, tiny_base, tmp_path):
    """The published adapter on the base with peft, and its loss on the test split (token-weighted)."""
    from accelerate import Accelerator
    from kubetune_trainer.modeling import load_adapter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "adapter"
    read_published(storage, config.output.uri, adapter)  # verifies size and sha256 of every file
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_base), adapter).eval()
    storage.download("s3://data/support/test.jsonl", tmp_path)
    seqs = pack_examples(tokenize_dataset(tmp_path / "test.jsonl", "test", fmt=DataFormat.chat, tokenizer=tokenizer,
                                          max_seq_length=128), 128, seed=config.hyperparameters.seed)
    task = task_for(config, adapter)
    task.processor = tokenizer
    loss = evaluate(task, model, seqs, "test", Accelerator(cpu=True), 4)["loss"]
    return model, tokenizer, loss


def test_adapter_reloads_with_peft_and_reproduces_the_trained_model(trained, storage, tiny_base, tmp_path):
    config, manifest = trained
    model, tokenizer, loss = reload_published(storage, config, tiny_base, tmp_path)
    assert loss == pytest.approx(manifest["metrics"]["test"]["loss"], abs=1e-4)

    ids = tokenizer("How do I reset my password?", return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = model(ids).logits
        merged = model.merge_and_unload()(ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


def test_rerun_of_a_published_job_does_nothing(trained):
    config, manifest = trained
    events = []
    assert run(config, report=events.append) == manifest
    assert events[0]["event"] == "already_published"


def _config_file(config, tmp_path):
    path = tmp_path / f"{config.job_name}.yaml"
    path.write_text(config.to_yaml())
    return path


def test_killed_run_resumes_from_its_checkpoint_and_finishes(make_config, s3, storage, trainer_env, tmp_path):
    """Kill the trainer while it uploads a checkpoint picked at random: the S3 traffic goes through a proxy that
    holds that checkpoint's manifest, so the kill lands mid-run however fast the machine is."""
    held_step = random.choice([8, 12, 16, 20])
    with FaultProxy(s3.endpoint) as proxy:
        held = proxy.inject("PUT", f"step-{held_step:08d}/manifest.json", "hold")
        config = make_config("resume", checkpoint={"everySteps": 4, "keep": 3}, storage={"endpoint": proxy.endpoint})
        cmd = [sys.executable, "-m", "kubetune_trainer", "train", "--config", str(_config_file(config, tmp_path))]
        first = subprocess.Popen(cmd, env=trainer_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while not held.hits:
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline, f"no upload of checkpoint {held_step} within 300 s"
            time.sleep(0.1)
        first.kill()
        first.wait()
    killed_at = checkpoint.complete_steps(storage, config.checkpoint_uri)[0]
    assert killed_at == held_step - 4  # the held checkpoint has its files but no manifest: incomplete
    assert storage.get_json(config.output.uri + "manifest.json") is None

    config = make_config("resume", checkpoint={"everySteps": 4, "keep": 3})  # straight to S3 this time
    cmd = [sys.executable, "-m", "kubetune_trainer", "train", "--config", str(_config_file(config, tmp_path))]
    second = subprocess.run(cmd, env=trainer_env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f'"event": "resumed", "step": {killed_at}' in second.stdout
    manifest = storage.get_json(config.output.uri + "manifest.json")
    assert manifest["steps"] == manifest["totalSteps"] == 24
    steps = [e["step"] for e in manifest["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # one continuous curve, no step twice
    assert min(steps) <= killed_at  # the history from before the kill is carried over
    losses = [e["loss"] for e in manifest["history"]]
    assert losses[-1] < losses[0]


def launch_two_processes(config_file) -> list[str]:
    # `--multi_gpu` selects accelerate's torchrun launcher; without a GPU the trainer joins with gloo.
    return [sys.executable, "-m", "kubetune_trainer", "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "kubetune_trainer", "train", "--config", str(config_file)]


def test_two_processes_with_gloo_through_accelerate_launch(make_config, storage, trainer_env, tmp_path):
    """As on a cluster: `kubetune validate` tokenizes into the cache in object storage, then the two training
    processes of a fresh node use it: the node's first process downloads it, both memory-map it."""
    config = make_config("ddp", hyperparameters={"maxSteps": 8}, evaluation={"everySteps": 4},
                         checkpoint={"everySteps": 4})
    termination = tmp_path / "termination-log"
    validated = subprocess.run([sys.executable, "-m", "kubetune_trainer", "validate", "--config",
                                str(_config_file(config, tmp_path))], env={**trainer_env,
                               "KUBETUNE_TERMINATION_LOG": str(termination)}, capture_output=True, text=True,
                               timeout=300)
    assert validated.returncode == 0, validated.stderr
    report = json.loads(termination.read_text())
    # every record but those the data-quality checks drop (the generated support chats repeat themselves)
    samples = 192 - report["quality"]["dropped"].get("train", 0)
    assert report["valid"] and report["splits"]["train"]["samples"] == samples and report["plannedSteps"] == 8
    assert report["cache"]["uri"].startswith(config.checkpoint_uri + "data-cache/") and not report["cache"]["reused"]
    assert storage.exists(report["cache"]["uri"] + "meta.json")
    assert f"{samples} samples" in validated.stdout and "tokenized cache written" in validated.stdout

    fresh_node = config.model_copy(update={"work_dir": str(tmp_path / "node")})
    done = subprocess.run(launch_two_processes(_config_file(fresh_node, tmp_path)), env=trainer_env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"event"')]
    assert [e["cache"] for e in events if e["event"] == "data_cache"] == ["downloaded"]
    assert list((tmp_path / "node" / "data-cache").iterdir()) == [tmp_path / "node" / "data-cache" /
                                                                 report["cache"]["key"]]  # one copy, no leftovers
    manifest = storage.get_json(config.output.uri + "manifest.json")
    assert manifest["processes"] == 2 and manifest["steps"] == 8
    assert done.stdout.count('"event": "published"') == 1  # only rank 0 reports and publishes


def test_fsdp_shards_over_two_processes_checkpoints_resumes_and_publishes(make_config, storage, trainer_env,
                                                                         tiny_base, tmp_path):
    config = make_config("fsdp", hyperparameters={"maxSteps": 8, "strategy": "fsdp"}, evaluation={"everySteps": 4},
                         checkpoint={"everySteps": 4, "keep": 3})
    cmd = launch_two_processes(_config_file(config, tmp_path))
    first = subprocess.run(cmd, env=trainer_env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert '"processes": 2, "strategy": "fsdp"' in first.stdout
    manifest = storage.get_json(config.output.uri + "manifest.json")
    assert manifest["processes"] == 2 and manifest["steps"] == 8
    assert checkpoint.complete_steps(storage, config.checkpoint_uri) == [4]
    # The adapter gathered from the shards reloads with peft and gives the test loss the run reported.
    _, _, loss = reload_published(storage, config, tiny_base, tmp_path)
    assert loss == pytest.approx(manifest["metrics"]["test"]["loss"], abs=1e-4)

    # Unpublished again, the job resumes from its sharded step-4 checkpoint and ends where it ended.
    storage.delete(config.output.uri + "manifest.json")
    second = subprocess.run(cmd, env=trainer_env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert '"event": "resumed", "step": 4' in second.stdout
    again = storage.get_json(config.output.uri + "manifest.json")
    assert again["steps"] == 8
    assert again["history"][-1]["loss"] == pytest.approx(manifest["history"][-1]["loss"], rel=1e-3)
    assert again["metrics"]["test"]["loss"] == pytest.approx(manifest["metrics"]["test"]["loss"], rel=1e-3)


def test_validate_cli_bad_dataset_is_permanent(make_config, storage, trainer_env, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    storage.upload_file(bad, "s3://data/bad/train.jsonl")
    config = make_config("bad-data", dataset={"train": "s3://data/bad/train.jsonl", "validation": None,
                                              "test": None})
    done = subprocess.run([sys.executable, "-m", "kubetune_trainer", "validate", "--config",
                           str(_config_file(config, tmp_path))], env=trainer_env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == EXIT_DATA_INVALID, done.stderr
    assert "s3://data/bad/train.jsonl:1" in done.stderr and "assistant" in done.stderr


def test_qlora_without_gpu_is_a_clear_permanent_error(make_config, trainer_env, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = make_config("qlora-cpu", method={"type": "qlora"})
    done = subprocess.run([sys.executable, "-m", "kubetune_trainer", "train", "--config",
                           str(_config_file(config, tmp_path))], env=trainer_env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == EXIT_CONFIG_INVALID
    assert "qlora needs a CUDA GPU" in done.stderr


def test_run_cli_trains_a_finetunejob_manifest(uploaded, s3, storage, trainer_env, tmp_path):
    import yaml

    manifest = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "local-run"},
                "spec": {"baseModel": {"uri": uploaded["model"]}, "dataset": uploaded["data"],
                         "hyperparameters": {"maxSteps": 4, "batchSize": 4, "maxSeqLength": 128},
                         "output": {"uri": "s3://adapters/local-run/"}, "storage": {"endpoint": s3.endpoint}}}
    path = tmp_path / "finetunejob.yaml"
    path.write_text(yaml.safe_dump(manifest))
    done = subprocess.run([sys.executable, "-m", "kubetune_trainer", "run", str(path), "--work-dir",
                           str(tmp_path / "work"), "--metrics-port", "-1"], env=trainer_env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "published s3://adapters/local-run/ (4 steps, test loss" in done.stdout
    assert storage.get_json("s3://adapters/local-run/manifest.json")["steps"] == 4
