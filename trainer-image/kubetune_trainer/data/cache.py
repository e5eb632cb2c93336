"""The tokenized-data cache: what one pass over the records (data/stream.py) leaves for every training process.

A cache is a folder per key, one subfolder per split, of flat binary arrays that every process memory-maps (the
operating system shares the pages between the processes of a node; nothing is copied into Python objects):

    <key>/meta.json              written last: the key and what it was made of, each file's size and sha256,
                                 the reports
    <key>/<split>/ids.bin        int32 token ids, the examples end to end
    <key>/<split>/trained.bin    uint8, 1 where the token has a loss (its label is the token, else IGNORE)
    <key>/<split>/lengths.bin    int32, each example's length
    <key>/<split>/members.bin    int64, with packing: the examples of the packed sequences, in order
    <key>/<split>/bounds.bin     int64, with packing: sequence b holds members[bounds[b]:bounds[b + 1]]

Preference pairs (objective dpo, orpo) are two consecutive examples, chosen then rejected (example 2i and 2i + 1
are pair i), and their packing plan packs pairs: members are pair numbers (data/preference.py reads them).

The key hashes everything the arrays depend on (the data's and the tokenizer's sha256, the task, the format, the
maximum length, packing and its seed, this layout's version), so a cache is reused exactly when it holds what
tokenizing again would produce. A cache with another key (foreign), another version or a file of another size
(truncated) is not opened: it is rebuilt. A cache from a place others can write (a `dataset.cacheUri` in object
storage or on a volume, `problem(..., verify=True)`) is also checked file by file against the sha256 its meta.json
records before its arrays are trusted; one that does not match is rebuilt (and the event names the file).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from kubetune_api import PREFERENCE_FORMATS, DataFormat

from .packing import PackedExample, pack_plan, pack_sequence
from .preference import PairSplit, pack_pairs
from .rows import Rows
from .stream import Chunk
from .tokenize import Example
from .validate import DatasetReport

VERSION = 3  # 2: chat turns of weight 0 are not trained (a cache of 1 trained them); 3: a sha256 per file
META = "meta.json"
ABSENT = "no cache"
DTYPES = {"ids": np.int32, "trained": np.uint8, "lengths": np.int32, "members": np.int64, "bounds": np.int64}


def cache_key(parts: dict[str, Any]) -> str:
    """The cache's name: a hash of what its contents depend on."""
    doc = json.dumps({"version": VERSION, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()[:32]


class SplitWriter:
    """Appends a split's chunks to its files as the pass produces them."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files = {name: (self.directory / f"{name}.bin").open("wb") for name in ("ids", "trained", "lengths")}

    def add(self, chunk: Chunk) -> None:
        self._files["ids"].write(chunk.ids.tobytes())
        self._files["trained"].write(chunk.trained.tobytes())
        self._files["lengths"].write(chunk.lengths.tobytes())

    def close(self, max_seq_length: int, packing: bool, seed: int | None, pairs: bool = False) -> int:
        """Close the files and, with packing, write the packing plan; returns the number of sequences (pairs: of
        pairs, or of packed rows of pairs, at most 2 x max_seq_length tokens each)."""
        for f in self._files.values():
            f.close()
        lengths = _map(self.directory, "lengths")
        if pairs:
            lengths = lengths[0::2].astype(np.int64) + lengths[1::2]
            max_seq_length *= 2
        if not packing:
            return len(lengths)
        members, bounds = pack_plan(lengths, max_seq_length, seed)
        members.tofile(self.directory / "members.bin")
        bounds.tofile(self.directory / "bounds.bin")
        return len(bounds) - 1


def write_meta(directory: Path, key: str, parts: dict, reports: dict[str, DatasetReport]) -> None:
    """The last file of a cache: without it (a build or a download cut short) the folder is no cache."""
    splits = {split: {"files": {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
                                for f in sorted((directory / split).glob("*.bin"))},
                      "report": {**asdict(report), "format": report.format.value}}
              for split, report in reports.items()}
    doc = {"version": VERSION, "key": key, "parts": parts, "splits": splits}
    tmp = directory / (META + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, directory / META)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def problem(directory: Path, key: str, *, verify: bool = False) -> str | None:
    """Why the folder is not a complete cache of `key` (None: it is). verify: also check every file against the
    sha256 meta.json records (for a cache others can write)."""
    try:
        meta = json.loads((Path(directory) / META).read_text())
    except FileNotFoundError:
        return ABSENT
    except (OSError, ValueError):
        return f"unreadable {META}"
    if meta.get("version") != VERSION:
        return f"cache version {meta.get('version')}, not {VERSION}"
    if meta.get("key") != key:
        return f"a foreign cache (key {str(meta.get('key'))[:12]}, not {key[:12]})"
    for split, entry in meta.get("splits", {}).items():
        for name, recorded in entry.get("files", {}).items():
            path = Path(directory) / split / name
            if not isinstance(recorded, dict) or PurePosixPath(split, name).parts != (split, name) or \
                    split in ("", ".", "..") or name in ("", ".", ".."):
                return f"unreadable {META} (its entry {split}/{name})"
            actual = path.stat().st_size if path.is_file() else None
            if actual != recorded.get("size"):
                return f"{split}/{name} is truncated ({actual or 0} of {recorded.get('size')} bytes)"
            if verify and _sha256(path) != recorded.get("sha256"):
                return (f"{split}/{name} does not match the sha256 in its {META}: changed after the cache was "
                        "written")
    return None


def reports(meta: dict) -> dict[str, DatasetReport]:
    """The validation reports a cache's meta.json holds, per split."""
    out = {}
    for split, entry in meta["splits"].items():
        fields = dict(entry["report"])
        fields["format"] = DataFormat(fields["format"])
        out[split] = DatasetReport(**fields)
    return out


def matches(meta: dict | None, key: str) -> bool:
    return bool(meta) and meta.get("version") == VERSION and meta.get("key") == key


class Cache:
    """An opened, complete cache."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / META).read_text())

    def reports(self) -> dict[str, DatasetReport]:
        return reports(self.meta)

    def examples(self, split: str) -> TokenizedSplit:
        return TokenizedSplit(self.directory / split)

    def sequences(self, split: str) -> Sequence:
        """What training reads: the packed sequences when the cache was packed, else the examples; for preference
        pairs, the pairs (preference.PairSplit) or their packed rows."""
        rows, pack = self.examples(split), pack_sequence
        if self.meta["splits"].get(split, {}).get("report", {}).get("format") in PREFERENCE_FORMATS:
            rows, pack = PairSplit(rows), pack_pairs
        if not (self.directory / split / "bounds.bin").exists():
            return rows
        return PackedSplit(rows, _map(self.directory / split, "members"), _map(self.directory / split, "bounds"),
                           pack)


def _map(directory: Path, name: str) -> np.ndarray:
    path = Path(directory) / f"{name}.bin"
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=DTYPES[name])
    return np.memmap(path, dtype=DTYPES[name], mode="r")


class TokenizedSplit(Rows):
    """A split's examples, memory-mapped."""

    def __init__(self, directory: Path):
        super().__init__()
        self.ids, self.trained = _map(directory, "ids"), _map(directory, "trained")
        self.lengths = _map(directory, "lengths")
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])

    def _size(self) -> int:
        return len(self.lengths)

    def _row(self, i: int) -> Example:
        start, end = self.offsets[i], self.offsets[i + 1]
        return Example.from_arrays(self.ids[start:end], self.trained[start:end])


class PackedSplit(Rows):
    """A split's packed sequences, built from the memory-mapped rows (examples, or pairs) when asked for: row b
    is `pack` of the rows members[bounds[b]:bounds[b + 1]]."""

    def __init__(self, examples: Sequence, members: np.ndarray, bounds: np.ndarray, pack=pack_sequence):
        super().__init__()
        self.examples, self.members, self.bounds, self.pack = examples, members, bounds, pack

    def _size(self) -> int:
        return len(self.bounds) - 1

    def _row(self, b: int) -> PackedExample:
        return self.pack([self.examples[int(i)] for i in self.members[self.bounds[b]:self.bounds[b + 1]]])


def remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
