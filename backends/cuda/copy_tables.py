"""Pinned tables for the copy-list kernel (`ucm.kernels.copy_list`): the kernel reads its table from pinned host
memory while it runs, so a table is reused only once the event recorded after its launch is done.

Why a pool of our own: a table taken from torch's pinned allocator per launch would be reused only when that
allocator sees the launch's stream done, and a held stream (`stream_gate`) may not be; a new pinned allocation
(cudaHostAlloc) then waits for every stream, the held one too. Here new tables are made only while the pool grows
(the first launches; sizes double), so steady loads allocate nothing.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import torch

#: the smallest table made (int64 entries: three per copy)
MIN_ENTRIES = 1 << 15


class CopyTables:
    def __init__(self, pinned: bool = True) -> None:
        self._pinned = pinned  # False only for kernels run on CPU tensors (Triton's interpreter)
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []
        self._busy: collections.deque[tuple[torch.Tensor, Any]] = collections.deque()  # (table, its launch's event)
        #: tables made so far (tests and benchmarks read it)
        self.made = 0

    def take(self, entries: int) -> torch.Tensor:
        """A pinned int64 table of at least ``entries`` entries that no pending launch reads."""
        with self._lock:
            while self._busy and self._busy[0][1].query():
                self._free.append(self._busy.popleft()[0])
            fitting = [i for i, t in enumerate(self._free) if t.numel() >= entries]
            if fitting:
                return self._free.pop(fitting[0])
            self.made += 1
        size = max(MIN_ENTRIES, 1 << (max(entries, 1) - 1).bit_length())
        return torch.empty(size, dtype=torch.int64, pin_memory=self._pinned)

    def give_back(self, table: torch.Tensor, event: Any) -> None:
        """``table`` is read by the work before ``event`` (recorded after the launch): free once it is done."""
        with self._lock:
            self._busy.append((table, event))
