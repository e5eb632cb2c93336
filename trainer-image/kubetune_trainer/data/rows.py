"""Rows: a list-like view (ints, slices) over rows read from memory maps only when asked for."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np


class Rows(Sequence):
    """Indexable like a list (ints, slices), reading rows from the memory map only when asked. Subclasses say how
    many rows there are (`_size`) and how to read one (`_row`)."""

    def __init__(self, index: np.ndarray | None = None):
        self._index = index

    def __len__(self) -> int:
        return self._size() if self._index is None else len(self._index)

    def __getitem__(self, i):
        if isinstance(i, slice):  # a view: the rows it selects, nothing read yet
            view = copy.copy(self)
            view._index = np.arange(self._size())[i] if self._index is None else self._index[i]
            return view
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._row(int(i if self._index is None else self._index[i]))

    def _size(self) -> int:
        raise NotImplementedError

    def _row(self, i: int):
        raise NotImplementedError
