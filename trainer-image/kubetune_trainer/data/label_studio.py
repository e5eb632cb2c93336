"""Label Studio exports as plain classification records ({"text" or "image": ..., "label": ...}).

Two export formats are read, as Label Studio writes them (a JSON array; JSONL works too):

* JSON: one object per task, {"id", "data": {"text": ...}, "annotations": [{"result": [{"type": "choices",
  "from_name": ..., "value": {"choices": ["Label"]}}], "was_cancelled": false, ...}], ...}.
* JSON-MIN: one flat object per annotation, {"id", "text": ..., "<from_name>": "Label" (or {"choices": [...]}
  when several were chosen), "annotator", "annotation_id", "created_at", "updated_at", "lead_time"}; a task
  annotated twice appears twice, with the same "id".

A task becomes one record with one label. A task nobody annotated, or whose annotations were all cancelled
(skipped), is left out and counted: Label Studio's default export holds them. What cannot be trained on is refused
with the task id rather than guessed at: annotators who disagree, several choices in one annotation (multi-label),
annotations with no Choices result, and an export with no annotated task at all. An annotation marked ground truth
settles a disagreement.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

from ..errors import DatasetError
from .formats import RecordError
from .records import Record

# The keys of a JSON-MIN record that describe its annotation rather than the task's data or the annotation result.
JSON_MIN_FIELDS = frozenset({"id", "annotator", "annotation_id", "created_at", "updated_at", "lead_time",
                             "agreement", "history", "was_cancelled", "ground_truth", "draft_id", "project"})
EXPORT_HINT = "export the project from Label Studio as JSON or JSON-MIN"
RESOLVE_HINT = ("resolve it in Label Studio (delete or fix an annotation, or mark one as ground truth) and export "
                "again")


def is_export(value: dict) -> bool:
    """Whether a record is a task of a Label Studio JSON export (annotations, or data + id) or a JSON-MIN one
    (id + annotator or annotation_id)."""
    return ("annotations" in value or "completions" in value or ("data" in value and "id" in value)
            or ("id" in value and ("annotation_id" in value or "annotator" in value)))


def is_json_min(value: dict) -> bool:
    return is_export(value) and not ("annotations" in value or "completions" in value or "data" in value)


class Tasks(NamedTuple):
    records: list[Record]  # one plain record per annotated task
    skipped: list[Any]  # the ids of the tasks left out: no annotation, or every one cancelled

    def warning(self) -> str | None:
        """The data report's line for the skipped tasks, if any."""
        if not self.skipped:
            return None
        listed = ", ".join(map(str, self.skipped[:10])) + (", ..." if len(self.skipped) > 10 else "")
        return (f"{len(self.skipped)} tasks skipped in Label Studio, not trained (no annotation, or every "
                f"annotation cancelled): {listed}")


def plain_records(records: Iterable[Record], keys: Sequence[str]) -> Tasks:
    """One plain record per annotated task, at the file and line of the task's (first) record, in the export's
    order, and the tasks left out (nobody annotated them, or every annotation was cancelled).

    `keys` are the data fields kept, the first one required ("text", or "image"); "label" is the chosen class.
    JSON-MIN records are grouped by task id, so a task's annotations are compared wherever they are in the split.
    Raises DatasetError (file, line, task id) for a task that does not give one label, and for a split where no
    task is annotated."""
    order: list[tuple[Record, list[dict] | None]] = []  # (first record, JSON-MIN group) per task
    groups: dict[tuple[str, Any], list[dict]] = {}
    for record in records:
        value = record.value
        if not is_export(value):
            keys_found = ", ".join(sorted(value)) or "none"
            raise DatasetError(record.file, record.line, f"not a Label Studio task (keys: {keys_found}); expected "
                               "id, data and annotations (JSON export) or id and annotator (JSON-MIN)", EXPORT_HINT)
        if not is_json_min(value):
            order.append((record, None))
            continue
        group_key = (record.file, _hashable(value["id"]))
        if group_key not in groups:
            groups[group_key] = []
            order.append((record, groups[group_key]))
        groups[group_key].append(value)
    plain, skipped = [], []
    for record, group in order:
        try:
            value = from_json_min(group, keys) if group is not None else from_task(record.value, keys)
        except RecordError as e:
            raise DatasetError(record.file, record.line, e.problem, e.hint) from None
        if value is None:
            skipped.append(record.value.get("id"))
        else:
            plain.append(Record(record.line, value, record.file))
    if order and not plain:
        first = order[0][0]
        raise DatasetError(first.file, first.line, f"no task of the Label Studio export is annotated ({len(order)} "
                           "tasks, none with an annotation that was not cancelled)",
                           "annotate the tasks in Label Studio and export again")
    return Tasks(plain, skipped)


def from_task(task: dict, keys: Sequence[str]) -> dict | None:
    """A JSON-export task as {keys[0]: ..., ..., "label": ...}; None for a task without an annotation that was
    not cancelled; RecordError naming the task otherwise."""
    who = _task(task.get("id"))
    data = task.get("data")
    if not isinstance(data, dict):
        raise RecordError(f"{who} has no data object", EXPORT_HINT)
    if keys[0] not in data and len(data) == 1:  # the config's only $variable, whatever it is called
        data = {keys[0]: next(iter(data.values()))}
    value = _inputs(data, keys, who)
    annotations = task.get("annotations", task.get("completions")) or []
    if not isinstance(annotations, list):
        raise RecordError(f"{who}: annotations is not an array", EXPORT_HINT)
    kept = [a for a in annotations if isinstance(a, dict) and not (a.get("was_cancelled") or a.get("skipped"))]
    if not kept:
        return None
    truth = [a for a in kept if a.get("ground_truth")]
    votes = [(_annotation_label(a, who), _annotation(a.get("id"), _annotator(a.get("completed_by"))))
             for a in truth or kept]
    return {**value, "label": _agreed(votes, who)}


