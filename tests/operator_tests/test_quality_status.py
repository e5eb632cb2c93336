"""Data quality in the FineTuneJob (issue 29): the validation report's `quality` -> status.dataset.quality, the
Validated condition's message, one Warning DataQuality Event, and the operator's per-check gauge."""

from __future__ import annotations

import copy
import json

import pytest
from kubetune_api import DatasetQuality, FineTuneJobStatus, Reason
from kubetune_operator import metrics
from kubetune_operator.conditions import get_condition
from kubetune_operator.progress import dataset_quality
from kubetune_operator.reconcile import Observed
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from .builders import ftj, job, pod
from .test_dataset_report import REPORT, SUMMARY
from .test_reconcile import desired, run

QUALITY_SUMMARY = ("train: 60 duplicates dropped, 3 e-mail addresses; test: 80 exact and 3 near copies of train "
                   "records (their 83 train copies dropped)")
QUALITY = {  # the contract: the report's `quality`, as `kubetune validate` writes it
    "duplicates": {"train": 60, "validation": 0, "test": 2},
    "leakage": {"validation": {"exact": 0, "near": 1}, "test": {"exact": 80, "near": 3}},
    "pii": {"train": {"email": 3, "phone": 1, "card": 0, "secret": 2}},
    "labels": {"conflicts": 25, "suspected": 40, "rare": ["c"], "unseen": ["d"]},
    "dropped": {"train": 143},
    "findings": 6,
    "summary": QUALITY_SUMMARY,
}


def validated_with(quality, body: dict | None = None):
    """Reconcile a FineTuneJob whose validation pod succeeded with REPORT plus this `quality`."""
    body = body or ftj()
    c = desired(body)
    vj = job(c["validation"], finished="Complete")
    message = json.dumps({**REPORT, "quality": quality})
    vpod = pod(vj, phase="Succeeded", exit_code=0, container="validate", message=message)
    return run(body, Observed(config_map=c["cm"], validation_job=vj, validation_pods=[vpod])), body, vpod


def quality_events(d) -> list[tuple[str, str, str]]:
    return [e for e in d.events if e[1] == Reason.DataQuality]


def test_the_reports_quality_is_status_dataset_quality_a_condition_message_and_one_warning():
    d, body, vpod = validated_with(QUALITY)
    assert d.status["dataset"]["quality"] == QUALITY
    assert d.status["dataset"]["samples"] == 200000  # the rest of status.dataset as before
    DatasetQuality.model_validate(d.status["dataset"]["quality"])
    validated = get_condition(d.status, "Validated")
    assert (validated["status"], validated["reason"]) == ("True", "DatasetValid")
    assert validated["message"] == f"{SUMMARY}; data quality: {QUALITY_SUMMARY}"
    assert quality_events(d) == [("Warning", "DataQuality", f"data quality: {QUALITY_SUMMARY}")]
    assert [e for e in d.events if e[1] == "Validated"] == [("Normal", "Validated", SUMMARY)]
    # the next reconcile reads the status written: validation passed once, so no second Event
    again = run({**body, "status": d.status}, Observed(config_map=desired(body)["cm"],
                                                        validation_job=job(desired(body)["validation"],
                                                                           finished="Complete"),
                                                        validation_pods=[vpod]))
    assert quality_events(again) == [] and again.status["dataset"]["quality"] == QUALITY


def test_clean_data_shows_its_zeros_without_a_warning():
    clean = {"duplicates": {"train": 0, "test": 0}, "leakage": {"test": {"exact": 0, "near": 0}},
             "pii": {"train": dict.fromkeys(("email", "phone", "card", "secret"), 0)}, "findings": 0,
             "summary": "no data-quality findings"}
    d, _, _ = validated_with(clean)
    assert d.status["dataset"]["quality"] == clean  # a causal-lm report: no labels, none made up
    assert get_condition(d.status, "Validated")["message"] == SUMMARY
    assert quality_events(d) == []


def test_findings_without_a_summary_still_warn():
    d, _, _ = validated_with({"duplicates": {"train": 4}, "findings": 1})
    message = "data quality: 1 data-quality check found something; see status.dataset.quality"
    assert quality_events(d) == [("Warning", "DataQuality", message)]
    assert get_condition(d.status, "Validated")["message"] == f"{SUMMARY}; {message}"


def test_without_a_report_summary_the_condition_says_dataset_valid():
    body = ftj()
    c = desired(body)
    vj = job(c["validation"], finished="Complete")
    report = {"valid": True, "splits": {"train": {"samples": 8}}, "quality": {"findings": 1, "summary": "x: 1"}}
    vpod = pod(vj, phase="Succeeded", exit_code=0, container="validate", message=json.dumps(report))
    d = run(body, Observed(config_map=c["cm"], validation_job=vj, validation_pods=[vpod]))
    assert get_condition(d.status, "Validated")["message"] == "dataset valid; data quality: x: 1"


