"""image-classification: a label per image, for vision models with an image-classification head (ViT, ConvNeXt,
ResNet, Swin, ...).

Records are {"image": ..., "label": ...} (JSONL, JSON, CSV or Parquet), a Label Studio export, or an image folder
(<prefix>/<label>/<file>). The CPU validation fetches and decodes every image, so a missing or corrupt image stops
the job before a GPU pod starts; examples keep only the images' local paths, decoded batch by batch in collate.
See docs/image-classification.md.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune_api import DataFormat, MethodType, QualityAction, TaskType

from ..data import DatasetReport, label_studio
from ..errors import ConfigError, DatasetError
from ..images import (
    REFERENCE_HINT,
    SPLIT_FOLDERS,
    ImageStore,
    Located,
    decode_problem,
    imagefolder_records,
    is_imagefolder,
    load_rgb,
    split_folders,
)
from ..modeling import load_model, quiet_transformers
from .base import register
from .classification import ClassExample, ClassificationTask, Split, at_record, head_modules

if TYPE_CHECKING:
    import torch

PROCESSOR_FILE = "preprocessor_config.json"
KEYS = ("image",)  # what a record holds beside its label


@register(TaskType.image_classification)
class ImageClassification(ClassificationTask):
    auto_class = "AutoModelForImageClassification"

    def __init__(self, config, model_dir: Path, storage=None):
        super().__init__(config, model_dir, storage)
        self._validated: dict[tuple[str, str], list[ClassExample]] = {}  # what validate() found, for examples()

    @property
    def image_cache(self) -> Path:
        return Path(self.config.work_dir) / self.config.job_name / "images"

    # -- data ---------------------------------------------------------------------------------------------

    def load_processor(self):
        from transformers import AutoImageProcessor

        if not (self.model_dir / PROCESSOR_FILE).is_file():
            raise ConfigError(f"baseModel: {self.config.base_model.uri} has no image processor ({PROCESSOR_FILE}); "
                              "task image-classification needs a vision model folder with one (save it with "
                              "image_processor.save_pretrained)")
        try:
            with quiet_transformers():  # without torchvision: "falling back to the PIL processor", which is fine
                self.processor = AutoImageProcessor.from_pretrained(self.model_dir, **self.remote_code)
        except (OSError, ValueError) as e:
            raise ConfigError(f"baseModel: cannot load the image processor of {self.config.base_model.uri}: {e}") \
                from e
        return self.processor

    def validate(self, split: str, path: Path, uri: str, fmt: DataFormat, min_samples: int) -> DatasetReport:
        """Every record's fields and label, then every image: it exists (fetched, or downloaded now) and decodes.
        The first bad one raises DatasetError naming the record's file and line (an image folder's image itself)."""
        fmt, rows, targets, notes = self._read(split, path, uri, fmt)
        report = self.report(uri, fmt, len(rows), min_samples, split)
        report.warnings += notes
        examples = []
        images = self._fetch(rows, path, uri)
        for (record, located), image, target in zip(rows, images, targets, strict=True):
            problem = decode_problem(image)
            if problem:
                raise DatasetError(record.file or uri, record.line, f"image {located.uri} cannot be decoded "
                                   f"({problem[0]})", problem[1])
            examples.append(ClassExample(str(image), target))
        self._validated[(split, uri)] = examples
        report.quality = self._checked[split][1] if split in self._checked else None
        report.classes, warnings = self.class_report(targets)
        report.warnings += warnings if split == "train" else []
        if self.quality is not None:
            self._check_images(split, uri, [record.line for record, _ in rows], images, targets, report)
        return report

    def _check_images(self, split: str, uri: str, lines: list[int], images: list[Path], targets: list[int],
                      report: DatasetReport) -> None:
        """The data-quality checks that need the images themselves. Train (validated first): suspected label
        errors from a small frozen feature (quality/labels.py: it sees color, brightness and layout, not what a
        picture shows), and an index of its images by content. Validation and test: the images train holds by
        content, wherever each is stored (the same bytes, or a perceptual hash a few bits away: quality/near.py
        ImageIndex); with leakage drop their train copies leave the train examples and counts."""
        from ..quality.checks import refuse
        from ..quality.labels import FOUND, suspected_image_label_errors
        from ..quality.near import ImageIndex

        policy = self.quality.policy
        if split == "train":
            self._train = _TrainImages(uri, lines, images, self._validated[(split, uri)], report)
            if policy.label_errors != QualityAction.off:
                suspected = suspected_image_label_errors(images, [str(t) for t in targets],
                                                         seed=self.config.hyperparameters.seed)
                found = [lines[i] for i in suspected]
                if report.quality is not None and "labels" in report.quality:
                    report.quality["labels"]["suspected"] = {"count": len(found), "lines": found}
                refuse(uri, policy, "label_errors", found, FOUND["label_errors"], "fix their labels")
                if policy.label_errors == QualityAction.drop:
                    self._drop_train(set(suspected))
            if policy.leakage != QualityAction.off:
                self._train.index = ImageIndex()
                for i, image in enumerate(images):
                    self._train.index.add(i, Path(image).read_bytes())
            return
        train = getattr(self, "_train", None)
        if train is None or train.index is None or report.quality is None:
            return
        hits, copies = {}, set()
        for line, image in zip(lines, images, strict=True):
            exact, near = train.index.query(Path(image).read_bytes())
            if exact or near:
                hits[line], copies = ("exact" if exact else "near"), copies | set(exact) | set(near)
        leak = report.quality.setdefault("leakage", {"exact": 0, "near": 0, "lines": []})
        new = {line: how for line, how in hits.items() if line not in set(leak["lines"])}
        if not new:
            return
        leak["exact"] += sum(how == "exact" for how in new.values())
        leak["near"] += sum(how == "near" for how in new.values())
        leak["lines"] = sorted({*leak["lines"], *new})
        refuse(uri, policy, "leakage", leak["lines"], "images are also in the train split")
        doc = train.report.quality
        copied = sorted({*doc.get("trainCopies", {}).get("lines", []), *(train.lines[i] for i in copies)})
        doc["trainCopies"] = {"count": len(copied), "lines": copied}
        if policy.leakage == QualityAction.drop:
            self._drop_train(copies)

    def _drop_train(self, drop: set[int]) -> None:
        """Train examples `drop` (indices into the validated ones) leave the examples and the counts, and join the
        report's dropped lines with their image's fingerprint (the first 16 hex digits of its sha256)."""
        from ..quality.checks import add_dropped

        train = self._train
        train.dropped |= drop
        kept = [e for i, e in enumerate(train.examples) if i not in train.dropped]
        self._validated[("train", train.uri)] = kept
        train.report.samples = len(kept)
        train.report.classes = self.class_report([e.target for e in kept])[0]
        add_dropped(train.report.quality["dropped"], {
            train.lines[i]: hashlib.sha256(Path(train.images[i]).read_bytes()).hexdigest()[:16] for i in drop})

    def examples(self, split: str, path: Path, uri: str, fmt: DataFormat) -> list[ClassExample]:
        """The split's images as (local path, target): those validate() checked, else located and fetched (not
        decoded: collate does that, batch by batch)."""
        if (split, uri) in self._validated:
            return self._validated[(split, uri)]
        _, rows, targets, _ = self._read(split, path, uri, fmt)
        return [ClassExample(str(image), target)
                for image, target in zip(self._fetch(rows, path, uri), targets, strict=True)]

    def _read(self, split: str, path: Path, uri: str, fmt: DataFormat):
        """(the format, [(record, where its image is)], the targets, the data report's notes) of a split, in record
        order; the train split resolves the class names. A bad record raises DatasetError naming its file and
        line."""
        fmt, path = DataFormat(fmt), Path(path)
        if fmt == DataFormat.imagefolder or (fmt == DataFormat.auto and is_imagefolder(path)):
            if not path.is_dir():
                raise DatasetError(uri, 0, "format imagefolder needs a folder laid out <prefix>/<label>/<image>",
                                   "point the split at the folder (a prefix ending in '/'), or use another format")
            splits = split_folders(path)
            if splits:  # training on it would make a model whose classes are the split names
                prefix = uri.rstrip("/")
                fields = ", ".join(f"dataset.{field}: {prefix}/{name}/" for field, name in _split_fields(splits))
                raise DatasetError(uri, 0, f"the folder holds split folders ({', '.join(splits)}), not class folders "
                                   "<label>/<image>", f"point each split at its folder: {fields}")
            read = Split(DataFormat.imagefolder, list(imagefolder_records(path, uri)), [])
            if not read.records:
                raise DatasetError(uri, 0, "no images in the label folders", "lay the images out as "
                                   "<prefix>/<label>/<image file>, or point the split at a data file")
        else:
            read = self.read_split(path, uri, fmt, KEYS)
        read = self.checked(split, uri, read)
        fmt, records = read.format, read.records
        store = self._store(path, uri)
        rows = []
        for record in records:
            with at_record(record, uri):
                image = record.value["image"]
                if fmt == DataFormat.imagefolder:  # named by its URI, found where it was fetched (no link out)
                    rows.append((record, store.inside(record.file, Located(record.file, Path(image)))))
                    continue
                if fmt == DataFormat.label_studio and isinstance(image, str):
                    image = label_studio.image_reference(image)
                rows.append((record, store.locate(image, record.file or uri)))
        return fmt, rows, self.check_labels(split, uri, records, read.classes), read.notes

    def _fetch(self, rows: list, path: Path, uri: str) -> list[Path]:
        """The local path of every row's image (downloading those not here yet); DatasetError for the first one
        that does not exist."""
        local = self._store(path, uri).fetch([located for _, located in rows])
        for (record, located), image in zip(rows, local, strict=True):
            if image is None:
                raise DatasetError(record.file or uri, record.line, f"image {_ref(record.value)!r} not found: no "
                                   f"object or file {located.uri}", _missing_hint(located.uri))
        return local

    def _store(self, path: Path, uri: str) -> ImageStore:
        return ImageStore(self.storage, self.image_cache, path, uri, self.config.storage_prefixes or ())

    def collate(self, examples: list[ClassExample]) -> dict[str, torch.Tensor]:
        images = [load_rgb(e.inputs) for e in examples]
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": self.collate_targets(examples)}

    def blank(self, example: ClassExample) -> dict[str, torch.Tensor]:
        batch = self.collate([example])
        batch["pixel_values"].zero_()
        batch["labels"] = self.blank_targets(batch["labels"])
        return batch

    def size(self, example) -> tuple[int, int]:
        return 0, 1

    # -- model --------------------------------------------------------------------------------------------

    def load_model(self, mixed_precision: str, sharded: bool):
        """The base under a new head for these labels (a head of another size is replaced); LoRA trains the head
        in full (modules_to_save). A convolutional base (ResNet) has no linear layers for the default
        targetModules all-linear: LoRA then adapts its convolutions."""
        from transformers import AutoModelForImageClassification

        hp = self.config.hyperparameters
        skeleton = self._skeleton()
        heads = None
        if self.config.method.type != MethodType.full:
            heads = head_modules(self.model_dir, AutoModelForImageClassification, **self.head_config(),
                                 **self.remote_code)
        kwargs: dict[str, Any] = {}
        if not type(skeleton)._supports_sdpa:
            kwargs["attn_implementation"] = None  # no attention (ResNet, ConvNeXt): "sdpa" would be refused
        if hp.gradient_checkpointing and not type(skeleton).supports_gradient_checkpointing:
            raise ConfigError(f"hyperparameters.gradientCheckpointing: {type(skeleton).__name__} does not support "
                              "gradient checkpointing; set it to false")
        # peft has no task type for images: None wraps the model as it is, its head trained in full.
        return load_model(self.model_dir, self._method(skeleton, heads or []), mixed_precision, hp,
                          sharded=sharded,
                          auto_class=AutoModelForImageClassification, task_type=None, modules_to_save=heads,
                          ignore_mismatched_sizes=True, **self.model_kwargs(), **self.weight_formats, **kwargs)

    def _skeleton(self):
        """The model with its new head, without weights (on the meta device): its class and module names."""
        import torch  # torch: not for kubetune validate
        from transformers import AutoConfig, AutoModelForImageClassification

        try:
            config = AutoConfig.from_pretrained(self.model_dir, **self.head_config(), **self.remote_code)
            with torch.device("meta"):
                return AutoModelForImageClassification.from_config(config, **self.remote_code)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"baseModel: {self.config.base_model.uri} is not a model transformers can put an "
                              f"image-classification head on ({e}); use a vision model such as ViT, ConvNeXt or "
                              "ResNet") from e

    def _method(self, skeleton, heads: list[str]):
        """config.method, with the default targetModules all-linear made convolutions for a base without linear
        layers (outside the head)."""
        import torch  # torch: not for kubetune validate

        method = self.config.method
        if method.type == MethodType.full or method.lora.target_modules != ["all-linear"]:
            return method
        body = [(name, module) for name, module in skeleton.named_modules()
                if name and not any(name == h or name.startswith(h + ".") for h in heads)]
        if any(isinstance(module, torch.nn.Linear) for _, module in body):
            return method
        convolutions = [name for name, module in body if isinstance(module, torch.nn.Conv2d) and module.groups == 1]
        if not convolutions:
            raise ConfigError(f"method.lora.targetModules: all-linear finds no linear layer in "
                              f"{type(skeleton).__name__} (outside its head) and no convolution either; name the "
                              "modules to adapt, or use method.type full")
        return method.model_copy(update={"lora": method.lora.model_copy(update={"target_modules": convolutions})})


def _missing_hint(uri: str) -> str:
    if uri.startswith("/data/upload/"):
        return ("Label Studio keeps uploaded files on its own server: connect the project to cloud storage (s3://) "
                "or local files, or copy the images next to the export")
    return f"upload it, or fix the path ({REFERENCE_HINT})"


def _ref(value: dict) -> str:
    image = value.get("image")
    return (image.get("path") or "(embedded image)") if isinstance(image, dict) else str(image)


def _split_fields(folders: list[str]) -> list[tuple[str, str]]:
    """(the dataset field, the folder) of each split folder, train first, then validation, then test."""
    fields = [(SPLIT_FOLDERS[name.lower()], name) for name in folders]
    return sorted(fields, key=lambda pair: ("train", "validation", "test").index(pair[0]))


@dataclass
class _TrainImages:
    """The validated train split, as the evaluation splits' checks drop from it."""

    uri: str
    lines: list[int]
    images: list[Path]
    examples: list[ClassExample]  # as validated, before any drop
    report: DatasetReport
    index: Any = None  # quality.near.ImageIndex of its images, when leakage is checked
    dropped: set[int] = field(default_factory=set)
