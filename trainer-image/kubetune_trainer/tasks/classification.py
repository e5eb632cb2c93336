"""What the text and image classification tasks share: class names, (soft) targets, the loss, the metrics and
the head's config.

A record's "label" is a class name, or for probabilistic labels (weak supervision, Snorkel style) an object from
class name to probability, e.g. {"spam": 0.8, "ham": 0.2}. The class names are dataset.labels when set, else the
training split's labels sorted, and their order is the order of the model's outputs (id2label).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from kubetune_api import DataFormat, QualityAction

from ..data import DatasetReport, label_studio
from ..data.formats import RecordError, kind_of, with_fields
from ..data.records import Record, beyond_limits, class_names, load_records
from ..data.stream import where
from ..data.validate import check_min_samples
from ..errors import ConfigError, DatasetError
from ..evaluate import Evaluation
from ..modeling import quiet_transformers
from .base import Task

if TYPE_CHECKING:
    import torch

IGNORE = -100  # the target of a blank row
SUM_TOLERANCE = 1e-3  # how far from 1 the probabilities of a soft label may sum
LABELS_LISTED = 20  # known labels named in an error
LABEL_HINT = 'give each record a class name, e.g. "label": "spam", or class probabilities {"spam": 0.8, "ham": 0.2}'


@dataclass
class ClassExample:
    """One labelled sample: `inputs` is the task's (token ids, or an image reference), `target` a class index or,
    for probabilistic labels, one probability per class."""

    inputs: Any
    target: int | list[float]


class ClassificationTask(Task):
    unit = "sample"
    headline = "accuracy"
    labels: list[str]  # class names in the order of the model's outputs, set by resolve_labels
    auto_class: ClassVar[str]  # the task's transformers auto class, e.g. "AutoModelForSequenceClassification"

    def __init__(self, config, model_dir: Path, storage=None):
        super().__init__(config, model_dir, storage)
        self._set_labels(list(config.dataset.labels or []))
        self._checked: dict[str, tuple[set, dict]] = {}  # split -> (records kept, quality findings)
        self._train_counts: dict[str, int] = {}  # records per class in train, as the quality checks count them

    # -- labels and targets -------------------------------------------------------------------------------

    def resolve_labels(self, seen: Iterable[str], classes: list[str] | None = None) -> list[str]:
        """dataset.labels when set, else the classes the file names (a ClassLabel's), else the sorted labels seen
        in the training split; kept as self.labels. Labels that are all integers ("0", "1", "10") sort as
        numbers."""
        declared = self.config.dataset.labels or classes
        if declared:
            twice = sorted({label for label in declared if declared.count(label) > 1})
            if twice:
                raise ConfigError(f"dataset.labels lists {', '.join(map(repr, twice))} more than once: "
                                  "each class name once, in the order of the model's outputs")
            labels = list(declared)
        else:
            labels = sorted(set(seen), key=_label_order)
        self._set_labels(labels)
        return labels

    def _set_labels(self, labels: list[str]) -> None:
        self.labels = labels
        self._index = {label: i for i, label in enumerate(labels)}

    def target(self, label: Any) -> int | list[float]:
        """A record's label (a class name, or a map from class name to probability) as a target; RecordError
        for an unknown class or probabilities that do not sum to 1."""
        if isinstance(label, dict):
            return self._soft_target(label)
        name = label_name(label)
        if name not in self._index:
            raise RecordError(f"unknown label {name!r}; the known labels are {self._known()}", self._unknown_hint())
        return self._index[name]

    def _soft_target(self, label: dict) -> list[float]:
        hint = 'give one probability per class, summing to 1, e.g. {"spam": 0.8, "ham": 0.2}'
        if not label:
            raise RecordError("label is an empty object: no class probabilities", hint)
        probabilities = [0.0] * len(self.labels)
        for name, p in label.items():
            if name not in self._index:
                raise RecordError(f"unknown label {name!r} in the label probabilities; the known labels are "
                                  f"{self._known()}", self._unknown_hint())
            if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p):
                raise RecordError(f"the probability of {name!r} is {kind_of(p) if not isinstance(p, float) else p}, "
                                  "expected a number", hint)
            if p < 0:
                raise RecordError(f"the probability of {name!r} is negative ({p})", hint)
            probabilities[self._index[name]] = float(p)
        total = sum(probabilities)
        if abs(total - 1) > SUM_TOLERANCE:
            raise RecordError(f"the label probabilities sum to {total:.6g}, not 1", hint)
        return [p / total for p in probabilities]

    def _known(self) -> str:
        listed = ", ".join(map(repr, self.labels[:LABELS_LISTED]))
        return listed + (f", ... ({len(self.labels)} in all)" if len(self.labels) > LABELS_LISTED else "")

    def _unknown_hint(self) -> str:
        if self.config.dataset.labels:
            return "add it to dataset.labels, or fix the record"
        return "add records of it to the training split, or list every class in dataset.labels"

    def check_labels(self, split: str, name: str, records: Sequence[Record],
                     classes: list[str] | None = None) -> list[int | list[float]]:
        """The targets of a split's records (their "label"). The train split resolves the class names first
        (resolve_labels; `classes`: the file's own, in order) and must hold at least 2 classes; DatasetError names
        the file and line of a bad label."""
        if split == "train":
            seen: list[str] = []
            for record in records:
                with at_record(record, name):
                    seen += label_names(record_label(record.value))
            self.resolve_labels(seen, classes)
        targets = []
        for record in records:
            with at_record(record, name):
                targets.append(self.target(record_label(record.value)))
        if split == "train" and records:
            present = {self.labels[c] for t in targets for c in _classes(t)}
            if len(present) < 2:
                raise DatasetError(name, 0, f"the train split has only one class ({', '.join(map(repr, present))}); "
                                   "classification needs at least 2", "add records of the other classes")
        return targets

    def class_report(self, targets: Sequence[int | list[float]]) -> tuple[dict[str, int], list[str]]:
        """Records per class (a soft label counts for its most likely class), and a warning naming the classes
        without any record."""
        counts = dict.fromkeys(self.labels, 0)
        for t in targets:
            counts[self.labels[_argmax(t)]] += 1
        empty = [label for label, n in counts.items() if n == 0]
        warnings = [f"{len(empty)} of {len(counts)} classes have no record: {', '.join(map(repr, empty[:10]))}"
                    + (", ..." if len(empty) > 10 else "")] if empty else []
        return counts, warnings

    def read_split(self, path: Path, uri: str, fmt: DataFormat, keys: Sequence[str]) -> Split:
        """A split's records as plain {keys..., "label"} records, Label Studio exports converted, with the format
        found (`fmt` auto: detected per record, all records alike), and what the data report says about them.
        keys[0] is the required input ("text" or "image"). Integer labels become the class names a Hugging Face
        export keeps in its Parquet metadata (ClassLabel), in their order."""
        fmt = DataFormat(fmt)
        fields = self.config.dataset.fields
        records = [Record(r.line, with_fields(r.value, fields), r.file) for r in load_records(path, uri)]
        first: tuple[Record, DataFormat] | None = None
        for record in records:
            with at_record(record, uri):
                found = record_format(record.value, keys[0], fmt)
                if first and found != first[1]:
                    raise RecordError(f"record is {found.value} but the first record ({where(first[0], uri)}) "
                                      f"is {first[1].value}", "use one format for every record")
            first = first or (record, found)
        fmt = first[1] if first else (DataFormat.classification if fmt == DataFormat.auto else fmt)
        if fmt == DataFormat.label_studio:
            tasks = label_studio.plain_records(records, keys)
            return Split(fmt, tasks.records, [tasks.warning()] if tasks.skipped else [])
        names = class_names(path)
        if names:
            return Split(fmt, [_named(record, names, uri) for record in records], [], names)
        integers = records and all(isinstance(r.value.get("label"), int) for r in records)
        note = ("the labels are integers and the file names no classes (no ClassLabel names in its metadata): the "
                "published model's classes are the integers; write class names as labels to name them")
        return Split(fmt, records, [note] if integers else [])

    def checked(self, split: str, uri: str, read: Split) -> Split:
        """The split less the records the data-quality checks drop (task.quality, set by prepare.validate_splits),
        with what they found: repeats, copies of evaluation records and personal data (quality/checks.py) and,
        for train, the labels: conflicts, counts, rare classes and suspected errors (quality/labels.py). Done once
        per split and process: validate and examples share it."""
        if self.quality is None:
            return read
        done = self._checked.get(split)
        if done is None:
            done = self._check(split, uri, read)
            self._checked[split] = done
        kept, doc = done
        return read._replace(records=[r for r in read.records if (r.file, r.line) in kept], quality=doc)

    def _check(self, split: str, uri: str, read: Split) -> tuple[set, dict]:
        from ..quality import labels as label_checks
        from ..quality.checks import add_dropped, refuse
        from ..quality.normalize import fingerprint, normalize, record_text

        checks = self.quality.checks(split, uri)
        probe = checks.prober(DataFormat.classification)
        records = read.records
        kept = [i for i, r in enumerate(records) if checks.keep(r.line, probe(r.value))]
        doc = checks.finish()
        names = [_main_label(r.value) for r in records]
        if split != "train":
            counts = label_checks.class_counts([names[i] for i in kept if names[i] is not None])
            doc["unseenClasses"] = label_checks.unseen_classes(self._train_counts, counts)
            return {(records[i].file, records[i].line) for i in kept}, doc
        # The train split's labels: conflicts, counts, rare classes and (text) suspected errors; their policies.
        policy, lines = self.quality.policy, [r.line for r in records]
        texts = [normalize(record_text(r.value, DataFormat.classification)) for r in records]
        seed = self.config.hyperparameters.seed

        def suspect(judged: list[int]) -> list[int]:
            return label_checks.suspected_label_errors([texts[i] for i in judged], [names[i] for i in judged],
                                                       seed=seed)

        doc["labels"], found = label_checks.train_labels(
            texts, names, lines, kept, policy, suspect if isinstance(self, TextClassifier) else None)
        self._train_counts = doc["labels"]["classes"]
        drop: set[int] = set()
        for check, indices in found.items():
            refuse(uri, policy, check, [lines[i] for i in indices], label_checks.FOUND[check], "fix their labels")
            if getattr(policy, check) == QualityAction.drop:
                drop |= set(indices)
        drop = drop & set(kept)
        add_dropped(doc["dropped"], {lines[i]: f"{fingerprint(texts[i]):016x}" for i in drop})
        return {(records[i].file, records[i].line) for i in kept if i not in drop}, doc

    def report(self, uri: str, fmt: DataFormat, samples: int, min_samples: int, split: str) -> DatasetReport:
        """An empty report for a split, after checking it has at least min_samples records."""
        check_min_samples(uri, samples, min_samples, split)
        return DatasetReport(uri, fmt, samples, 0, 0, 0, 0)

    # -- batches ------------------------------------------------------------------------------------------

    def collate_targets(self, examples: list[ClassExample]) -> torch.Tensor:
        """batch["labels"]: LongTensor [B] of class indices, or FloatTensor [B, C] when any target is soft."""
        import torch  # torch: not for kubetune validate

        targets = [e.target for e in examples]
        if not any(isinstance(t, list) for t in targets):
            return torch.tensor(targets, dtype=torch.long)
        rows = torch.zeros(len(targets), len(self.labels))
        for i, t in enumerate(targets):
            if isinstance(t, list):
                rows[i] = torch.tensor(t)
            elif t != IGNORE:
                rows[i, t] = 1.0
        return rows

    @staticmethod
    def blank_targets(labels: torch.Tensor) -> torch.Tensor:
        """Targets like `labels` that score nothing: IGNORE indices, or all-zero probabilities."""
        import torch  # torch: not for kubetune validate

        return torch.zeros_like(labels) if labels.is_floating_point() else torch.full_like(labels, IGNORE)

    @staticmethod
    def labelled(labels: torch.Tensor) -> torch.Tensor:
        """Which rows of batch["labels"] are labelled (not blank)."""
        return labels.sum(-1) > 0 if labels.is_floating_point() else labels != IGNORE

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(self.labelled(batch["labels"]).sum())

    # -- model --------------------------------------------------------------------------------------------

    @staticmethod
    def logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's class scores, in fp32. "labels" is held back: given it, a transformers model computes a
        loss of its own (binary cross-entropy for float labels)."""
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()

    def loss(self, model, batch):
        """Summed cross-entropy (soft-target where the targets are probabilities) over non-blank rows, and their
        number."""
        import torch.nn.functional as F  # torch: not for kubetune validate

        labels = batch["labels"]
        logits = self.logits(model, batch)
        if labels.is_floating_point():  # an all-zero (blank) row adds 0
            loss = F.cross_entropy(logits, labels.to(logits.dtype), reduction="sum")
        else:
            loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
        return loss, self.labelled(labels).sum()

    def evaluation(self, split: str) -> Evaluation:
        """Loss, accuracy, macro and weighted F1, per-class precision/recall/F1 and the confusion matrix
        (scikit-learn), over every process's rows (gathered)."""
        return ClassificationEvaluation(self.labels)

    def head_config(self) -> dict[str, Any]:
        """from_pretrained keyword arguments for the head: num_labels, id2label, label2id."""
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {label: i for i, label in enumerate(self.labels)}}

    def model_kwargs(self) -> dict[str, Any]:
        """from_pretrained keyword arguments of the task's model, in training and merging alike: the head's
        (head_config) and trust_remote_code."""
        return {**self.head_config(), **self.remote_code}

    def load_base(self, dtype: torch.dtype):
        """The base under a head for these labels, initialised anew (a head of another size is replaced): the
        adapter's modules_to_save brings the trained one."""
        import transformers

        with quiet_transformers():
            return getattr(transformers, self.auto_class).from_pretrained(
                self.model_dir, dtype=dtype, ignore_mismatched_sizes=True, **self.model_kwargs(),
                **self.weight_formats)

    def describe(self) -> dict[str, Any]:
        return {"task": self.name.value, "labels": self.labels}

    def save(self, model, directory: Path) -> None:
        """The processor, and the model's config (carrying id2label/label2id) beside a LoRA adapter, so that
        AutoConfig.from_pretrained(directory) knows the classes. A fully fine-tuned model's save_pretrained writes
        its config.json itself."""
        self.processor.save_pretrained(directory)
        while hasattr(model, "module"):  # DistributedDataParallel
            model = model.module
        if hasattr(model, "peft_config"):
            base = model.get_base_model()
            config = copy.deepcopy(base.config)
            config.architectures = [type(base).__name__]
            config.save_pretrained(directory)


class ClassificationEvaluation(Evaluation):
    """Per labelled row: the true class (the most likely one of a soft target), the predicted class (argmax) and
    the loss; metrics over every process's rows."""

    def __init__(self, labels: list[str]):
        self.labels = labels
        self.rows: list[tuple[int, int, float]] = []

    def add(self, model, batch: dict[str, torch.Tensor]) -> None:
        import torch.nn.functional as F  # torch: not for kubetune validate

        labels = batch["labels"]
        logits = ClassificationTask.logits(model, batch)
        if labels.is_floating_point():
            losses = F.cross_entropy(logits, labels.to(logits.dtype), reduction="none")
            true = labels.argmax(-1)
        else:
            losses = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
            true = labels
        keep = ClassificationTask.labelled(labels)
        self.rows += zip(true[keep].tolist(), logits.argmax(-1)[keep].tolist(), losses[keep].tolist(), strict=True)

    def result(self, accelerator) -> dict[str, Any]:
        from accelerate.utils import gather_object

        rows = gather_object(self.rows) if accelerator.num_processes > 1 else self.rows
        return classification_metrics([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], self.labels)


def classification_metrics(true: Sequence[int], predicted: Sequence[int], losses: Sequence[float],
                           labels: Sequence[str]) -> dict[str, Any]:
    """The metrics of a split from its rows' true and predicted class indices and losses, by scikit-learn.

    Averages (macro, weighted) are over the classes present in `true` or `predicted` (scikit-learn's default); a
    division by zero counts 0. "per_class" lists every class; the confusion matrix has a row per true class and a
    column per predicted class, both in the order of `labels`."""
    n = len(true)
    if n == 0:
        nan = float("nan")
        return {"loss": nan, "accuracy": nan, "f1": nan, "f1_weighted": nan, "precision": nan, "recall": nan,
                "samples": 0}
    from sklearn import metrics

    every = list(range(len(labels)))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        true, predicted, labels=every, zero_division=0)
    return {
        "loss": math.fsum(losses) / n,
        "accuracy": float(metrics.accuracy_score(true, predicted)),
        "f1": float(metrics.f1_score(true, predicted, average="macro", zero_division=0)),
        "f1_weighted": float(metrics.f1_score(true, predicted, average="weighted", zero_division=0)),
        "precision": float(metrics.precision_score(true, predicted, average="macro", zero_division=0)),
        "recall": float(metrics.recall_score(true, predicted, average="macro", zero_division=0)),
        "per_class": {label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                              "support": int(support[i])} for i, label in enumerate(labels)},
        "confusion_matrix": {"labels": list(labels),
                             "matrix": metrics.confusion_matrix(true, predicted, labels=every).tolist()},
        "samples": n,
    }