def from_json_min(records: list[dict], keys: Sequence[str]) -> dict | None:
    """One task's JSON-MIN records (one per annotation) as {keys[0]: ..., ..., "label": ...}; None for a task
    written without an annotation."""
    who = _task(records[0].get("id"))
    value = _inputs(records[0], keys, who)
    votes = []
    for record in records:
        if record.get("annotation_id") is None:
            continue  # the task without its annotation: Label Studio writes unannotated tasks like this
        fields = [k for k in record if k not in JSON_MIN_FIELDS and k not in keys]
        if len(fields) > 1:  # a data field beside the result, or several results: prefer {"choices": [...]}
            fields = [k for k in fields if isinstance(record[k], dict) and "choices" in record[k]] or fields
        if not fields:
            raise RecordError(f"{who}, {_annotation(record.get('annotation_id'))}: no choices result",
                              "classification reads the result of a Choices tag")
        if len(fields) > 1:
            raise RecordError(f"{who}: cannot tell which field holds the choice ({', '.join(sorted(fields))})",
                              "export as JSON instead of JSON-MIN, or leave the other data fields out")
        choices = _choices(record[fields[0]])
        if choices is None:
            raise RecordError(f"{who}: field {fields[0]!r} is not a choice", "export as JSON instead of JSON-MIN")
        where = _annotation(record.get("annotation_id"), _annotator(record.get("annotator")))
        votes.append((_single(choices, f"{who}, {where}"), where))
    if not votes:
        return None
    return {**value, "label": _agreed(votes, who)}


def image_reference(url: str) -> str:
    """An image as Label Studio refers to it, as a path or URI: local storage's "/data/local-files/?d=<path>" is
    <path>; anything else (s3://, https://, /data/upload/...) is returned as it is."""
    parts = urlsplit(url)
    if parts.path.rstrip("/").endswith("/data/local-files"):
        found = parse_qs(parts.query).get("d")
        if found:
            return found[0]
    return url


def _annotation_label(annotation: dict, who: str) -> str:
    where = f"{who}, {_annotation(annotation.get('id'), _annotator(annotation.get('completed_by')))}"
    results = annotation.get("result") or []
    choices = [r for r in results if isinstance(r, dict) and (r.get("type") == "choices"
                                                             or "choices" in (r.get("value") or {}))]
    if not choices:
        kinds = sorted({str(r.get("type")) for r in results if isinstance(r, dict)})
        found = f" (it has {', '.join(kinds)})" if kinds else " (its result is empty)"
        raise RecordError(f"{where}: no choices result{found}",
                          "classification reads the result of a Choices tag, <Choices name=... toName=...>")
    fields = sorted({str(r.get("from_name")) for r in choices})
    if len(fields) > 1:
        raise RecordError(f"{where}: choices for several fields ({', '.join(fields)})",
                          "use one Choices tag for the label, or export the tasks of one field")
    picked = [c for r in choices for c in (_choices(r.get("value")) or [])]
    return _single(picked, where)


def _choices(value: Any) -> list[str] | None:
    """The chosen labels of a result value: "A" (JSON-MIN, one choice), {"choices": [...]}, or a list of those."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and isinstance(value.get("choices"), list):
        return [c for c in value["choices"] if isinstance(c, str)]
    if isinstance(value, list):
        found = [_choices(v) for v in value]
        return None if any(f is None for f in found) else [c for f in found for c in f]
    return None


def _single(choices: list[str], where: str) -> str:
    if not choices:
        raise RecordError(f"{where}: nothing chosen", "choose a label, or cancel (skip) the annotation")
    if len(set(choices)) > 1:
        listed = ", ".join(map(repr, dict.fromkeys(choices)))
        raise RecordError(f"{where}: several choices in one annotation ({listed}); multi-label classification is "
                          "not supported", 'make the Choices tag single-choice (choice="single") and pick one label')
    return choices[0]


def _agreed(votes: list[tuple[str, str]], who: str) -> str:
    labels = dict.fromkeys(label for label, _ in votes)
    if len(labels) == 1:
        return next(iter(labels))
    listed = "; ".join(f"{label!r} ({', '.join(w for lab, w in votes if lab == label)})" for label in labels)
    raise RecordError(f"{who}: the annotators chose different labels: {listed}", RESOLVE_HINT)


def _inputs(data: dict, keys: Sequence[str], who: str) -> dict:
    if keys[0] not in data:
        fields = ", ".join(sorted(k for k in data if k not in JSON_MIN_FIELDS)) or "none"
        raise RecordError(f"{who}: the task data has no {keys[0]!r} field (it has {fields})",
                          f"name the data field {keys[0]} (the $variable of the labeling config's "
                          f"{'Image' if keys[0] == 'image' else 'Text'} tag)")
    return {k: data[k] for k in keys if k in data}


def _annotator(who: Any) -> str:
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return "" if who is None or who == "" else str(who)


def _annotation(annotation_id: Any, annotator: str = "") -> str:
    name = f"annotation {annotation_id}" if annotation_id is not None else "an annotation"
    return f"{name} by {annotator}" if annotator else name


def _task(task_id: Any) -> str:
    return f"Label Studio task {task_id}" if task_id is not None else "a Label Studio task without an id"


def _hashable(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool) or value is None else repr(value)
