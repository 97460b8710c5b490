"""Typed errors shared by every layer. Each carries the offending value so a message names what to fix."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class UcmError(Exception):
    """Base class of every error raised by ucm."""


class UcmConfigError(UcmError, ValueError):
    """A configuration field has a bad value. The message names the field, the value and what is allowed."""

    def __init__(self, field: str, value: Any, allowed: str | Iterable[str]):
        if not isinstance(allowed, str):
            allowed = "one of " + ", ".join(repr(a) for a in allowed)
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"invalid {field}={value!r}: expected {allowed}")


class BackendUnavailableError(UcmError, RuntimeError):
    """The requested device backend cannot run in this process (the message says why)."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"device backend {name!r} is unavailable: {reason}")


class PinnedPoolExhaustedError(UcmError, MemoryError):
    """A pinned host buffer was requested beyond the pool's byte bound."""

    def __init__(self, requested: int, in_use: int, max_bytes: int):
        self.requested, self.in_use, self.max_bytes = requested, in_use, max_bytes
        super().__init__(
            f"pinned pool exhausted: requested {requested} B with {in_use} B in use, bound is {max_bytes} B"
        )
