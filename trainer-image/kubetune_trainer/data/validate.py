"""Checking every record of a dataset split, and tokenizing it for training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from kubetune_api import DataFormat

from ..errors import DatasetError
from .formats import Fields
from .stream import Chunk, encode_split
from .tokenize import Example

if TYPE_CHECKING:
    from ..quality.checks import SplitChecks

MAX_LINES_LISTED = 10


@dataclass
class DatasetReport:
    file: str
    format: DataFormat
    samples: int  # records (preference pairs: pairs)
    tokens: int  # after truncation (pairs: of both sequences)
    trained_tokens: int  # tokens with a loss, after truncation
    truncated: int  # records longer than max_seq_length (pairs: with a sequence longer)
    max_length: int  # the longest record (pairs: sequence) in tokens, before truncation
    warnings: list[str] = field(default_factory=list)
    classes: dict[str, int] | None = None  # classification: records per label
    sequences: int | None = None  # what training iterates over: packed sequences, else the samples
    quality: dict | None = None  # what the quality checks found (quality/checks.py SplitChecks.finish)


def validate_dataset(path: Path, display_name: str | None, *, fmt: DataFormat, tokenizer, max_seq_length: int,
                     min_samples: int = 1, split: str = "train", sink: Callable[[Chunk], None] | None = None,
                     workers: int | None = None, pairs: bool = False, fields: Fields | None = None,
                     checks: SplitChecks | None = None) -> DatasetReport:
    """Check every record, in one streaming pass that also tokenizes them (data/stream.py); raise DatasetError
    (exit 65) for the first bad one, with its file and line. `sink` receives the tokenized chunks in order (the
    cache writer). pairs: the objective trains on preference pairs (dpo, orpo), so the records must be pairs (and
    must not be otherwise); each is two examples, and `samples` counts pairs. fields: dataset.fields. checks: the
    split's quality checks: the records they drop are left out of the chunks and of the counts."""
    name = display_name or str(path)
    record_fmt, chunks = encode_split(path, name, fmt, tokenizer, max_seq_length, workers, pairs=pairs,
                                      fields=fields, checks=checks)
    report = DatasetReport(name, record_fmt, 0, 0, 0, 0, 0)
    truncated_at: list[str] = []
    for chunk in chunks:
        if checks:
            keep = [checks.keep(line, probe) for line, probe in chunk.probes]
            if not all(keep):
                chunk = chunk.without(keep, 2 if pairs else 1)
        report.samples += len(chunk.lengths) // (2 if pairs else 1)
        report.tokens += int(chunk.lengths.sum())
        report.trained_tokens += int(chunk.trained.sum())
        report.max_length = max(report.max_length, int(chunk.full_lengths.max(initial=0)))
        report.truncated += len(chunk.truncated_at)
        truncated_at += chunk.truncated_at[:MAX_LINES_LISTED + 1 - len(truncated_at)]
        if sink:
            sink(chunk)
    if checks:
        report.quality = checks.finish()
        dropped = len(checks.dropped)
        if dropped and report.samples < min_samples:
            raise DatasetError(name, 0, f"the {split} split has {report.samples} records left after the data-quality "
                               f"checks dropped {dropped} (repeats, copies of evaluation records or personal data), "
                               f"fewer than the minimum of {min_samples}",
                               "add records, or set dataset.quality.duplicates, leakage or personalData to warn")
    check_min_samples(name, report.samples, min_samples, split)
    if report.truncated:
        report.warnings.append(truncation_warning(truncated_at, report.samples, max_seq_length, report.max_length,
                                                  report.truncated))
    return report


def check_min_samples(name: str, samples: int, min_samples: int, split: str) -> None:
    """DatasetError when a split has fewer valid records than dataset.minSamples (1 for validation and test)."""
    if samples < min_samples:
        raise DatasetError(name, 0, f"the {split} split has {samples} valid records, fewer than "
                           f"the minimum of {min_samples}", "add records or lower dataset.minSamples")


def truncation_warning(truncated_at: list[str], samples: int, max_seq_length: int, max_length: int,
                       count: int | None = None) -> str:
    """The warning for the `count` records longer than maxSeqLength (`truncated_at`: where they are, at least the
    first ones), the first listed."""
    count = len(truncated_at) if count is None else count
    listed = ", ".join(truncated_at[:MAX_LINES_LISTED])
    listed += ", ..." if count > MAX_LINES_LISTED else ""
    return (f"{count} of {samples} records are longer than maxSeqLength {max_seq_length} "
            f"tokens (up to {max_length}) and were truncated: {listed}")


def tokenize_dataset(path: Path, display_name: str | None, *, fmt: DataFormat, tokenizer,
                     max_seq_length: int, pairs: bool = False, fields: Fields | None = None) -> list[Example]:
    """Every record tokenized and truncated to max_seq_length, as a list (small data: tests, tools; pairs: chosen,
    rejected, chosen, ...); bad records raise as in validate_dataset. Training reads the memory-mapped cache
    instead (data/cache.py)."""
    name = display_name or str(path)
    _, chunks = encode_split(path, name, fmt, tokenizer, max_seq_length, workers=1, pairs=pairs, fields=fields)
    examples = []
    for chunk in chunks:
        ends = np.cumsum(chunk.lengths)
        for start, end in zip(ends - chunk.lengths, ends, strict=True):
            examples.append(Example.from_arrays(chunk.ids[start:end], chunk.trained[start:end]))
    return examples
