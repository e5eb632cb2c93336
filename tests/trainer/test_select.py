"""output.select best, the baseline before training and early stopping on evaluation.metric, on CPU against the
embedded S3 server. Validation results are scripted (the real evaluation runs for the test split), so which step
is best is known in advance."""

from __future__ import annotations

import pytest
from accelerate import Accelerator
from kubetune_api import DataFormat
from kubetune_trainer import checkpoint, train
from kubetune_trainer.data import pack_examples, tokenize_dataset
from kubetune_trainer.evaluate import evaluate
from kubetune_trainer.modeling import load_adapter
from kubetune_trainer.pipeline import run
from kubetune_trainer.storage import read_published
from kubetune_trainer.tasks import task_for
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow


def scripted_validation(monkeypatch, losses: list[float]) -> list[int]:
    """The loop's validation results are `losses`, in order; returns the steps they were asked at."""
    real, asked = train.evaluate, []

    def fake(task, model, examples, split, accelerator, batch_size, metrics=None):
        if split != "validation":
            return real(task, model, examples, split, accelerator, batch_size, metrics)
        asked.append(len(asked))
        return {"loss": losses[len(asked) - 1], "perplexity": 1.0, "token_accuracy": 0.5, "tokens": 1}

    monkeypatch.setattr(train, "evaluate", fake)
    return asked


def test_select_best_publishes_the_best_steps_weights(make_config, storage, monkeypatch, tiny_base, tmp_path):
    asked = scripted_validation(monkeypatch, [3.0, 1.0, 2.0, 2.5])
    config = make_config("select-best", hyperparameters={"maxSteps": 8}, evaluation={"everySteps": 2},
                         checkpoint={"everySteps": 2, "keep": 10}, output={"select": "best"})
    events: list[dict] = []
    manifest = run(config, report=events.append)

    assert len(asked) == 4  # steps 2, 4, 6, 8
    assert manifest["selected"] == {"select": "best", "step": 4, "metric": "loss", "value": 1.0}
    assert manifest["metrics"]["bestValidation"] == {"step": 4, "metric": "loss", "value": 1.0}
    assert {"event": "selected", "select": "best", "step": 4, "metric": "loss", "value": 1.0} in events
    # The published adapter is the step-4 model: the same weights as the step-4 checkpoint.
    published, ckpt = tmp_path / "published", tmp_path / "ckpt"
    read_published(storage, config.output.uri, published)
    read_published(storage, checkpoint.step_uri(config.checkpoint_uri, 4), ckpt)
    adapter, at_step_4 = load_file(published / "adapter_model.safetensors"), load_file(ckpt / "trainable.safetensors")
    assert adapter and len(adapter) == len(at_step_4)
    for name, tensor in at_step_4.items():
        saved = next(v for k, v in adapter.items() if name.replace(".default", "").endswith(k.split("model.", 1)[1]))
        assert saved.float().allclose(tensor.float()), name
    # Only the best step's weights are kept beside the checkpoints.
    kept = {u for u in storage.list(config.checkpoint_uri) if "best-step-" in u}
    assert kept and all("best-step-00000004/" in u for u in kept)

    # The test split was scored on the model before training too, and the manifest holds both and the difference.
    baseline = manifest["metrics"]["baseline"]["test"]
    test = manifest["metrics"]["test"]
    assert manifest["metrics"]["difference"]["test"]["loss"] == pytest.approx(test["loss"] - baseline["loss"])
    assert test["loss"] < baseline["loss"]
    assert baseline["loss"] == pytest.approx(base_model_test_loss(config, tiny_base, storage, tmp_path), abs=1e-4)
    assert {"event": "baseline", "split": "test", **baseline} in events

    # The published model reproduces the reported test loss.
    tokenizer = AutoTokenizer.from_pretrained(published)
    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_base), published).eval()
    assert split_loss(config, model, tokenizer, storage, tmp_path) == pytest.approx(test["loss"], abs=1e-4)


def base_model_test_loss(config, tiny_base, storage, tmp_path) -> float:
    """The baseline recomputed on its own: the base model loaded afresh, no adapter."""
    return split_loss(config, AutoModelForCausalLM.from_pretrained(tiny_base).eval(),
                     AutoTokenizer.from_pretrained(tiny_base), storage, tmp_path)


