"""Status helpers: the trainer's metrics (a real TrainerMetrics registry: the contract), conditions, times."""

from __future__ import annotations

import json

from kubetune_api import FineTuneJobStatus
from kubetune_operator import metrics as operator_metrics
from kubetune_operator.conditions import set_condition
from kubetune_operator.observe import PERMANENT, charged, explain_failure, failure_reason, peer_lost
from kubetune_operator.progress import (
    apply_metrics,
    checkpoints_from_report,
    human_duration,
    parse_trainer_metrics,
    result_from_pods,
    result_summary,
)
from kubetune_trainer.cli import success_message
from kubetune_trainer.metrics import TrainerMetrics
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from .builders import NOW, job, pod


def test_parses_the_trainers_own_exposition():
    m = TrainerMetrics("demo", "lora", "s3://models/tiny/")
    m.set(
        step=5,
        total_steps=10,
        epoch=0.5,
        progress_ratio=0.5,
        eta_seconds=30,
        train_loss=2.5,
        tokens_per_second=100.0,
    )
    m.add_tokens(640)
    m.checkpoint_done()
    m.set_phase("training")
    values = parse_trainer_metrics(generate_latest(m.registry).decode(), "demo")
    assert values["step"] == 5 and values["total_steps"] == 10 and values["train_loss"] == 2.5
    assert values["tokens_trained_total"] == 640 and values["checkpoints_total"] == 1
    assert values["phase"] == "training" and values["last_checkpoint_timestamp_seconds"] > 0
    assert "validation_loss" not in values  # never set: not reported as 0
    m.set_evaluation("validation", "finetuned", {"loss": 1.5, "accuracy": 0.75, "per_class": {"a": {"f1": 1.0}}})
    values = parse_trainer_metrics(generate_latest(m.registry).decode(), "demo")
    assert "evaluation" not in values  # a family by split/model/metric: not one status field
    assert parse_trainer_metrics(generate_latest(m.registry).decode(), "other-job") == {}


def test_the_objectives_training_metrics_reach_the_status():
    """Preference tuning's rewards of the last logging window: status.trainMetrics, camelCase, 4 decimals."""
    m = TrainerMetrics("demo", "lora", "s3://models/tiny/")
    m.set(step=4, total_steps=8, train_loss=0.5)
    m.set_train({"rewards_accuracy": 0.875, "rewards_margin": 1.23456789, "nll_loss": float("nan")})
    values = parse_trainer_metrics(generate_latest(m.registry).decode(), "demo")
    assert values["train_loss"] == 0.5 and "train_metric" not in values
    status: dict = {}
    apply_metrics(status, values, "s3://out/checkpoints/", NOW)
    assert status["trainMetrics"] == {"rewardsAccuracy": 0.875, "rewardsMargin": 1.2346}
    plain: dict = {}
    apply_metrics(plain, parse_trainer_metrics(generate_latest(TrainerMetrics("demo", "lora", "m").registry)
                                               .decode(), "demo"), "s3://out/checkpoints/", NOW)
    assert "trainMetrics" not in plain  # sft: no objective metrics


def test_the_last_validation_evaluation_and_its_step_reach_the_status():
    """What a FineTuneSweep judges a running trial on: status.evalMetrics (camelCase) at status.evalStep."""
    m = TrainerMetrics("demo", "lora", "s3://models/tiny/")
    m.set(step=6, total_steps=8, validation_loss=1.25, validation_step=4)
    m.set_evaluation("validation", "finetuned", {"loss": 1.25, "token_accuracy": 0.5})
    m.set_evaluation("test", "baseline", {"loss": 3.0})
    status: dict = {}
    apply_metrics(status, parse_trainer_metrics(generate_latest(m.registry).decode(), "demo"), "s3://c/", NOW)
    assert status["evalMetrics"] == {"loss": 1.25, "tokenAccuracy": 0.5} and status["evalStep"] == 4
    assert status["evalLoss"] == 1.25
    FineTuneJobStatus.model_validate(status)


