"""Label Studio exports (JSON and JSON-MIN) read as classification records, and what cannot be trained on."""

from __future__ import annotations

import json

import pytest
from kubetune_api import EXIT_DATA_INVALID
from kubetune_trainer.data.label_studio import image_reference, is_export, plain_records
from kubetune_trainer.data.records import Record, load_records
from kubetune_trainer.errors import DatasetError

KEYS = ("text", "text_pair")


def result(*choices: str, from_name: str = "sentiment", kind: str = "choices") -> dict:
    return {"id": "r1", "from_name": from_name, "to_name": "text", "type": kind, "origin": "manual",
            "value": {"choices": list(choices)} if kind == "choices" else {"start": 0, "end": 4, "labels": ["X"]}}


def annotation(annotation_id: int, *results: dict, by: int = 1, **flags) -> dict:
    return {"id": annotation_id, "completed_by": by, "result": list(results), "was_cancelled": False,
            "ground_truth": False, "created_at": "2024-05-01T10:00:00Z", "lead_time": 3.2, "task": 1, **flags}


def task(task_id: int, text: str, *annotations: dict, **data) -> dict:
    """A task as Label Studio's JSON export writes it."""
    return {"id": task_id, "data": {"text": text, **data}, "annotations": list(annotations), "predictions": [],
            "project": 3, "inner_id": task_id, "total_annotations": len(annotations)}


def json_min(task_id: int, text: str, choice, annotation_id: int | None = 10, annotator="ann@example.com") -> dict:
    """A record as Label Studio's JSON-MIN export writes it (one per annotation)."""
    record = {"text": text, "id": task_id, "annotator": annotator, "annotation_id": annotation_id,
              "created_at": "2024-05-01T10:00:00Z", "updated_at": "2024-05-01T10:00:00Z", "lead_time": 2.5}
    if choice is not None:
        record["sentiment"] = choice
    return record


def plain(values: list[dict], keys=KEYS) -> list[Record]:
    return plain_records([Record(i + 1, v, "s3://b/export.json") for i, v in enumerate(values)], keys).records


def refused(values: list[dict], line: int, *words: str, keys=KEYS) -> DatasetError:
    with pytest.raises(DatasetError) as e:
        plain(values, keys)
    error = e.value
    assert (error.exit_code, error.file, error.line) == (EXIT_DATA_INVALID, "s3://b/export.json", line)
    for word in words:
        assert word in error.problem, error.problem
    assert error.hint
    return error


def test_json_export(tmp_path):
    export = [
        task(1, "Great product", annotation(11, result("Positive"))),
        task(2, "Broke in a day", annotation(12, result("Negative"), by=2), annotation(13, result("Negative"))),
        task(3, "Fine", annotation(14, result("Positive"), was_cancelled=True), annotation(15, result("Neutral")),
             source="web"),
        {"id": 4, "data": {"review": "Only field, another name"}, "annotations": [annotation(16, result("Neutral"))]},
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export, indent=2))  # Label Studio writes one JSON array
    records = plain_records(load_records(path, "s3://b/export.json"), KEYS).records
    assert [(r.line, r.value) for r in records] == [
        (1, {"text": "Great product", "label": "Positive"}),
        (2, {"text": "Broke in a day", "label": "Negative"}),  # two annotators, one label
        (3, {"text": "Fine", "label": "Neutral"}),  # the cancelled annotation does not count
        (4, {"text": "Only field, another name", "label": "Neutral"}),  # the task's only data field
    ]
    assert all(r.file == "s3://b/export.json" for r in records)


def test_json_min_export_groups_a_tasks_annotations():
    records = plain([
        json_min(1, "Great product", "Positive"),
        json_min(2, "Broke in a day", "Negative", annotation_id=20),
        json_min(1, "Great product", "Positive", annotation_id=11, annotator=7),
        json_min(3, "It is a phone", {"choices": ["Neutral"]}),
    ])
    assert [(r.line, r.value) for r in records] == [
        (1, {"text": "Great product", "label": "Positive"}),
        (2, {"text": "Broke in a day", "label": "Negative"}),
        (4, {"text": "It is a phone", "label": "Neutral"}),
    ]


def test_ground_truth_settles_a_disagreement():
    records = plain([task(1, "Meh", annotation(11, result("Positive")),
                          annotation(12, result("Neutral"), ground_truth=True))])
    assert records[0].value["label"] == "Neutral"


