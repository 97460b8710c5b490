"""A bounded pool of reusable page-locked host buffers (allocating pinned memory is slow; reuse it).

Owned by whoever stages transfers (stores); thread-safe.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import torch

from ucm.device.backend import Backend
from ucm.errors import PinnedPoolExhaustedError

_MIN_CLASS = 4096


def _size_class(nbytes: int) -> int:
    """Round up to a power of two so buffers of similar sizes are interchangeable."""
    return max(_MIN_CLASS, 1 << (max(nbytes, 1) - 1).bit_length())


class PinnedBufferPool:
    """Hands out uint8 pinned buffers of at least the requested size; total bytes never exceed `max_bytes`."""

    def __init__(self, backend: Backend, max_bytes: int):
        self._backend = backend
        self.max_bytes = max_bytes
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._in_use: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.allocated_bytes = 0

    @property
    def in_use_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._in_use.values())

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A pinned uint8 tensor of exactly `nbytes` (a view of a pooled buffer); give it back with `release`."""
        size = _size_class(nbytes)
        with self._lock:
            if self._free[size]:
                buf = self._free[size].pop()
            else:
                self._make_room(size, nbytes)
                buf = self._backend.alloc_pinned(size)
                self.allocated_bytes += size
            self._in_use[buf.data_ptr()] = buf
        return buf[:nbytes]

    def release(self, view: torch.Tensor) -> None:
        """Return a buffer obtained from `acquire`."""
        with self._lock:
            buf = self._in_use.pop(view.data_ptr())
            self._free[buf.numel()].append(buf)

    def _make_room(self, size: int, requested: int) -> None:
        # Free idle buffers of other sizes before refusing: the bound is on total pinned bytes.
        for cls in sorted(self._free, reverse=True):
            while self.allocated_bytes + size > self.max_bytes and self._free[cls]:
                self.allocated_bytes -= self._free[cls].pop().numel()
        if self.allocated_bytes + size > self.max_bytes:
            in_use = sum(b.numel() for b in self._in_use.values())
            raise PinnedPoolExhaustedError(requested, in_use, self.max_bytes)