def test_the_result_carries_the_validation_metrics_of_the_published_model():
    manifest = {"steps": 10, "task": "causal-lm", "headline": "loss",
                "metrics": {"validation": {"loss": 1.5, "perplexity": 4.48}, "test": {"loss": 1.6}}}
    res = result_from_pods(succeeded(success_message(manifest, "s3://o/manifest.json", "cd" * 32)), "trainer",
                           "s3://o/")
    assert res["metrics"] == {"test": {"loss": 1.6}, "validation": {"loss": 1.5, "perplexity": 4.48}}


def test_condition_transition_time_moves_only_on_change():
    status: dict = {}
    set_condition(status, "Running", True, "Training", "a", 1, NOW)
    first = status["conditions"][0]["lastTransitionTime"]
    later = NOW.replace(hour=13)
    set_condition(status, "Running", True, "Training", "b", 2, later)
    assert status["conditions"][0]["lastTransitionTime"] == first
    assert status["conditions"][0]["message"] == "b" and status["conditions"][0]["observedGeneration"] == 2
    set_condition(status, "Running", False, "Suspended", "c", 2, later)
    assert status["conditions"][0]["lastTransitionTime"] == "2026-01-01T13:00:00Z"
    set_condition(status, "Validated", True, "DatasetValid", "", 2, later)
    assert [c["type"] for c in status["conditions"]] == ["Validated", "Running"]


def test_human_duration():
    assert [human_duration(s) for s in (5, 65, 3725, -1)] == ["5s", "1m05s", "1h02m", "0s"]


def test_result_without_a_reported_sha():
    tj = job({"metadata": {"name": "demo-train-1"}, "spec": {}}, finished="Complete")
    res = result_from_pods([pod(tj, exit_code=0, message="done")], "trainer", "s3://out/x")
    assert res == {"adapterUri": "s3://out/x", "manifestUri": "s3://out/x/manifest.json"}


def test_explain_failure_uses_the_newest_termination_message():
    tj = job(
        {"metadata": {"name": "demo-train-1"}, "spec": {}},
        finished="Failed",
        reason="DeadlineExceeded",
        message="Job was active longer than specified deadline",
    )
    reason, message = explain_failure(tj, [], "trainer")
    assert reason == "DeadlineExceeded" and message == "Job was active longer than specified deadline"


def test_permanent_reasons_by_exit_code_or_message_prefix():
    assert PERMANENT == {"DatasetInvalid", "OutputInUse", "ConfigInvalid"}
    assert failure_reason({"exitCode": 73}) == "OutputInUse"
    assert failure_reason({"exitCode": 1, "message": "OutputInUse: s3://out/ holds another run's files"}) == \
        "OutputInUse"
    assert failure_reason({"exitCode": 76, "message": "PeerLost: a peer worker was stopped"}) is None


def test_who_is_charged():
    assert charged({"exitCode": 1}) and charged({"exitCode": 75}) and charged({"exitCode": 137})
    assert not charged({"exitCode": 0}) and not charged({"exitCode": 76})
    assert not charged({"exitCode": 75, "disrupted": True}) and not charged({"exitCode": 137, "disrupted": True})
    assert peer_lost({"exitCode": 76}) and not peer_lost({"exitCode": 76, "disrupted": True})


CLASSIFIER_MANIFEST = {
    "steps": 40, "totalSteps": 40, "tokensTrained": 0, "task": "sequence-classification", "headline": "accuracy",
    "labels": ["negative", "positive"],
    "selected": {"select": "best", "step": 32, "metric": "accuracy", "value": 0.9},
    "metrics": {
        "train": {"loss": 0.2},
        "test": {"loss": 0.31234567, "accuracy": 0.91234, "f1": float("nan"), "samples": 200,
                 "per_class": {"negative": {"f1": 0.9}}, "confusion_matrix": [[90, 10], [8, 92]]},
        "baseline": {"test": {"loss": 0.69, "accuracy": 0.3344, "samples": 200}},
    },
}


