"""A sparse id -> file offset index of one segment (pure; no I/O).

One point is kept per ``stride`` bytes of segment, so finding an id costs a bisect plus a scan
of at most about ``stride`` bytes, while memory stays at 16 bytes per point.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from typing import Tuple

DEFAULT_STRIDE = 4096


class SparseIndex:
    __slots__ = ("ids", "offsets", "stride", "_last_offset")

    def __init__(self, stride: int = DEFAULT_STRIDE) -> None:
        self.ids = array("Q")
        self.offsets = array("Q")
        self.stride = stride
        self._last_offset = -stride

    def add(self, start_id: int, offset: int) -> None:
        """Record a frame starting at ``offset``; kept only if far enough from the last point."""
        if offset - self._last_offset >= self.stride:
            self.ids.append(start_id)
            self.offsets.append(offset)
            self._last_offset = offset

    def floor(self, seq_id: int) -> Tuple[int, int]:
        """(start id, offset) of the last recorded frame starting at or before ``seq_id``."""
        i = bisect_right(self.ids, seq_id) - 1
        if i < 0:
            raise KeyError(seq_id)
        return self.ids[i], self.offsets[i]

    def __len__(self) -> int:
        return len(self.ids)
