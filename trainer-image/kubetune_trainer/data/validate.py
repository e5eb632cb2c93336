"""Checking every record of a dataset split, and tokenizing it for training."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError
from ..spec import DataFormat
from .formats import RecordError, check_record, guess_format
from .records import Record, load_records
from .tokenize import Example, tokenize_full, truncate

MAX_LINES_LISTED = 10


@dataclass
class DatasetReport:
    file: str
    format: DataFormat
    samples: int
    tokens: int  # after truncation
    trained_tokens: int  # tokens with a loss, after truncation
    truncated: int  # records longer than max_seq_length
    max_length: int  # the longest record in tokens, before truncation
    warnings: list[str] = field(default_factory=list)
    classes: dict[str, int] | None = None  # classification: records per label


def validate_dataset(path: Path, display_name: str | None, *, fmt: DataFormat, tokenizer, max_seq_length: int,
                     min_samples: int = 1, split: str = "train") -> DatasetReport:
    """Check every record; raise DatasetError (exit 65) for the first bad one, with its file and line."""
    name = display_name or str(path)
    report = DatasetReport(name, fmt, 0, 0, 0, 0, 0)
    truncated_at: list[str] = []
    for record, record_fmt, full, example in _examples(path, name, fmt, tokenizer, max_seq_length):
        report.format = record_fmt
        report.samples += 1
        report.tokens += len(example)
        report.trained_tokens += example.trained_tokens
        report.max_length = max(report.max_length, len(full))
        if len(full) > max_seq_length:
            report.truncated += 1
            truncated_at.append(where(record, name))
    check_min_samples(name, report.samples, min_samples, split)
    if truncated_at:
        report.warnings.append(truncation_warning(truncated_at, report.samples, max_seq_length, report.max_length))
    return report


def check_min_samples(name: str, samples: int, min_samples: int, split: str) -> None:
    """DatasetError when a split has fewer valid records than dataset.minSamples (1 for validation and test)."""
    if samples < min_samples:
        raise DatasetError(name, 0, f"the {split} split has {samples} valid records, fewer than "
                           f"the minimum of {min_samples}", "add records or lower dataset.minSamples")


def truncation_warning(truncated_at: list[str], samples: int, max_seq_length: int, max_length: int) -> str:
    """The warning for the records longer than maxSeqLength (`truncated_at`: where each is), the first listed."""
    listed = ", ".join(truncated_at[:MAX_LINES_LISTED])
    listed += ", ..." if len(truncated_at) > MAX_LINES_LISTED else ""
    return (f"{len(truncated_at)} of {samples} records are longer than maxSeqLength {max_seq_length} "
            f"tokens (up to {max_length}) and were truncated: {listed}")


def tokenize_dataset(path: Path, display_name: str | None, *, fmt: DataFormat, tokenizer,
                     max_seq_length: int) -> list[Example]:
    """Every record tokenized and truncated to max_seq_length; bad records raise as in validate_dataset."""
    name = display_name or str(path)
    return [example for _, _, _, example in _examples(path, name, fmt, tokenizer, max_seq_length)]


def _examples(path: Path, name: str, fmt: DataFormat, tokenizer,
              max_seq_length: int) -> Iterator[tuple[Record, DataFormat, Example, Example]]:
    """(record, its format, full example, truncated example) for every record, checked."""
    fmt = DataFormat(fmt)
    first: tuple[Record, DataFormat] | None = None
    for record in load_records(path, name):
        try:
            record_fmt = fmt if fmt != DataFormat.auto else guess_format(record.value)
            if first and record_fmt != first[1]:
                raise RecordError(f"record is {record_fmt.value} but the first record "
                                  f"({where(first[0], name)}) is {first[1].value}",
                                  "use one format for every record")
            check_record(record.value, record_fmt)
            full = tokenize_full(record.value, record_fmt, tokenizer)
            example = truncate(full, max_seq_length)
            if not example.trained_tokens:
                raise RecordError(_no_trained_tokens(full, max_seq_length),
                                  "shorten the prompt or raise hyperparameters.maxSeqLength")
        except RecordError as e:
            raise DatasetError(record.file or name, record.line, e.problem, e.hint) from None
        first = first or (record, record_fmt)
        yield record, record_fmt, full, example


def _no_trained_tokens(full: Example, max_seq_length: int) -> str:
    if not full.trained_tokens:
        return "no trained tokens"
    return (f"no trained tokens left after truncation to maxSeqLength {max_seq_length} "
            f"(the record has {len(full)} tokens)")


def where(record: Record, name: str) -> str:
    return f"line {record.line}" if record.file in ("", name) else f"{record.file}:{record.line}"
