"""Typed errors of the KV stores. Raised by `ucm.store` classes; caught by the connector, which turns failed load
ids into blocks vLLM recomputes and failed dump ids into blocks that are simply not cached."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ucm.errors import UcmError


class StoreError(UcmError, RuntimeError):
    """Base class of store failures (configuration mistakes raise `ucm.errors.UcmConfigError` instead)."""


class StoreTransferError(StoreError):
    """Some blocks of a dump or load failed. ``failed_ids`` lists them in request order; ``reasons`` maps each to
    a sentence (missing, checksum mismatch, truncated, ENOSPC on /dir, read-only file system, store full...)."""

    op = "transfer"

    def __init__(self, failed_ids: Sequence[str], reasons: Mapping[str, str]):
        self.failed_ids = list(failed_ids)
        self.reasons = dict(reasons)
        shown = "; ".join(f"{b}: {self.reasons.get(b, 'failed')}" for b in self.failed_ids[:4])
        more = f" (+{len(self.failed_ids) - 4} more)" if len(self.failed_ids) > 4 else ""
        super().__init__(f"{self.op} failed for {len(self.failed_ids)} block(s): {shown}{more}")


class StoreLoadError(StoreTransferError):
    """`load` could not deliver some blocks; their destination pages were not written (or must be recomputed)."""

    op = "load"


class StoreDumpError(StoreTransferError):
    """`dump` could not publish some blocks; they are not visible to `lookup`."""

    op = "dump"


class StoreClosedError(StoreError):
    """An operation was started on a store after `close()`."""

    def __init__(self, name: str):
        super().__init__(f"store {name} is closed")


def error_line(exc: BaseException) -> str:
    """An exception as one line for a failure reason: its type and first message line (CUDA adds advice)."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
