"""Checkpoints you can trust (issue 10): stopped by SIGTERM at any step, a run resumes at exactly that step and ends
where an uninterrupted run ends; the step's loss does not depend on how its samples are split (accumulation,
batch, processes), so a run resumes with another number of processes; a corrupt newest checkpoint falls back to
the previous one; a changed input is refused; nothing in a checkpoint runs code; the seed fixes the adapter."""

from __future__ import annotations

import json
import pickle
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kubetune_api import EXIT_RETRYABLE
from kubetune_trainer import checkpoint
from kubetune_trainer.errors import ConfigError, OutputInUseError
from kubetune_trainer.identity import RunIdentity
from kubetune_trainer.pipeline import run
from kubetune_trainer.record.history import HISTORY, read_records
from kubetune_trainer.storage import Storage, publish

pytestmark = pytest.mark.slow

SHORT = {"maxSteps": 8, "loggingSteps": 1, "batchSize": 2, "gradientAccumulationSteps": 1}


def _config_file(config, tmp_path: Path) -> Path:
    path = tmp_path / f"{config.job_name}-{random.randrange(1 << 30)}.yaml"
    path.write_text(config.to_yaml())
    return path


def _train_cmd(config_file: Path, processes: int = 1) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "kubetune_trainer", "train", "--config", str(config_file)]
    # accelerate's torchrun launcher; without a GPU the processes join with gloo
    return [sys.executable, "-m", "kubetune_trainer", "launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "kubetune_trainer", "train", "--config", str(config_file)]


def _train(config, env, tmp_path, processes: int = 1, expect: int = 0) -> tuple[list[dict], str]:
    """Run the trainer to its end; its JSON events and its stderr."""
    done = subprocess.run(_train_cmd(_config_file(config, tmp_path), processes), env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == expect, done.stdout[-3000:] + done.stderr[-3000:]
    return _events(done.stdout), done.stderr


def _run_here(config) -> list[dict]:
    """Run the trainer in this process (no interpreter start: faster); its events."""
    events = []
    run(config, report=events.append)
    return events


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _losses(manifest: dict) -> dict[int, tuple[float, float]]:
    return {e["step"]: (e["loss"], e["grad_norm"]) for e in manifest["history"]}


def _adapter(storage: Storage, config, dest: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    storage.download(config.output.uri, dest)
    return load_file(dest / "adapter_model.safetensors")


def test_sigterm_at_a_random_step_checkpoints_there_and_the_resumed_run_ends_like_an_uninterrupted_one(
        make_config, storage, trainer_env, tmp_path):
    hp = {"maxSteps": 12, "loggingSteps": 1}
    lora = {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1}}  # dropout: the RNG must be restored
    whole = make_config("whole", hyperparameters=hp, method=lora, checkpoint={"everySteps": 4})
    _run_here(whole)
    expected = storage.get_json(whole.output.uri + "manifest.json")

    config = make_config("stopped", hyperparameters=hp, method=lora, checkpoint={"everySteps": 4})
    target = random.randrange(2, 10)
    first = subprocess.Popen(_train_cmd(_config_file(config, tmp_path)), env=trainer_env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    events, output = [], []
    for line in first.stdout:
        output.append(line)
        events += _events(line)
        if events[-1:] and events[-1].get("event") == "train" and events[-1]["step"] == target:
            first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=300) == EXIT_RETRYABLE, "".join(output)[-3000:]
    (stopped,) = [e for e in events if e["event"] == "stopped"]
    assert target <= stopped["step"] <= target + 2 and stopped["reason"] == "SIGTERM"
    assert checkpoint.complete_steps(storage, config.checkpoint_uri)[0] == stopped["step"]
    assert storage.get_json(config.output.uri + "manifest.json") is None

    events = _run_here(config)
    (resumed,) = [e for e in events if e["event"] == "resumed"]
    assert resumed["step"] == stopped["step"]  # that very step, not the last periodic checkpoint
    manifest = storage.get_json(config.output.uri + "manifest.json")
    assert manifest["steps"] == 12
    want, got = _losses(expected), _losses(manifest)
    assert sorted(got) == list(range(1, 13))
    for step in range(stopped["step"] + 1, 13):
        assert got[step][0] == pytest.approx(want[step][0], abs=1e-5), step
    assert manifest["metrics"]["test"]["loss"] == pytest.approx(expected["metrics"]["test"]["loss"], abs=1e-5)
    # metrics.jsonl (issue 31): one history over both starts, every step once, listed with its sha256.
    records = read_records(storage.download_to(config.output.uri + HISTORY, tmp_path / HISTORY))
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 13))
    assert [r["kind"] for r in records][-1] == "test" and len({(r["kind"], r["step"]) for r in records}) == len(records)
    assert any(f["path"] == HISTORY and f["sha256"] for f in manifest["files"])
    assert [c["step"] for c in manifest["checkpoints"] if c["kept"]][-1] == 12
    assert stopped["step"] in [c["step"] for c in manifest["checkpoints"]]


