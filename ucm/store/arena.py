"""UcmDram's arena: fixed-size rows of pinned host memory, held in a few chunks of power-of-two bytes.

Torch's pinned host allocators (CUDA's caching host allocator among them) round every allocation up to the next
power of two and lock all of it: one 66 GiB buffer asks the host for 128 GiB and fails on a 128 GiB machine. The
arena asks for the largest power of two that fits, then the largest that fits the rest, and so on (at most
`MAX_CHUNKS`; the last chunk takes what remains and rounds up by less than 1/16 of the size). Each chunk holds whole
rows, so what is locked is what was asked plus less than a row per chunk. A copy touching several chunks is one copy
per chunk (`groups`), each its own part of the store's task, so a fault fails only the blocks of its chunk.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import numpy as np
import torch

#: Greedy power-of-two chunks before the remainder (< 1/16 of the size after four) is taken as one.
MAX_CHUNKS = 5


def chunk_rows(rows: int, row_bytes: int) -> list[int]:
    """How many rows each chunk of an arena of `rows` rows holds (see the module docstring)."""
    sizes: list[int] = []
    left = rows
    while left > 0:
        if len(sizes) == MAX_CHUNKS - 1:
            sizes.append(left)
            break
        fits = (1 << ((left * row_bytes).bit_length() - 1)) // row_bytes  # rows in the largest power of two <= rest
        take = min(left, max(1, fits))
        sizes.append(take)
        left -= take
    return sizes


class PinnedArena:
    """`rows` rows of `row_bytes` pinned bytes, addressed by a global row index in ``[0, rows)``."""

    def __init__(self, alloc: Callable[[int], torch.Tensor], rows: int, row_bytes: int):
        """`alloc(nbytes)` returns a pinned uint8 buffer (a `Backend.alloc_pinned`); its errors propagate."""
        self.rows, self.row_bytes = rows, row_bytes
        self.chunks: list[torch.Tensor] = []
        for n in chunk_rows(rows, row_bytes):
            self.chunks.append(alloc(n * row_bytes).view(n, row_bytes))
        self._ends = np.cumsum([len(c) for c in self.chunks], dtype=np.int64)
        self._starts = self._ends - np.array([len(c) for c in self.chunks], dtype=np.int64)
        self._end_list = self._ends.tolist()  # `chunk_of` runs per block under the store's lock: plain bisect

    def chunk_of(self, row: int) -> int:
        """The chunk holding global `row`."""
        return bisect.bisect_right(self._end_list, row)

    def groups(self, rows: Sequence[int] | np.ndarray) -> list[np.ndarray | None]:
        """Positions in `rows` grouped by chunk (None: all of them, in one chunk)."""
        if len(self.chunks) == 1:
            return [None]
        which = np.searchsorted(self._ends, np.asarray(rows, dtype=np.int64), side="right")
        found = np.unique(which)
        return [None] if len(found) == 1 else [np.flatnonzero(which == c) for c in found.tolist()]

    def locate(self, rows: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """The chunk holding all of `rows` (not empty, one chunk) and their rows inside it."""
        rows = np.asarray(rows, dtype=np.int64)
        c = self.chunk_of(int(rows[0]))
        local = rows - self._starts[c]
        if local.min() < 0 or local.max() >= len(self.chunks[c]):
            raise ValueError("PinnedArena.locate: rows of several chunks")
        return self.chunks[c], local
