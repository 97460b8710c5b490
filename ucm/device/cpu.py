"""CPU backend: the reference every other backend is checked against.

Work on the CPU runs synchronously in the calling thread, so streams are PyTorch's CPU stream objects (no-ops),
events are always complete and "pinned" buffers are ordinary host memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ucm.device.backend import Backend


class _CompletedEvent:
    """An event for synchronous work: it has always happened."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


class CpuBackend(Backend):
    name = "cpu"
    device_type = "cpu"

    def __init__(self, device_index: int | None = None):
        self.device = torch.device("cpu")

    def current_stream(self) -> torch.Stream:
        return torch.Stream(device="cpu")

    @contextlib.contextmanager
    def use_stream(self, stream: torch.Stream | None) -> Iterator[None]:
        yield

    def record_event(self, stream: torch.Stream | None = None) -> _CompletedEvent:
        return _CompletedEvent()

    def wait_event(self, event: object, stream: torch.Stream | None = None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def alloc_pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)