@pytest.fixture(scope="module")
def two_processes(make_config, storage, trainer_env, tmp_path_factory):
    """2 processes x batch 2 (4 samples a step), a checkpoint at step 4."""
    config = make_config("split-2x2", hyperparameters=SHORT, checkpoint={"everySteps": 4, "keep": 3})
    _train(config, trainer_env, tmp_path_factory.mktemp("two"), processes=2)
    return config, storage.get_json(config.output.uri + "manifest.json")


@pytest.mark.parametrize("hp", [{"gradientAccumulationSteps": 2}, {"batchSize": 4}], ids=["accum2xbatch2",
                                                                                         "accum1xbatch4"])
def test_a_step_has_the_same_loss_and_gradients_however_its_samples_are_split(
        make_config, storage, trainer_env, tmp_path, two_processes, hp):
    reference, ref_manifest = two_processes
    config = make_config(f"split-{'-'.join(f'{k}{v}' for k, v in hp.items())}".lower(),
                         hyperparameters={**SHORT, **hp}, checkpoint={"everySteps": 4})
    _run_here(config)
    manifest = storage.get_json(config.output.uri + "manifest.json")
    want, got = _losses(ref_manifest), _losses(manifest)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in want:
        assert got[step][0] == pytest.approx(want[step][0], rel=1e-4), step  # loss
        assert got[step][1] == pytest.approx(want[step][1], rel=1e-3), step  # gradient norm
    ours, theirs = _adapter(storage, config, tmp_path / "a"), _adapter(storage, reference, tmp_path / "b")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("processes", [1, 4])
def test_a_two_process_checkpoint_resumes_with_another_number_of_processes(
        storage, trainer_env, tmp_path, two_processes, processes):
    config, reference = two_processes
    storage.delete(config.output.uri + "manifest.json")  # unpublished: the run resumes from its step-4 checkpoint
    events = _run_here(config) if processes == 1 else _train(config, trainer_env, tmp_path, processes)[0]
    (resumed,) = [e for e in events if e["event"] == "resumed"]
    assert resumed["step"] == 4 and resumed["processes"] == {"before": 2, "now": processes}
    (plan,) = [e for e in events if e["event"] == "plan"]
    assert plan["step_samples"] == 4  # the same samples a step, dealt out to `processes`
    manifest = storage.get_json(config.output.uri + "manifest.json")
    want, got = _losses(reference), _losses(manifest)
    for step in range(5, 9):
        assert got[step][0] == pytest.approx(want[step][0], rel=1e-4), step


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(make_config, storage, trainer_env, tmp_path):
    config = make_config("corrupt", hyperparameters=SHORT, checkpoint={"everySteps": 2, "keep": 3})
    _run_here(config)
    expected = storage.get_json(config.output.uri + "manifest.json")
    assert checkpoint.complete_steps(storage, config.checkpoint_uri) == [6, 4, 2]
    bad = tmp_path / "trainable.safetensors"
    bad.write_bytes(b"not a safetensors file")
    storage.upload_file(bad, checkpoint.step_uri(config.checkpoint_uri, 6) + "trainable.safetensors")
    storage.delete(config.output.uri + "manifest.json")

    events = _run_here(config)
    (skipped,) = [e for e in events if e["event"] == "checkpoint_unusable"]
    assert "step-00000006" in skipped["uri"] and "does not match" in skipped["error"]
    (resumed,) = [e for e in events if e["event"] == "resumed"]
    assert resumed["step"] == 4
    manifest = storage.get_json(config.output.uri + "manifest.json")
    assert manifest["steps"] == 8
    assert _losses(manifest)[8][0] == pytest.approx(_losses(expected)[8][0], abs=1e-5)