def head_modules(model_dir: Path, auto_class, **config_kwargs) -> list[str]:
    """The modules of `auto_class`'s model on the folder that the checkpoint does not hold, to be trained in full
    beside LoRA (peft's modules_to_save): the classification head ("score" for Llama, "classifier" for BERT and
    ViT, "pre_classifier" and "classifier" for DistilBERT, and a BERT pooler an MLM checkpoint lacks). Each is the
    largest module all of whose weights are new; a head the checkpoint already has (a classifier fine-tuned
    further) is found as the top-level modules outside the base model. Built on the meta device: no weights load."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, **config_kwargs)
        with init_empty_weights():
            model = auto_class.from_config(config, trust_remote_code=config_kwargs.get("trust_remote_code", False))
    except (OSError, ValueError) as e:
        raise ConfigError(f"baseModel: no {auto_class.__name__.removeprefix('AutoModelFor')} model for the folder: "
                          f"{e}") from e
    prefix = model.base_model_prefix
    heads = [n for n, child in model.named_children() if n != prefix and any(True for _ in child.parameters())]
    names = [n for n, _ in model.named_parameters()]
    stored = checkpoint_keys(Path(model_dir))
    if stored and not any(k.startswith(prefix + ".") for k in stored):  # saved from the bare base model
        stored = {f"{prefix}.{k}" for k in stored}
    new = {n for n in names if n not in stored} if stored else set()
    if len(new) > len(names) // 2:
        new = set()  # renamed weights (an older checkpoint layout), not a new head: leave it to the heuristic
    for name in [n for n in names if n in new]:  # in the model's order
        parts = name.split(".")
        for end in range(1, len(parts)):
            module = ".".join(parts[:end])
            if all(n in new for n in names if n.startswith(module + ".")):
                if not any(module == h or module.startswith(h + ".") for h in heads):
                    heads.append(module)
                break
    return heads


def checkpoint_keys(model_dir: Path) -> set[str]:
    """The weight names in a model folder's safetensors files (read from their headers), or none if it has
    other weights."""
    import json

    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    keys: set[str] = set()
    for file in model_dir.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys.update(f.keys())
    return keys


def record_format(value: dict, key: str, fmt: DataFormat) -> DataFormat:
    """The format of one classification record: `fmt` when given (RecordError if the record does not fit it), or
    detected: a Label Studio task (JSON or JSON-MIN export), or {key, "label"} (classification)."""
    is_export = label_studio.is_export(value)
    if fmt == DataFormat.label_studio or (fmt == DataFormat.auto and is_export):
        if not is_export:
            raise RecordError(f"not a Label Studio task (keys: {', '.join(sorted(value)) or 'none'})",
                              "export the tasks as JSON or JSON-MIN, or set dataset.format classification")
        return DataFormat.label_studio
    if fmt not in (DataFormat.auto, DataFormat.classification):
        raise ValueError(f"classification records are classification or label-studio, not {fmt.value}")
    missing = [k for k in (key, "label") if k not in value]
    if missing:
        looks = "; the record looks like a Label Studio export" if is_export else ""
        problem = (f"missing field {', '.join(map(repr, missing))} required by format classification{looks}"
                   if fmt == DataFormat.classification else
                   f"unrecognized record keys ({', '.join(sorted(value)) or 'none'}); expected {key} + label "
                   "(classification) or a Label Studio export (id, data, annotations)")
        others = sorted(k for k in value if k not in (key, "label"))
        example = ", ".join(f"{k}: <your {'class' if k == 'label' else k} column>" for k in missing)
        mapping = (f"; or name your columns with dataset.fields, e.g. fields: {{{example}}} (the record's other "
                   f"keys: {', '.join(others)})") if others else ""
        raise RecordError(problem, f'write records as {{"{key}": ..., "label": ...}}{mapping}')
    return DataFormat.classification


class TextClassifier:
    """A classification task of texts: its suspected label errors come from a text model (quality/labels.py)."""


def _main_label(value: Any) -> str | None:
    """A record's class name, the most likely one of class probabilities; None for a label of another shape
    (the split's own checks name it)."""
    label = value.get("label") if isinstance(value, dict) else None
    if isinstance(label, dict):
        numbers = {k: v for k, v in label.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        return str(max(numbers, key=numbers.get)) if numbers else None
    try:
        return label_name(label)
    except RecordError:
        return None


def record_label(value: dict) -> Any:
    """A record's "label"; RecordError when it has none."""
    if "label" not in value:
        raise RecordError("missing field 'label'", LABEL_HINT)
    return value["label"]


def label_names(label: Any) -> list[str]:
    """The class names a label mentions (its keys for probabilities); RecordError for a label of another shape."""
    return list(label) if isinstance(label, dict) else [label_name(label)]


def label_name(label: Any) -> str:
    """A class name: a non-empty string, or an integer (as its decimal string)."""
    if isinstance(label, int) and not isinstance(label, bool):
        return str(label)
    if not isinstance(label, str):
        raise RecordError(f"field 'label' is {kind_of(label)}, expected a class name or class probabilities",
                          LABEL_HINT)
    if not label.strip():
        raise RecordError("field 'label' is empty", LABEL_HINT)
    return label


def _label_order(label: str) -> tuple:
    return (0, int(label), "") if re.fullmatch(r"-?[0-9]+", label) else (1, 0, label)


def _classes(target: int | list[float]) -> list[int]:
    return [i for i, p in enumerate(target) if p > 0] if isinstance(target, list) else [target]


def _argmax(target: int | list[float]) -> int:
    return max(range(len(target)), key=target.__getitem__) if isinstance(target, list) else target


class Split(NamedTuple):
    """A split's plain records as read_split returns them."""

    format: DataFormat
    records: list[Record]
    notes: list[str]  # for the data report's warnings: what was left out or could not be named
    classes: list[str] | None = None  # the class names the file keeps, in order (a ClassLabel's)
    quality: dict | None = None  # what the data-quality checks found (ClassificationTask.checked)


def _named(record: Record, names: list[str], uri: str) -> Record:
    """The record with its integer label replaced by the class name at that index."""
    label = record.value.get("label")
    if isinstance(label, bool) or not isinstance(label, int):
        return record
    if not 0 <= label < len(names):
        raise DatasetError(record.file or uri, record.line, f"label {label} is not a class of the file's ClassLabel "
                           f"({len(names)} classes: 0 to {len(names) - 1})", "re-export the dataset")
    return Record(record.line, {**record.value, "label": names[label]}, record.file)


@contextmanager
def at_record(record: Record, name: str) -> Iterator[None]:
    """A RecordError in the block becomes the DatasetError of the record's file and line; so do a RecursionError
    and a MemoryError (a record nested too deeply, or too large, to check)."""
    try:
        yield
    except RecordError as e:
        raise DatasetError(record.file or name, record.line, e.problem, e.hint) from None
    except (RecursionError, MemoryError) as e:
        raise beyond_limits(record.file or name, record.line, e) from None
