"""sequence-classification: a label per text, or per pair of texts (entailment, question/answer relevance).

Records: {"text": "...", "label": "..."} with an optional "text_pair", in JSONL, JSON, CSV or Parquet (format
classification), or a Label Studio export of a Choices project (format label-studio). The model is the base
model under a sequence-classification head (AutoModelForSequenceClassification): LoRA trains adapters and the
whole head, full fine-tuning everything. A text is truncated to hyperparameters.maxSeqLength tokens; packing does
not apply (one text, one prediction).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune_api import DataFormat, MethodType, TaskType

from ..data import DatasetReport
from ..data.formats import RecordError, kind_of
from ..data.stream import where
from ..data.validate import truncation_warning
from ..modeling import load_model, load_tokenizer
from .base import TokenizesText, register
from .classification import IGNORE, ClassExample, ClassificationTask, Split, TextClassifier, at_record, head_modules

if TYPE_CHECKING:
    import torch

KEYS = ("text", "text_pair")


@register(TaskType.sequence_classification)
class SequenceClassification(ClassificationTask, TextClassifier, TokenizesText):
    auto_class = "AutoModelForSequenceClassification"

    def load_processor(self):
        self.processor = load_tokenizer(self.model_dir, **self.remote_code)
        return self.processor

    # -- data ---------------------------------------------------------------------------------------------

    def _records(self, split: str, path: Path, uri: str, fmt: DataFormat) -> Split:
        """The split's plain records, each with a non-empty text (and a text_pair string where there is one), less
        those the data-quality checks drop."""
        read = self.read_split(path, uri, fmt, KEYS)
        for record in read.records:
            with at_record(record, uri):
                check_texts(record.value)
        return self.checked(split, uri, read)

    def encode(self, value: dict, truncate: bool = True) -> dict[str, list[int]]:
        """A record's model inputs: input_ids (and token_type_ids where the tokenizer makes them, BERT's segment
        ids of a text pair), truncated to maxSeqLength."""
        limit = self.config.hyperparameters.max_seq_length
        pair = value.get("text_pair") or None
        encoded = self.processor(value["text"], pair, truncation=truncate, max_length=limit if truncate else None,
                                 return_attention_mask=False, verbose=False)
        return {k: list(v) for k, v in encoded.items() if k in ("input_ids", "token_type_ids")}

    def validate(self, split: str, path: Path, uri: str, fmt: DataFormat, min_samples: int) -> DatasetReport:
        read = self._records(split, path, uri, fmt)
        records = read.records
        report = self.report(uri, read.format, len(records), min_samples, split)
        report.warnings += read.notes
        report.quality = read.quality
        targets = self.check_labels(split, uri, records, read.classes)
        limit = self.config.hyperparameters.max_seq_length
        truncated_at = []
        for record in records:
            length = len(self.encode(record.value, truncate=False)["input_ids"])
            report.tokens += min(length, limit)
            report.max_length = max(report.max_length, length)
            if length > limit:
                truncated_at.append(where(record, uri))
        report.trained_tokens = report.tokens  # every token informs the prediction
        report.truncated = len(truncated_at)
        if truncated_at:
            report.warnings.append(truncation_warning(truncated_at, report.samples, limit, report.max_length))
        report.classes, warnings = self.class_report(targets)
        report.warnings += warnings if split == "train" else []
        return report

    def examples(self, split: str, path: Path, uri: str, fmt: DataFormat) -> list[ClassExample]:
        read = self._records(split, path, uri, fmt)
        records = read.records
        targets = self.check_labels(split, uri, records, read.classes)
        return [ClassExample(self.encode(r.value), t) for r, t in zip(records, targets, strict=True)]

    def collate(self, examples: list[ClassExample]) -> dict[str, torch.Tensor]:
        """Right-padded input_ids (with token_type_ids where there are any), attention_mask and labels. A causal
        model's head reads the last token that is not padding (config.pad_token_id)."""
        import torch  # torch: not for kubetune validate

        width = max(len(e.inputs["input_ids"]) for e in examples)
        batch = {"input_ids": torch.full((len(examples), width), self.processor.pad_token_id, dtype=torch.long),
                 "attention_mask": torch.zeros(len(examples), width, dtype=torch.long)}
        if "token_type_ids" in examples[0].inputs:
            batch["token_type_ids"] = torch.zeros(len(examples), width, dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e.inputs["input_ids"])
            batch["attention_mask"][i, :n] = 1
            for key, ids in e.inputs.items():
                if key in batch:
                    batch[key][i, :n] = torch.tensor(ids, dtype=torch.long)
        batch["labels"] = self.collate_targets(examples)
        return batch

    def blank(self, example: ClassExample) -> dict[str, torch.Tensor]:
        batch = self.collate([example])
        batch["labels"] = self.blank_targets(batch["labels"])
        return batch

    def size(self, example: ClassExample) -> tuple[int, int]:
        return len(example.inputs["input_ids"]), 1

    # -- model --------------------------------------------------------------------------------------------

    def load_model(self, mixed_precision: str, sharded: bool):
        """The base model under a new head of len(labels) outputs (initialised from hyperparameters.seed); with
        LoRA the head is trained in full (modules_to_save)."""
        from transformers import AutoModelForSequenceClassification

        hp, method = self.config.hyperparameters, self.config.method
        kwargs = self.model_kwargs()
        heads = None
        if method.type != MethodType.full:
            heads = head_modules(self.model_dir, AutoModelForSequenceClassification, **kwargs)
        return load_model(self.model_dir, method, mixed_precision, hp, sharded=sharded,
                          auto_class=AutoModelForSequenceClassification, task_type="SEQ_CLS",
                          modules_to_save=heads, ignore_mismatched_sizes=True, **kwargs, **self.weight_formats)

    def model_kwargs(self) -> dict[str, Any]:
        """The head's and trust_remote_code, and pad_token_id: it tells a causal model's head which token is the
        last one."""
        if self.processor is None:
            self.load_processor()
        return {**super().model_kwargs(), "pad_token_id": self.processor.pad_token_id}


def check_texts(value: dict) -> None:
    """RecordError unless "text" is a non-empty string and "text_pair", when there is one, a string."""
    hint = "make text a non-empty string, or remove the record"
    text = value.get("text")
    if not isinstance(text, str):
        raise RecordError(f"field 'text' is {kind_of(text)}, expected a string", hint)
    if not text.strip():
        raise RecordError("field 'text' is empty", hint)
    pair = value.get("text_pair")
    if pair is not None and not isinstance(pair, str):
        raise RecordError(f"field 'text_pair' is {kind_of(pair)}, expected a string",
                          "make text_pair a string, or leave it out")


__all__ = ["IGNORE", "SequenceClassification", "check_texts"]