def test_resuming_with_changed_data_is_refused(make_config, storage, trainer_env, tmp_path, uploaded):
    data = {"train": "s3://data/changing/train.jsonl", "validation": None, "test": None}
    original = tmp_path / "train.jsonl"
    storage.download(uploaded["data"]["train"], tmp_path / "orig")
    lines = (tmp_path / "orig" / "train.jsonl").read_text().splitlines()
    original.write_text("\n".join(lines) + "\n")
    storage.upload_file(original, data["train"])
    config = make_config("changing", dataset=data, evaluation={"everySteps": None},
                         hyperparameters={**SHORT, "maxSteps": 4}, checkpoint={"everySteps": 2})
    _run_here(config)
    storage.delete(config.output.uri + "manifest.json")
    original.write_text("\n".join(reversed(lines)) + "\n")  # the same URI, other content
    storage.upload_file(original, data["train"])

    with pytest.raises(ConfigError) as refused:  # a new pod: a new scratch folder, the data downloaded again
        _run_here(config.model_copy(update={"work_dir": str(tmp_path / "new-pod")}))
    assert "step-00000002/: this checkpoint was written with other inputs: datasets" in refused.value.message
    assert "checkpoint.uri to a new prefix" in refused.value.message


def _fake_checkpoint(tmp_path: Path, prefix: str, step: int, run: RunIdentity, optimizer: Path | None = None):
    storage = Storage()
    directory = tmp_path / f"ckpt-{step}"
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), lambda s: 1)
    checkpoint.save(directory, {"w": torch.ones(2)}, {"state": {}, "param_groups": []}, scheduler,
                    checkpoint.TrainState(step=step), [checkpoint.rng_state()])
    if optimizer:
        (directory / "optimizer.pt").write_bytes(optimizer.read_bytes())
    fingerprint = {"processes": 1, "step_samples": 4}
    publish(storage, directory, checkpoint.step_uri(prefix, step),
            {"kind": "checkpoint", "step": step, "run": run.dump(), "fingerprint": fingerprint})
    return storage


def test_another_runs_checkpoints_are_refused(tmp_path):
    prefix = str(tmp_path / "ckpts")
    storage = _fake_checkpoint(tmp_path, prefix, 4, RunIdentity("other-uid", "x" * 64))
    mine = RunIdentity("my-uid", "y" * 64)
    with pytest.raises(OutputInUseError, match=r"checkpoint of another run \(other-uid\)"):
        checkpoint.restore_latest(storage, prefix, tmp_path / "dest", mine, lambda event: None)


def test_loading_a_checkpoint_never_runs_code_from_storage(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:  # unpickled without weights_only, it would create `marker`
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state": Exploit()}, protocol=2))
    prefix = str(tmp_path / "ckpts")
    run = RunIdentity("uid", "h" * 64)
    storage = _fake_checkpoint(tmp_path, prefix, 2, run)
    _fake_checkpoint(tmp_path, prefix, 4, run, optimizer=evil)
    warnings = []
    restored = checkpoint.restore_latest(storage, prefix, tmp_path / "dest", run, warnings.append)
    assert not marker.exists()
    assert restored.state.step == 2  # the newest one did not load (weights_only refused it): the one before
    assert warnings[0]["event"] == "checkpoint_unusable" and "step-00000004" in warnings[0]["uri"]


def test_rng_state_is_saved_and_restored_per_rank(tmp_path):
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), lambda s: 1)
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        random.seed(seed)
        states.append(checkpoint.rng_state())
    checkpoint.save(tmp_path / "c", {"w": torch.ones(1)}, {"state": {}, "param_groups": []}, scheduler,
                    checkpoint.TrainState(), states)
    *_, rng = checkpoint.load(tmp_path / "c")
    for rank, seed in enumerate((1, 2)):
        checkpoint.set_rng_state(rng[rank])
        draw = (torch.rand(3), random.random())
        torch.manual_seed(seed)
        random.seed(seed)
        assert torch.equal(draw[0], torch.rand(3)) and draw[1] == random.random()


def test_the_same_seed_gives_the_same_initial_adapter(tiny_base):
    from kubetune_api import Hyperparameters, MethodSpec
    from kubetune_trainer.modeling import load_model, trainable_state_dict

    def adapter(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(1234 + seed * 7)  # whatever state the generator was in before
        return trainable_state_dict(load_model(tiny_base, MethodSpec(), "no", Hyperparameters(seed=seed)))

    a, b, c = adapter(5), adapter(5), adapter(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)
