"""Status helpers: the trainer's metrics (a real TrainerMetrics registry: the contract), conditions, times."""

from __future__ import annotations

from kubetune_operator.status import (
    PERMANENT,
    charged,
    explain_failure,
    failure_reason,
    human_duration,
    parse_trainer_metrics,
    peer_lost,
    result_from_pods,
    set_condition,
)
from kubetune_trainer.metrics import TrainerMetrics
from prometheus_client import generate_latest

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
    assert parse_trainer_metrics(generate_latest(m.registry).decode(), "other-job") == {}


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
    tj = job({"metadata": {"name": "demo-train"}, "spec": {}}, finished="Complete")
    res = result_from_pods([pod(tj, exit_code=0, message="done")], "trainer", "s3://out/x")
    assert res == {"adapterUri": "s3://out/x", "manifestUri": "s3://out/x/manifest.json"}


def test_explain_failure_uses_the_newest_termination_message():
    tj = job(
        {"metadata": {"name": "demo-train"}, "spec": {}},
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
