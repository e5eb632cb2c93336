"""The quality checks of one pass over the splits, and what `dataset.quality` does about their findings.

Order: the evaluation splits (small) are indexed first (`Evaluation.build`: exact fingerprints and a MinHash
index), then the train split streams past it, then the evaluation splits are checked themselves. Workers compute
each record's `Probe` (fingerprint, personal data, near copies in the evaluation splits); the main process keeps
one `SplitChecks` per split, in file order, which says of each record whether it stays (`keep`) and, at the end
of the split, what was found (`finish`, which also refuses the data for a `fail` policy).

Leaked records are removed from train, not from the evaluation split: the test split stays the one the user chose,
so runs scored on it stay comparable, and the model is never scored on what it trained on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kubetune_api import DataFormat, QualityAction, QualitySpec

from ..errors import DatasetError
from .normalize import fingerprint, normalize, record_text
from .pii import KINDS, scan

LISTED = 10  # lines an error message names


def add_dropped(dropped: dict, found: dict[int, str]) -> None:
    """Join records (line -> fingerprint) to a split's `dropped` section, which stays in line order with each
    line's fingerprint beside it."""
    pairs = dict(zip(dropped["lines"], dropped["fingerprints"], strict=True)) | found
    dropped.update(count=len(pairs), lines=sorted(pairs), fingerprints=[pairs[n] for n in sorted(pairs)])


def refuse(name: str, policy: QualitySpec, check: str, lines: list[int], what: str,
           fix: str = "remove them") -> None:
    """A DatasetError naming the file, the first line and up to LISTED lines, when `check`'s policy is fail and
    `lines` is not empty: "<n> <what> (lines ...)" (what: "records are ..."), with the fix and the field that
    turns it to a warning."""
    if not lines or getattr(policy, check) != QualityAction.fail:
        return
    listed = ", ".join(map(str, lines[:LISTED])) + (", ..." if len(lines) > LISTED else "")
    field_name = QualitySpec.model_fields[check].alias
    raise DatasetError(name, lines[0], f"{len(lines)} {what} (lines {listed})",
                       f"{fix}, or set dataset.quality.{field_name} to drop or warn")

Key = tuple[str, int]  # (split, line) of an evaluation record


@dataclass
class Evaluation:
    """The evaluation splits' records, which train records are compared with: exact fingerprints and a MinHash
    index (quality/near.py) for near copies. `hits` collects which were found in train, and how."""

    exact: dict[int, list[Key]] = field(default_factory=dict)
    near: Any = None  # NearIndex
    hits: dict[Key, str] = field(default_factory=dict)  # evaluation record -> "exact" or "near"

    @classmethod
    def build(cls, records: Iterable[tuple[str, int, str]], threshold: float, near: bool = True) -> Evaluation:
        """From (split, line, text) of every evaluation record."""
        evaluation = cls()
        if near:
            from .near import NearIndex

            evaluation.near = NearIndex(threshold=threshold)
        for split, line, text in records:
            normalized = normalize(text)
            evaluation.exact.setdefault(fingerprint(normalized), []).append((split, line))
            if evaluation.near is not None and normalized:
                evaluation.near.add((split, line), normalized)
        if evaluation.near is not None:
            evaluation.near.query("")  # builds the index's arrays once here: the forked workers share them
        return evaluation

    def __bool__(self) -> bool:
        return bool(self.exact)


@dataclass(frozen=True)
class Prober:
    """What a worker computes of each record (inherited by forked workers, as the tokenizer is)."""

    fmt: DataFormat
    personal_data: bool = False  # scan the text (the train split)
    near: Any = None  # the evaluation splits' NearIndex (the train split)

    def __call__(self, value: Any) -> Probe:
        text = record_text(value, self.fmt)
        normalized = normalize(text)
        near = self.near.query(normalized) if self.near is not None and normalized else []
        return Probe(fingerprint(normalized), scan(text) if self.personal_data else {}, near)


@dataclass(frozen=True)
class Probe:
    key: int  # fingerprint of the normalized text
    personal: dict[str, int]  # kind -> count
    near: list[Key]  # evaluation records this one nearly copies