def split_loss(config, model, tokenizer, storage, tmp_path) -> float:
    storage.download(config.dataset.test, tmp_path)
    seqs = pack_examples(tokenize_dataset(tmp_path / "test.jsonl", "test", fmt=DataFormat.chat, tokenizer=tokenizer,
                                          max_seq_length=128), 128, seed=config.hyperparameters.seed)
    task = task_for(config, tmp_path)
    task.processor = tokenizer
    return evaluate(task, model, seqs, "test", Accelerator(cpu=True), 4)["loss"]


def test_early_stopping_follows_the_metric_and_baseline_can_be_off(make_config, monkeypatch):
    scripted_validation(monkeypatch, [2.0, 1.0, 1.5, 1.2, 1.1, 0.5])
    config = make_config("stop-on-metric", hyperparameters={"maxSteps": 12}, evaluation={
        "everySteps": 2, "earlyStopping": {"patience": 2}, "baseline": False})
    events: list[dict] = []
    manifest = run(config, report=events.append)
    assert manifest["steps"] == 8 and manifest["earlyStopped"]  # 1.5 and 1.2 did not beat 1.0 at step 4
    assert manifest["selected"] == {"select": "last", "step": 8}
    assert "baseline" not in manifest["metrics"] and not any(e["event"] == "baseline" for e in events)


def test_generation_metrics_for_the_model_and_its_baseline(make_config):
    config = make_config("generation", hyperparameters={"maxSteps": 2}, evaluation={
        "everySteps": None, "generation": {"maxNewTokens": 8, "maxSamples": 4}})
    events: list[dict] = []
    manifest = run(config, report=events.append)
    test, baseline = manifest["metrics"]["test"], manifest["metrics"]["baseline"]["test"]
    for result in (test, baseline):
        assert result["generated"] == 4 and 0 <= result["bleu"] <= 100 and 0 <= result["rouge_l"] <= 1
        assert 0 <= result["exact_match"] <= 1 and len(result["samples"]) == 3
    assert {"bleu", "rouge_l", "exact_match", "loss"} <= manifest["metrics"]["difference"]["test"].keys()


def test_train_on_validation_trains_on_both_splits_and_still_scores_test(make_config, uploaded):
    """dataset.trainOnValidation (a sweep's promote retrain): the training sequences are the train and validation
    records together; nothing is evaluated on validation, the test split still is."""
    config = make_config("train-on-validation", dataset={"trainOnValidation": True},
                         hyperparameters={"maxSteps": 2, "packing": False},
                         evaluation={"everySteps": None, "baseline": False})
    events: list[dict] = []
    manifest = run(config, report=events.append)

    (validated,) = [e for e in events if e["event"] == "validated"]
    (plan,) = [e for e in events if e["event"] == "plan"]
    train, validation = validated["train"]["samples"], validated["validation"]["samples"]  # after the checks
    assert train > 100 and validation > 20 and plan["sequences"] == train + validation
    assert not [e for e in events if e["event"] == "validation"]
    assert "validation" not in manifest["metrics"] and manifest["metrics"]["test"]["loss"] > 0
    assert [e["event"] for e in events if e["event"] == "test"] == ["test"]


def test_the_data_report_plans_train_on_validation_over_both_splits(monkeypatch):
    """The steps and the estimate the validation reports before any GPU starts count what training reads."""
    from types import SimpleNamespace

    from kubetune_api import TrainerConfig
    from kubetune_trainer.data import report as report_module
    from kubetune_trainer.data.validate import DatasetReport

    monkeypatch.setattr(report_module, "count_parameters", lambda model_dir, task: 1000)
    reports = {s: DatasetReport(s, DataFormat.chat, samples=n, tokens=64 * n, trained_tokens=32 * n, truncated=0,
                                max_length=64, sequences=n) for s, n in (("train", 80), ("validation", 20))}

    def report(**dataset):
        config = TrainerConfig.model_validate({
            "jobName": "fit", "baseModel": {"uri": "/model"}, "output": {"uri": "/out"},
            "dataset": {"train": "/t", "validation": "/v", **dataset},
            "hyperparameters": {"epochs": 1, "batchSize": 4, "maxSeqLength": 64}})
        config = config.model_copy(update={"hardware": config.hardware.model_copy(update={"gpus": 1})})
        return report_module.data_report(config, SimpleNamespace(unit="token"), reports, "/model")

    alone, both = report(), report(trainOnValidation=True)
    assert (alone["sequences"], alone["plannedSteps"]) == (80, 20)
    assert (both["sequences"], both["plannedSteps"]) == (100, 25)
    assert both["estimate"]["tokens"] == pytest.approx(alone["estimate"]["tokens"] * 1.25)