def succeeded(report: str) -> list[dict]:
    tj = job({"metadata": {"name": "demo-train-1"}, "spec": {}}, finished="Complete")
    return [pod(tj, exit_code=0, message=report)]


def test_result_from_the_trainers_own_success_report():
    """cli.success_message (what rank 0 writes) -> status.result: task, published step, scalars, summary."""
    report = success_message(CLASSIFIER_MANIFEST, "s3://out/x/manifest.json", "ab" * 32)
    res = result_from_pods(succeeded(report), "trainer", "s3://out/x/")
    assert res == {
        "adapterUri": "s3://out/x/", "manifestUri": "s3://out/x/manifest.json", "sha256": "ab" * 32,
        "task": "sequence-classification", "selectedStep": 32,
        "metrics": {"test": {"loss": 0.312346, "accuracy": 0.91234, "samples": 200.0},  # NaN f1 left out
                    "baseline": {"loss": 0.69, "accuracy": 0.3344, "samples": 200.0}},
        "summary": "accuracy 0.912 (base 0.334)",
    }
    FineTuneJobStatus.model_validate({"phase": "Succeeded", "result": res})  # fits the CRD's status schema


def _checkpoint(step: int, **extra) -> dict:
    return {"step": step, "uri": f"s3://out/x/checkpoints/step-{step:08d}/", "time": "2026-12-06T15:00:00.000Z",
            "validation": {"loss": 1.0 / step, "accuracy": 0.5, "per_class": {"a": {"f1": 1}}}, "kept": False, **extra}


def test_status_checkpoints_from_the_success_report():
    """The manifest's checkpoints -> rank 0's report -> status.checkpoints: the newest five, with their validation
    scalars and the published step marked; a malformed entry is dropped, never an error."""
    checkpoints = [_checkpoint(s) for s in range(8, 64, 8)] + [_checkpoint(64, uri="s3://out/x/", published=True)]
    report = json.loads(success_message({**CLASSIFIER_MANIFEST, "checkpoints": checkpoints}, "s3://out/x/m", "ab" * 32))
    rows = checkpoints_from_report(report)
    assert [r["step"] for r in rows] == [32, 40, 48, 56, 64]
    assert rows[0] == {"step": 32, "uri": "s3://out/x/checkpoints/step-00000032/", "time": "2026-12-06T15:00:00.000Z",
                       "validation": {"loss": 0.03125, "accuracy": 0.5}}
    assert rows[-1]["published"] is True and rows[-1]["uri"] == "s3://out/x/"
    FineTuneJobStatus.model_validate({"phase": "Succeeded", "checkpoints": rows})  # fits the CRD's status schema
    hostile = {"checkpoints": [{"step": "3", "uri": "s3://a/"}, {"step": 4, "uri": "http://evil/"}, 7,
                               {"step": 5, "uri": "s3://a/", "time": "yesterday", "validation": [1], "published": 1}]}
    assert checkpoints_from_report(hostile) == [{"step": 5, "uri": "s3://a/"}]
    assert checkpoints_from_report({}) is None and checkpoints_from_report({"checkpoints": "x"}) is None


def test_status_checkpoints_while_training_from_the_scrape():
    """Each checkpoint rank 0 uploads joins status.checkpoints (its folder, its time), once, the newest five kept."""
    m = TrainerMetrics("demo", "lora", "s3://models/tiny/")
    status: dict = {}
    for step in (4, 8, 8, 12, 16, 20, 24):
        m.set(step=step, total_steps=40)
        m.checkpoint_done(step)
        apply_metrics(status, parse_trainer_metrics(generate_latest(m.registry).decode(), "demo"),
                      "s3://out/x/checkpoints/", NOW)
    assert [c["step"] for c in status["checkpoints"]] == [8, 12, 16, 20, 24]
    assert status["checkpoints"][-1]["uri"] == "s3://out/x/checkpoints/step-00000024/"
    assert status["checkpoints"][-1]["time"] == status["lastCheckpoint"]["time"]
    FineTuneJobStatus.model_validate({"phase": "Running", "checkpoints": status["checkpoints"]})