class SplitChecks:
    """One split's findings, record by record in file order; keep() says whether the record stays."""

    def __init__(self, split: str, name: str, policy: QualitySpec, evaluation: Evaluation | None = None):
        self.split, self.name, self.policy = split, name, policy
        self.train = split == "train"
        self.evaluation = evaluation  # train: compared with it; validation, test: reports what train held of it
        self.seen: set[int] = set()
        self.duplicates: list[int] = []
        self.leaked: list[int] = []  # train lines that copy an evaluation record
        self.personal: Counter[str] = Counter()
        self.personal_lines: list[int] = []
        self.dropped: list[int] = []
        self.dropped_keys: list[int] = []

    def prober(self, fmt: DataFormat) -> Prober:
        near = self.evaluation.near if self.train and self.evaluation and self._active("leakage") else None
        return Prober(fmt, self.train and self._active("personal_data"), near if near is not None and len(near)
                      else None)

    def _active(self, check: str) -> bool:
        return getattr(self.policy, check) != QualityAction.off

    def _drops(self, check: str) -> bool:
        return self.train and getattr(self.policy, check) == QualityAction.drop

    def keep(self, line: int, probe: Probe) -> bool:
        drop = False
        if self._active("duplicates"):
            if probe.key in self.seen:
                self.duplicates.append(line)
                drop |= self._drops("duplicates")
            else:
                self.seen.add(probe.key)
        if self.train and self.evaluation and self._active("leakage"):
            exact = self.evaluation.exact.get(probe.key, [])
            for key in exact:
                self.evaluation.hits[key] = "exact"
            for key in probe.near:
                self.evaluation.hits.setdefault(key, "near")
            if exact or probe.near:
                self.leaked.append(line)
                drop |= self._drops("leakage")
        if probe.personal:
            self.personal.update(probe.personal)
            self.personal_lines.append(line)
            drop |= self._drops("personal_data")
        if drop:
            self.dropped.append(line)
            self.dropped_keys.append(probe.key)
        return not drop

    def finish(self) -> dict:
        """What the split holds, as the data report's per-split quality; DatasetError for a check whose policy
        is fail. A validation or test split reports which of its records train held (train is checked first)."""
        doc: dict[str, Any] = {}
        evaluation = self.evaluation
        if self._active("duplicates"):
            doc["duplicates"] = {"count": len(self.duplicates), "lines": self.duplicates}
            if self.train:
                self._refuse("duplicates", self.duplicates, "repeat an earlier record of the split")
        if self.train and self.evaluation is not None and self._active("leakage"):
            doc["trainCopies"] = {"count": len(self.leaked), "lines": self.leaked}
        if not self.train and evaluation is not None and self._active("leakage"):
            hits = sorted((line, how) for (split, line), how in evaluation.hits.items() if split == self.split)
            doc["leakage"] = {"exact": sum(how == "exact" for _, how in hits),
                              "near": sum(how == "near" for _, how in hits), "lines": [line for line, _ in hits]}
            self._refuse("leakage", doc["leakage"]["lines"], "are also in the train split")
        if self.train and self._active("personal_data"):
            doc["pii"] = {**{kind: self.personal.get(kind, 0) for kind in KINDS}, "lines": self.personal_lines}
            self._refuse("personal_data", self.personal_lines, "hold personal data or secrets ("
                         + ", ".join(f"{n} {kind}" for kind, n in self.personal.items()) + ")")
        if self.train:
            doc["dropped"] = {"count": len(self.dropped), "lines": self.dropped,
                              "fingerprints": [f"{k:016x}" for k in self.dropped_keys]}
        return doc

    def _refuse(self, check: str, lines: list[int], what: str) -> None:
        refuse(self.name, self.policy, check, lines, f"records {what}")


@dataclass
class Quality:
    """The checks of one pass over a run's splits (train first): each split's SplitChecks share the evaluation
    splits' index."""

    policy: QualitySpec
    evaluation: Evaluation | None = None

    def checks(self, split: str, name: str) -> SplitChecks:
        return SplitChecks(split, name, self.policy, self.evaluation)
