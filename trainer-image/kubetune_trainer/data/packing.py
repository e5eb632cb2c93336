"""Packing several examples into one sequence, and collating sequences into padded batches."""

from __future__ import annotations

import bisect
import heapq
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .tokenize import IGNORE, Example

if TYPE_CHECKING:
    import torch


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


def pack_examples(examples: list, max_seq_length: int, seed: int | None = None, pack=None) -> list:
    """The examples packed by pack_plan, each group laid end to end by `pack` (default pack_sequence; preference
    pairs: preference.pack_pairs)."""
    pack = pack or pack_sequence
    members, bounds = pack_plan(np.array([len(e) for e in examples], dtype=np.int64), max_seq_length, seed)
    return [pack([examples[i] for i in members[bounds[b]:bounds[b + 1]]]) for b in range(len(bounds) - 1)]


def pack_plan(lengths: np.ndarray, max_seq_length: int, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing packing of examples of these lengths: longest first, each into the fullest sequence it
    still fits in (the lowest-numbered of equals). No example is split; empty ones are left out. With a seed the
    sequences are shuffled, so the order is not by length.

    Returns index arrays, not lists: sequence b holds the examples members[bounds[b]:bounds[b + 1]]. The free
    space of open sequences is kept per distinct value (at most max_seq_length of them), so a million examples
    pack in seconds."""
    lengths = np.asarray(lengths)
    if (lengths > max_seq_length).any():
        raise ValueError(f"{int((lengths > max_seq_length).sum())} examples are longer than max_seq_length "
                         f"{max_seq_length}")
    order = np.argsort(-lengths, kind="stable")
    order = order[lengths[order] > 0]
    spaces: list[int] = []  # distinct free space of open sequences, sorted
    bins_with: dict[int, list[int]] = {}  # free space -> heap of the sequences with that much left
    assigned = np.empty(len(order), dtype=np.int64)
    bins = 0
    for k, size in enumerate(lengths[order].tolist()):
        at = bisect.bisect_left(spaces, size)
        if at < len(spaces):
            space = spaces[at]
            b = heapq.heappop(bins_with[space])
            if not bins_with[space]:
                del spaces[at], bins_with[space]
        else:
            space, b = max_seq_length, bins
            bins += 1
        assigned[k] = b
        left = space - size
        if left not in bins_with:
            bisect.insort(spaces, left)
            bins_with[left] = []
        heapq.heappush(bins_with[left], b)
    position = np.arange(bins)
    if seed is not None:
        shuffled = list(range(bins))
        random.Random(seed).shuffle(shuffled)
        position[shuffled] = np.arange(bins)
    key = position[assigned]
    members = order[np.argsort(key, kind="stable")].astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(np.bincount(key, minlength=bins))]).astype(np.int64)
    return members, bounds


def pack_sequence(examples: list[Example]) -> PackedExample:
    """Examples laid end to end as one packed sequence, in order."""
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
    import torch  # torch: not for kubetune validate

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