@pytest.mark.parametrize("quality, kept", [
    ("3 duplicates", None),
    ([1, 2], None),
    ({}, None),
    ({"findings": True, "summary": 7}, None),
    ({"duplicates": {"train": -1, "validation": True, "test": 2.5, "bad split!": 3, "": 1, "x" * 64: 1,
                     "eval": 2}}, {"duplicates": {"eval": 2}}),
    ({"duplicates": "many", "dropped": [3], "findings": 2}, {"findings": 2}),
    ({"leakage": {"test": {"exact": "80", "near": 3, "lines": [4, 5]}, "validation": 5}},
     {"leakage": {"test": {"near": 3}}}),
    ({"pii": {"train": {"email": 1, "ssn": 4, "phone": None}, "test": {"email": "a@b.example"}}},
     {"pii": {"train": {"email": 1}}}),
    ({"labels": {"suspected": {"count": 40, "lines": [1, 2]}, "rare": [1, None, "c", True, {"x": 1}],
                 "unseen": "d", "classes": {"a": 5}}},
     {"labels": {"suspected": 40, "rare": ["1", "c"]}}),
    ({"labels": {"rare": [f"class-{i}" for i in range(50)], "conflicts": 1.0}},
     {"labels": {"rare": [f"class-{i}" for i in range(20)]}}),
    ({"summary": "  first line\nsecond line  ", "findings": 1}, {"summary": "first line", "findings": 1}),
    ({"summary": "y" * 5000}, {"summary": "y" * 1000}),
])
def test_a_malformed_quality_is_dropped_part_by_part_never_an_error(quality, kept):
    assert dataset_quality(quality) == kept
    d, _, _ = validated_with(quality)  # run() checks the whole status against FineTuneJobStatus
    assert d.status["dataset"].get("quality") == kept
    assert get_condition(d.status, "Validated")["status"] == "True"
    if kept:
        DatasetQuality.model_validate(kept)


def test_line_numbers_and_anything_else_stay_out():
    report = copy.deepcopy(QUALITY)
    report["leakage"]["test"]["lines"] = [3, 9]
    report["labels"]["suspected"] = {"count": 40, "lines": [7]}
    report["pii"]["train"]["examples"] = ["alice@example.com"]
    report["secret"] = "AKIAABCDEFGHIJKLMNOP"
    d, _, _ = validated_with(report)
    assert d.status["dataset"]["quality"] == QUALITY
    text = json.dumps(d.status) + json.dumps(d.events)
    assert "alice@" not in text and "AKIA" not in text and '"lines"' not in text
    FineTuneJobStatus.model_validate(d.status)


# -- the gauge -------------------------------------------------------------------------------------------------


def _quality_series() -> dict:
    text = generate_latest(metrics.REGISTRY).decode()
    return {(s.labels["finetunejob_namespace"], s.labels["finetunejob"], s.labels["check"], s.labels["split"]):
            s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "kubetune_operator_finetunejob_data_quality_findings"}


def test_a_check_per_series():
    assert metrics.quality_series(QUALITY) == {
        ("duplicates", "train"): 60, ("duplicates", "validation"): 0, ("duplicates", "test"): 2,
        ("leakage_exact", "validation"): 0, ("leakage_near", "validation"): 1,
        ("leakage_exact", "test"): 80, ("leakage_near", "test"): 3,
        ("pii_email", "train"): 3, ("pii_phone", "train"): 1, ("pii_card", "train"): 0, ("pii_secret", "train"): 2,
        ("label_conflicts", "train"): 25, ("label_suspected", "train"): 40,
        ("rare_classes", "train"): 1, ("unseen_classes", "evaluation"): 1,
        ("dropped", "train"): 143,
    }
    assert metrics.quality_series(None) == {} and metrics.quality_series({"summary": "x", "findings": 2}) == {}


def test_the_gauge_follows_the_status_until_the_finetunejob_is_deleted():
    quality = dataset_quality(QUALITY)
    metrics.record("uid-q", None, "Pending", None, 0, job=("ml", "clf"), quality=None)
    assert _quality_series() == {}
    metrics.record("uid-q", "Pending", "Queued", None, 0, job=("ml", "clf"), quality=quality)
    try:
        series = _quality_series()
        assert len(series) == 16
        assert series[("ml", "clf", "leakage_exact", "test")] == 80
        assert series[("ml", "clf", "pii_secret", "train")] == 2
        # no class name and no summary in a label: the labels are the check and the split only
        assert {labels[2] for labels in series} <= {
            "duplicates", "leakage_exact", "leakage_near", "pii_email", "pii_phone", "pii_card", "pii_secret",
            "label_conflicts", "label_suspected", "rare_classes", "unseen_classes", "dropped"}
        metrics.record("uid-q", "Queued", "Succeeded", None, 0, job=("ml", "clf"),
                       quality={"duplicates": {"train": 1}})
        assert _quality_series() == {("ml", "clf", "duplicates", "train"): 1}  # no stale series
    finally:
        metrics.forget("uid-q")
    assert _quality_series() == {}