def test_many_validation_metrics_leave_the_checkpoints_their_headline():
    many = {f"metric_{i:03d}": i + 0.123456789 for i in range(60)}
    checkpoints = [{**_checkpoint(s), "validation": {**many, "accuracy": 0.5}} for s in (8, 16, 24, 32, 40)]
    report = success_message({**CLASSIFIER_MANIFEST, "checkpoints": checkpoints}, "s3://out/x/m", "ab" * 32)
    assert len(report.encode()) <= 4096
    assert [r["validation"] for r in checkpoints_from_report(json.loads(report))] == [{"accuracy": 0.5}] * 5


def test_result_of_a_causal_lm_without_a_baseline_and_of_an_older_trainer():
    manifest = {"steps": 10, "task": "causal-lm", "headline": "loss",
                "metrics": {"test": {"loss": 1.23456, "perplexity": 3.4, "token_accuracy": 0.5, "tokens": 999}}}
    res = result_from_pods(succeeded(success_message(manifest, "s3://o/manifest.json", "cd" * 32)), "trainer", "s3://o/")
    assert res["summary"] == "loss 1.235" and "baseline" not in res["metrics"] and "selectedStep" not in res
    old = json.dumps({"manifestUri": "s3://o/manifest.json", "manifestSha256": "ef" * 32, "steps": 3})
    res = result_from_pods(succeeded(old), "trainer", "s3://o/")
    assert set(res) == {"adapterUri", "manifestUri", "sha256"}
    hostile = json.dumps({"metrics": {"test": {"loss": "1", "accuracy": True}, "baseline": [1]}, "selectedStep": "3"})
    assert set(result_from_pods(succeeded(hostile), "trainer", "s3://o/")) == {"adapterUri", "manifestUri"}


def test_result_summary():
    assert result_summary({"test": {"loss": 1.2344}, "baseline": {"loss": 2.3456}}, "loss") == "loss 1.234 (base 2.346)"
    assert result_summary({"test": {"accuracy": 0.5}}, "accuracy") == "accuracy 0.500"
    assert result_summary({"test": {"loss": 1.0}}, "accuracy") is None
    assert result_summary({}, "loss") is None


def _result_series() -> dict:
    text = generate_latest(operator_metrics.REGISTRY).decode()
    return {(s.labels["finetunejob_namespace"], s.labels["finetunejob"], s.labels["model"], s.labels["metric"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "kubetune_operator_finetunejob_test_metric"}


def test_operator_exports_the_result_until_the_finetunejob_is_deleted():
    res = result_from_pods(succeeded(success_message(CLASSIFIER_MANIFEST, "s3://o/manifest.json", "ab" * 32)),
                           "trainer", "s3://o/")
    operator_metrics.record("uid-r", "Running", "Running", None, 1, job=("ml", "clf"), result=None)
    assert _result_series() == {}
    operator_metrics.record("uid-r", "Running", "Succeeded", None, 0, job=("ml", "clf"), result=res)
    try:
        series = _result_series()
        assert series[("ml", "clf", "finetuned", "accuracy")] == 0.91234
        assert series[("ml", "clf", "baseline", "accuracy")] == 0.3344
        assert len(series) == 6
        fewer = {**res, "metrics": {"test": {"accuracy": 0.5}}}
        operator_metrics.record("uid-r", "Succeeded", "Succeeded", None, 0, job=("ml", "clf"), result=fewer)
        assert _result_series() == {("ml", "clf", "finetuned", "accuracy"): 0.5}  # no stale series
    finally:
        operator_metrics.forget("uid-r")
    assert _result_series() == {}
