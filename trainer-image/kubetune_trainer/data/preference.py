"""Preference pairs (objective dpo, orpo): what training reads, and its batches.

A pair is two examples, chosen then rejected, with the same prompt tokens and only the final answer trained
(tokenize.pair_sequences). The pass and the cache keep them as consecutive examples: example 2i is the chosen of
pair i, 2i + 1 its rejected. With packing, whole pairs are packed best-fit-decreasing (packing.pack_plan over the
pairs' lengths) into rows of at most 2 x maxSeqLength tokens: a pair's two sequences always share a row.

collate_pairs gives a preference loss its batch: input_ids and labels (unshifted, IGNORE on the prompt and the
padding), attention_mask (unpacked) or position_ids (packed), and `sequence`, for every token the number of the
sequence it belongs to in the batch (the chosen of the batch's pair p is 2p, its rejected 2p + 1; -1 on padding),
so that per-sequence log-probabilities are a scatter_add over sequence[:, 1:] of the tokens labels[:, 1:] trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kubetune_api import DataFormat

from .formats import Fields
from .packing import pack_examples, pack_sequence
from .rows import Rows
from .tokenize import IGNORE, Example
from .validate import tokenize_dataset

if TYPE_CHECKING:
    import torch

PAD_SEQUENCE = -1  # `sequence` of a padding token


@dataclass
class PreferencePair:
    chosen: Example
    rejected: Example

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


@dataclass
class PackedPairs:
    """Pairs laid end to end in one row, each pair's chosen then its rejected; position_ids restart at 0 for every
    sequence (a block-diagonal causal mask, as packing.PackedExample) and each sequence's first label is IGNORE."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    lengths: list[int]  # the sequences' lengths in order: chosen, rejected, chosen, rejected, ...

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_pairs(pairs: list[PreferencePair]) -> PackedPairs:
    packed = pack_sequence([e for pair in pairs for e in (pair.chosen, pair.rejected)])
    return PackedPairs(packed.input_ids, packed.labels, packed.position_ids, packed.lengths)


def tokenize_pairs(path: Path, display_name: str | None, *, fmt: DataFormat, tokenizer,
                   max_seq_length: int, fields: Fields | None = None) -> list[Example]:
    """Every pair of a split tokenized and truncated, in pair order (chosen, rejected, chosen, ...): small data; bad
    records raise as in validate_dataset(pairs=True)."""
    return tokenize_dataset(path, display_name, fmt=fmt, tokenizer=tokenizer, max_seq_length=max_seq_length,
                            pairs=True, fields=fields)


def pair_examples(examples: list[Example], max_seq_length: int, packing: bool,
                  seed: int | None = None) -> list[PreferencePair] | list[PackedPairs]:
    """Examples in pair order (chosen, rejected, chosen, ...: tokenize_dataset(pairs=True)) as pairs, or packed
    into rows of at most 2 x max_seq_length tokens: in memory what Cache.sequences reads from a cache."""
    if any(len(e) > max_seq_length for e in examples):
        raise ValueError(f"examples longer than max_seq_length {max_seq_length}: truncate them first")
    pairs = [PreferencePair(c, r) for c, r in zip(examples[0::2], examples[1::2], strict=True)]
    return pack_examples(pairs, 2 * max_seq_length, seed, pack=pack_pairs) if packing else pairs


class PairSplit(Rows):
    """A split's pairs, memory-mapped: pair i is examples 2i and 2i + 1 (of a cache.TokenizedSplit)."""

    def __init__(self, examples: Sequence[Example]):
        super().__init__()
        if len(examples) % 2:
            raise ValueError(f"a split of pairs has an odd number of examples ({len(examples)})")
        self.examples = examples

    def _size(self) -> int:
        return len(self.examples) // 2

    def _row(self, i: int) -> PreferencePair:
        return PreferencePair(self.examples[2 * i], self.examples[2 * i + 1])


def collate_pairs(items: list[PreferencePair | PackedPairs], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of pairs (see the module docstring): unpacked, rows chosen_0, rejected_0, chosen_1, ...
    with attention_mask; packed, one row per PackedPairs with position_ids (padding counts from 0) and no
    attention_mask."""
    import torch  # torch: not for kubetune validate

    packed = [isinstance(item, PackedPairs) for item in items]
    if any(packed) and not all(packed):
        raise ValueError("cannot collate packed and unpacked pairs together")
    if all(packed):
        rows = [(item.input_ids, item.labels, item.lengths) for item in items]
    else:
        rows = [(e.input_ids, e.labels, [len(e)]) for pair in items for e in (pair.chosen, pair.rejected)]
    width = max(len(ids) for ids, _, _ in rows)

    def pad(values: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([row + [value] * (width - len(row)) for row in values], dtype=torch.long)

    numbers, n = [], 0
    for _, _, lengths in rows:
        row = []
        for length in lengths:
            row += [n] * length
            n += 1
        numbers.append(row)
    out = {"input_ids": pad([ids for ids, _, _ in rows], pad_token_id),
           "labels": pad([labels for _, labels, _ in rows], IGNORE)}
    if all(packed):
        out["position_ids"] = torch.tensor(
            [item.position_ids + list(range(width - len(item))) for item in items], dtype=torch.long)
    else:
        out["attention_mask"] = pad([[1] * len(ids) for ids, _, _ in rows], 0)
    out["sequence"] = pad(numbers, PAD_SEQUENCE)
    return out


def blank_pairs(item: PreferencePair | PackedPairs, pad_token_id: int) -> dict[str, torch.Tensor]:
    """A batch shaped like collate_pairs([item]) that trains nothing: labels all IGNORE, sequence all -1 (0 pairs)."""
    batch = collate_pairs([item], pad_token_id)
    batch["labels"].fill_(IGNORE)
    batch["sequence"].fill_(PAD_SEQUENCE)
    return batch


def pair_size(item: PreferencePair | PackedPairs) -> tuple[int, int]:
    """(tokens, pairs) of an item."""
    if isinstance(item, PackedPairs):
        return len(item.input_ids), len(item.lengths) // 2
    return len(item), 1
