"""One pass over a split: check every record and tokenize it, on every core, handing the tokens on as it goes.

The main process reads the records as a stream (JSONL lines stay undecoded) and deals them out in chunks to a
pool of worker processes, at most a few chunks ahead, so memory stays flat whatever the size of the data. Each
worker parses, checks and tokenizes its chunk (one tokenizer call per chunk) and returns numpy arrays. The
chunks come back in file order: the first bad record found is the first bad record of the file, reported with
its file and line, and what the pass writes does not depend on the number of workers.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from kubetune_api import PREFERENCE_FORMATS, DataFormat

from ..errors import DatasetError
from .formats import Fields, RecordError, check_record, guess_format, with_fields
from .records import Record, beyond_limits, load_records, parse
from .tokenize import IGNORE, assemble, record_sequences

if TYPE_CHECKING:
    from ..quality.checks import Probe, Prober, SplitChecks

CHUNK = 512  # records a worker checks and tokenizes at a time
AHEAD = 3  # chunks in flight per worker
INLINE_BELOW = 4 << 20  # bytes of data: less is done in this process, where starting a pool costs more than it saves


@dataclass(frozen=True)
class Encoding:
    """How every record of a split is checked and tokenized."""

    fmt: DataFormat  # concrete
    detected: bool  # fmt was detected from the first record (dataset.format auto): every record must be in it
    first: str  # where the first record is, for the message about a record in another format
    max_seq_length: int
    pairs: bool = False  # preference pairs: each record is two examples, chosen then rejected
    fields: Fields | None = None  # dataset.fields: the records' columns renamed to the format's fields
    prober: Prober | None = None  # the data-quality facts of each record (quality/checks.py)

    @property
    def per_record(self) -> int:
        return 2 if self.pairs else 1


@dataclass
class Chunk:
    """Consecutive records, tokenized and truncated, as flat arrays; or the first bad one among them. A preference
    record is two consecutive examples: chosen, then rejected."""

    ids: np.ndarray  # int32, the examples end to end
    trained: np.ndarray  # uint8, 1 where the token has a loss (its label is the token itself)
    lengths: np.ndarray  # int32, each example's length after truncation
    full_lengths: np.ndarray  # int32, before truncation
    truncated_at: list[str] = field(default_factory=list)  # where each truncated record is
    error: tuple[str, int, str, str] | None = None  # (file, line, problem, hint) of the first bad record
    probes: list[tuple[int, Probe]] = field(default_factory=list)  # (line, quality facts) of each good record

    def without(self, keep: list[bool], per_record: int) -> Chunk:
        """The chunk less the records whose `keep` is False (each is per_record examples)."""
        examples = np.repeat(np.array(keep, dtype=bool), per_record)
        tokens = np.repeat(examples, self.lengths)
        kept = {line for (line, _), k in zip(self.probes, keep, strict=True) if k}
        return Chunk(self.ids[tokens], self.trained[tokens], self.lengths[examples], self.full_lengths[examples],
                     [w for w in self.truncated_at if _line_of(w) in kept], self.error,
                     [p for p, k in zip(self.probes, keep, strict=True) if k])


def _line_of(where: str) -> int:
    return int(where.rsplit(" ", 1)[-1].rsplit(":", 1)[-1])


def encode_chunk(records: list[Record], enc: Encoding, tokenizer, name: str) -> Chunk:
    """Check and tokenize consecutive records; stop at the first bad one."""
    good: list[Record] = []
    sequences = []
    error: tuple[str, int, str, str] | None = None
    for record in records:
        try:
            record = parse(record)
            record.value = with_fields(record.value, enc.fields)
            if enc.detected:
                found = guess_format(record.value)
                if found != enc.fmt:
                    raise RecordError(f"record is {found.value} but the first record ({enc.first}) is "
                                      f"{enc.fmt.value}", "use one format for every record")
            check_record(record.value, enc.fmt)
            sequences += record_sequences(record.value, enc.fmt, tokenizer)
        except RecordError as e:
            error = (record.file or name, record.line, e.problem, e.hint)
            break
        except DatasetError as e:
            error = (e.file, e.line, e.problem, e.hint)
            break
        except (RecursionError, MemoryError) as e:  # a record nested too deeply, or too large, to check
            e = beyond_limits(record.file or name, record.line, e)
            error = (e.file, e.line, e.problem, e.hint)
            break
        good.append(record)
    examples = assemble(sequences, tokenizer)
    ids, trained, lengths, full_lengths, truncated_at, probes = [], [], [], [], [], []
    n = enc.per_record
    for k, record in enumerate(good):
        group = examples[n * k : n * (k + 1)]
        masks = [[label != IGNORE for label in e.labels[:enc.max_seq_length]] for e in group]
        empty = next((side for side, mask in enumerate(masks) if not any(mask)), None)
        if empty is not None:
            what = f"prompt + {('chosen', 'rejected')[empty]}" if enc.pairs else "the record"
            problem = _no_trained_tokens(group[empty].labels, enc.max_seq_length, what)
            error = (record.file or name, record.line, problem,
                     "shorten the prompt or raise hyperparameters.maxSeqLength")
            break
        if enc.prober:
            probes.append((record.line, enc.prober(record.value)))
        for example, mask in zip(group, masks, strict=True):
            ids += example.input_ids[:enc.max_seq_length]
            trained += mask
            lengths.append(len(mask))
            full_lengths.append(len(example))
        if any(len(e) > enc.max_seq_length for e in group):
            truncated_at.append(where(record, name))
    return Chunk(np.array(ids, dtype=np.int32), np.array(trained, dtype=np.uint8),
                 np.array(lengths, dtype=np.int32), np.array(full_lengths, dtype=np.int32), truncated_at, error,
                 probes)


def _no_trained_tokens(labels: list[int], max_seq_length: int, what: str = "the record") -> str:
    if all(label == IGNORE for label in labels):
        return "no trained tokens"
    return (f"no trained tokens left after truncation to maxSeqLength {max_seq_length} "
            f"({what} has {len(labels)} tokens)")


def where(record: Record, name: str) -> str:
    return f"line {record.line}" if record.file in ("", name) else f"{record.file}:{record.line}"


def encode_split(path: Path, name: str, fmt: DataFormat, tokenizer, max_seq_length: int,
                 workers: int | None = None, *, pairs: bool = False, fields: Fields | None = None,
                 checks: SplitChecks | None = None) -> tuple[DataFormat, Iterator[Chunk]]:
    """(the split's concrete format, its chunks in file order). Raises DatasetError for the first bad record
    while iterating. workers: processes to use (default: the CPUs this process may use; small data: none).
    pairs: the objective trains on preference pairs (dpo, orpo); the records must be pairs exactly then.
    fields: dataset.fields, the records' own column names for the format's fields. checks: the split's quality
    checks, whose facts of each record the chunks carry (Chunk.probes)."""
    fmt = DataFormat(fmt)
    records = load_records(path, name, raw=True)
    first = next(records, None)
    if first is None:
        empty = DataFormat.preference if pairs else DataFormat.text
        return fmt if fmt != DataFormat.auto else empty, iter(())
    first = parse(first)
    first.value = with_fields(first.value, fields)
    detected = fmt == DataFormat.auto
    if detected:
        try:
            fmt = guess_format(first.value)
        except RecordError as e:
            raise DatasetError(first.file or name, first.line, e.problem, e.hint) from None
    if (fmt in PREFERENCE_FORMATS) != pairs:
        raise DatasetError(first.file or name, first.line, *_objective_mismatch(fmt))
    enc = Encoding(fmt, detected, where(first, name), max_seq_length, pairs, fields,
                   checks.prober(fmt) if checks else None)
    chunks = _batched(itertools.chain([first], records), CHUNK)
    if workers is None:
        workers = cpu_budget() if data_size(path) >= INLINE_BELOW else 1
    return fmt, _checked(_ordered(chunks, enc, tokenizer, name, workers))


def _objective_mismatch(fmt: DataFormat) -> tuple[str, str]:
    """(problem, hint) for records that do not fit the objective: pairs for sft, or not pairs for dpo and orpo."""
    if fmt in PREFERENCE_FORMATS:
        return (f"records are preference pairs ({fmt.value}: chosen and rejected answers) but objective sft trains "
                "on one answer per record", "set objective dpo or orpo, or use a supervised format")
    return (f"records are {fmt.value}, not preference pairs: objective dpo and orpo train on (prompt, chosen, "
            "rejected)", 'write records as {"prompt": ..., "chosen": ..., "rejected": ...}, or set objective sft')


def _checked(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    for chunk in chunks:
        if chunk.error:
            raise DatasetError(*chunk.error)
        yield chunk


def _batched(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    while batch := list(itertools.islice(records, size)):
        yield batch


_WORK: tuple[Encoding, object, str] | None = None  # what the forked workers inherit


def _encode_in_worker(records: list[Record]) -> Chunk:
    enc, tokenizer, name = _WORK
    return encode_chunk(records, enc, tokenizer, name)


def _ordered(chunks: Iterator[list[Record]], enc: Encoding, tokenizer, name: str,
             workers: int) -> Iterator[Chunk]:
    """encode_chunk of every chunk, in order: here, or in `workers` forked processes with a few chunks ahead."""
    if workers <= 1:
        for records in chunks:
            yield encode_chunk(records, enc, tokenizer, name)
        return
    global _WORK
    _WORK = (enc, tokenizer, name)  # forked workers start with it: no tokenizer is pickled or loaded again
    parallelism = os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # each worker is one core
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pending: deque = deque()
            for records in chunks:
                pending.append(pool.apply_async(_encode_in_worker, (records,)))
                if len(pending) >= AHEAD * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        _WORK = None
        if parallelism == "false" and os.environ.get("TOKENIZERS_PARALLELISM") == "false":
            os.environ.pop("TOKENIZERS_PARALLELISM", None)


def data_size(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def cpu_budget() -> int:
    """The worker processes to use: $KUBETUNE_DATA_WORKERS (the operator sets it from the validation pod's CPU
    request), else the CPUs this process may use: its affinity, capped by a cgroup CPU limit."""
    if os.environ.get("KUBETUNE_DATA_WORKERS", "").isdigit():
        return max(1, int(os.environ["KUBETUNE_DATA_WORKERS"]))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)

