"""Packing several examples into one sequence, and collating sequences into padded batches."""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import torch

from .tokenize import IGNORE, Example


@dataclass
class PackedExample:
    """Examples laid end to end. position_ids restart at 0 for each one, which transformers turns into a
    block-diagonal causal mask (when no attention_mask is passed), so samples never attend to each other."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    lengths: list[int]  # the length of each packed example, in order

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_examples(examples: list[Example], max_seq_length: int,
                  seed: int | None = None) -> list[PackedExample]:
    """Best-fit-decreasing packing: longest examples first, each into the fullest sequence it still fits in.

    No example is split. With a seed the packed sequences are shuffled, so the order is not by length.
    """
    too_long = [len(e) for e in examples if len(e) > max_seq_length]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than max_seq_length {max_seq_length}")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in order:
        size = len(examples[i])
        if size == 0:
            continue
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            space, b = free.pop(at)
        else:
            space, b = max_seq_length, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (space - size, b))
    if seed is not None:
        random.Random(seed).shuffle(bins)
    return [_pack([examples[i] for i in members]) for members in bins]


def _pack(examples: list[Example]) -> PackedExample:
    packed = PackedExample([], [], [], [])
    for e in examples:
        packed.input_ids += e.input_ids
        packed.labels += [IGNORE] + e.labels[1:]  # a first token cannot be predicted from another sample
        packed.position_ids += range(len(e))
        packed.lengths.append(len(e))
    return packed


def collate(batch: list[Example | PackedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sequence. Padding gets label IGNORE.

    Packed: input_ids, labels, position_ids (padding counts from 0, as a sample of its own) and no
    attention_mask. Unpacked: input_ids, labels, attention_mask.
    """
    packed = [isinstance(s, PackedExample) for s in batch]
    if any(packed) and not all(packed):
        raise ValueError("cannot collate packed and unpacked sequences together")
    width = max(len(s.input_ids) for s in batch)

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)

    out = {"input_ids": pad([s.input_ids for s in batch], pad_token_id),
           "labels": pad([s.labels for s in batch], IGNORE)}
    if all(packed):
        out["position_ids"] = torch.tensor(
            [s.position_ids + list(range(width - len(s))) for s in batch], dtype=torch.long)
    else:
        out["attention_mask"] = pad([[1] * len(s.input_ids) for s in batch], 0)
    return out
