"""What the data costs, before the GPUs start: the operator tells the validation the hardware (the ConfigMap's
`hardware`), and copies the validation's JSON report into status.dataset, the Validated condition and an Event."""

from __future__ import annotations

import json

import pytest
import yaml
from kubetune_api import DEFAULT_GPU_TFLOPS, FineTuneJobSpec, TrainerConfig
from kubetune_operator import children
from kubetune_operator.conditions import get_condition
from kubetune_operator.reconcile import Observed
from kubetune_operator.settings import OperatorSettings

from .builders import ftj, job, pod
from .test_reconcile import desired, kinds, run

SUMMARY = "train 200,000 samples, 12.0M tokens (4.0M trained); 1,875 steps; about 6.7 GPU-hours"
REPORT = {  # the contract: what `kubetune validate` writes to /dev/termination-log
    "valid": True,
    "splits": {"train": {"samples": 200000, "tokens": 12000000, "trainedTokens": 4000000, "truncated": 3},
               "validation": {"samples": 2000, "tokens": 120000, "trainedTokens": 40000, "truncated": 0}},
    "sequences": 6000, "packingEfficiency": 0.97, "plannedSteps": 1875, "epochs": 3.0,
    "estimate": {"parameters": 8030000000, "trainableParameters": 42000000, "flops": 1.2e18,
                 "seconds": 3000.0, "gpuHours": 6.7, "gpus": 8, "gpuTflops": 400.0},
    "cache": {"uri": "s3://bucket/out/checkpoints/data-cache/abc123/", "key": "abc123", "reused": False},
    "summary": SUMMARY,
}
DATASET = {"samples": 200000, "tokens": 12000000, "trainedTokens": 4000000, "truncated": 3, "sequences": 6000,
           "packingEfficiency": 0.97, "plannedSteps": 1875, "estimatedSeconds": 3000.0, "estimatedGPUHours": 6.7,
           "cacheUri": "s3://bucket/out/checkpoints/data-cache/abc123/"}


def validated_by(message: str):
    """Reconcile a fresh FineTuneJob whose validation pod succeeded with this termination message."""
    body = ftj()
    c = desired(body)
    vj = job(c["validation"], finished="Complete")
    vpod = pod(vj, phase="Succeeded", exit_code=0, container="validate", message=message)
    return run(body, Observed(config_map=c["cm"], validation_job=vj, validation_pods=[vpod]))


def config(spec_updates: dict | None = None, settings: OperatorSettings | None = None) -> TrainerConfig:
    body = ftj(spec_updates)
    cm = children.config_map(body["metadata"], FineTuneJobSpec.model_validate(body["spec"]),
                             settings or OperatorSettings.from_env({}))
    return TrainerConfig.model_validate(yaml.safe_load(cm["data"]["trainer.yaml"]))


def test_the_config_map_tells_the_validation_the_hardware():
    hw = config({"resources": {"workers": 2, "gpusPerWorker": 4}}).hardware
    assert (hw.processes, hw.gpus, hw.gpu_tflops) == (8, 8, DEFAULT_GPU_TFLOPS)
    hw = config({"resources": {"workers": 3, "gpusPerWorker": 0}}).hardware  # CPU workers: one process each
    assert (hw.processes, hw.gpus) == (3, 0)
    estimate = OperatorSettings.from_env({"KUBETUNE_ESTIMATE_GPU_TFLOPS": "125"})  # the chart's estimate.gpuTflops
    assert config(settings=estimate).hardware.gpu_tflops == 125.0


def test_a_json_report_fills_status_dataset_the_condition_and_an_event():
    d = validated_by(json.dumps(REPORT))
    assert kinds(d) == ["demo-ingress", "demo-workers", "demo-train-1"] and d.phase == "Queued"
    assert d.status["dataset"] == DATASET
    validated = get_condition(d.status, "Validated")
    assert (validated["status"], validated["reason"], validated["message"]) == ("True", "DatasetValid", SUMMARY)
    assert [e for e in d.events if e[1] == "Validated"] == [("Normal", "Validated", SUMMARY)]


def test_nothing_else_of_the_report_reaches_the_status():
    report = {**REPORT, "splits": {"train": {**REPORT["splits"]["train"], "samples": "many", "tokens": True}},
              "packingEfficiency": float("nan"), "plannedSteps": 18.5, "estimate": "unknown",
              "cache": {"uri": "https://elsewhere.example/x"}, "source": "s3://data/secret-train.jsonl"}
    d = validated_by(json.dumps(report))
    assert d.status["dataset"] == {"trainedTokens": 4000000, "truncated": 3, "sequences": 6000}
    text = json.dumps(d.status) + json.dumps(d.events)
    assert "secret-train" not in text and "elsewhere" not in text


def test_a_report_without_estimate_or_summary_still_validates():
    d = validated_by(json.dumps({"valid": True, "splits": {"train": {"samples": 8, "tokens": 64}}}))
    assert d.status["dataset"] == {"samples": 8, "tokens": 64}
    assert get_condition(d.status, "Validated")["message"] == "dataset valid"
    assert not [e for e in d.events if e[1] == "Validated"]


@pytest.mark.parametrize("message", ["dataset valid: train 100 samples", "42", '"valid"', "{not json"])
def test_an_older_trainers_plain_text_is_the_message_as_before(message):
    d = validated_by(message)
    assert get_condition(d.status, "Validated")["message"] == message
    assert "dataset" not in d.status and not [e for e in d.events if e[1] == "Validated"]
    assert kinds(d) == ["demo-ingress", "demo-workers", "demo-train-1"]