def test_tasks_nobody_annotated_are_skipped_and_counted():
    """Label Studio's default export holds the tasks nobody annotated and those whose annotations were all
    cancelled (skipped): they are left out, and the data report says which."""
    tasks = plain_records([Record(i + 1, v, "s3://b/export.json") for i, v in enumerate([
        task(1, "a", annotation(1, result("A"))), task(7, "Unlabelled"),
        task(8, "Skipped", annotation(2, result("A"), was_cancelled=True)),
        task(9, "b", annotation(3, result("B"), was_cancelled=True), annotation(4, result("B"))),
    ])], KEYS)
    assert [(r.line, r.value["label"]) for r in tasks.records] == [(1, "A"), (4, "B")]
    assert tasks.skipped == [7, 8]
    assert tasks.warning() == ("2 tasks skipped in Label Studio, not trained (no annotation, or every annotation "
                               "cancelled): 7, 8")
    assert plain_records([Record(1, task(1, "a", annotation(1, result("A"))), "f")], KEYS).warning() is None
    minimal = plain_records([Record(1, json_min(9, "Unlabelled", None, annotation_id=None), "f"),
                             Record(2, json_min(2, "b", "B"), "f")], KEYS)
    assert ([r.value["label"] for r in minimal.records], minimal.skipped) == (["B"], [9])


def test_an_export_without_any_annotated_task_is_refused():
    error = refused([task(7, "Unlabelled"), task(8, "Skipped", annotation(1, result("A"), was_cancelled=True))], 1,
                    "no task of the Label Studio export is annotated (2 tasks")
    assert "annotate the tasks" in error.hint
    refused([json_min(9, "Unlabelled", None, annotation_id=None)], 1, "no task of the Label Studio export")


def test_conflicting_annotations_name_the_labels():
    error = refused([task(5, "Hmm", annotation(51, result("Positive"), by=1), annotation(52, result("Negative"),
                                                                                         by=2))],
                    1, "Label Studio task 5", "different labels", "'Positive' (annotation 51 by 1)",
                    "'Negative' (annotation 52 by 2)")
    assert "ground truth" in error.hint
    refused([json_min(6, "Hmm", "Positive", annotation_id=61, annotator="a@x.io"), json_min(2, "b", "B"),
             json_min(6, "Hmm", "Negative", annotation_id=62, annotator="b@x.io")], 1, "Label Studio task 6",
            "'Positive' (annotation 61 by a@x.io)", "'Negative' (annotation 62 by b@x.io)")


def test_several_choices_are_multi_label():
    error = refused([task(3, "Both", annotation(31, result("Positive", "Negative")))], 1, "Label Studio task 3",
                    "several choices in one annotation ('Positive', 'Negative')", "multi-label")
    assert 'choice="single"' in error.hint
    refused([json_min(4, "Both", {"choices": ["Positive", "Negative"]})], 1, "Label Studio task 4",
            "several choices")


def test_no_choices_result():
    refused([task(2, "Spans", annotation(21, result(kind="labels")))], 1, "Label Studio task 2", "annotation 21",
            "no choices result (it has labels)")
    refused([task(2, "Empty", annotation(21))], 1, "no choices result (its result is empty)")
    refused([task(2, "Two tags", annotation(21, result("A"), result("B", from_name="topic")))], 1,
            "choices for several fields (sentiment, topic)")


def test_data_without_the_input_field():
    refused([{"id": 3, "data": {"review": "x", "stars": 2}, "annotations": [annotation(1, result("A"))]}], 1,
            "Label Studio task 3", "no 'text' field (it has review, stars)")
    refused([{"id": 3, "data": {"photo": "s3://b/x.png", "stars": 2}, "annotations": [annotation(1, result("A"))]}],
            1, "no 'image' field", keys=("image",))


def test_not_a_task():
    refused([task(1, "a", annotation(1, result("A"))), {"text": "plain", "label": "A"}], 2,
            "not a Label Studio task (keys: label, text)")


def test_detection_and_image_reference():
    assert is_export(task(1, "a")) and is_export(json_min(1, "a", "A"))
    assert not is_export({"text": "a", "label": "A"}) and not is_export({"text": "a", "label": "A", "id": 3})
    assert plain([{"id": 1, "data": {"image": "/data/local-files/?d=cats/1.jpg"},
                   "annotations": [annotation(1, result("cat"))]}], ("image",))[0].value == {
        "image": "/data/local-files/?d=cats/1.jpg", "label": "cat"}
    assert image_reference("/data/local-files/?d=cats/1.jpg") == "cats/1.jpg"
    assert image_reference("http://ls:8080/data/local-files/?d=a%20b/2.png") == "a b/2.png"
    assert image_reference("s3://bucket/cats/1.jpg") == "s3://bucket/cats/1.jpg"
