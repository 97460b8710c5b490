"""The two kinds of `StoreTask` the built-in stores return.

- `CopyTask`: the work is device copies (`CopyHandle`s) queued by the calling thread (UcmDram); completion is
  polled from the handles, and a per-part callback publishes/unpins blocks exactly once.
- `ThreadTask`: the work runs on a store's I/O threads (UcmNfsStore); the threads report each part's end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from ucm.device import CopyHandle
from ucm.store.base import StoreTask
from ucm.store.errors import StoreDumpError, StoreLoadError, StoreTransferError, error_line

_ERRORS: dict[str, type[StoreTransferError]] = {"dump": StoreDumpError, "load": StoreLoadError}


class _TaskBase(StoreTask):
    def __init__(self, op: str, block_ids: Sequence[str]):
        super().__init__(block_ids)
        self.op = op
        self._lock = threading.Lock()
        self._failed: dict[str, str] = {}

    def fail(self, block_ids: Sequence[str], reason: str) -> None:
        """Record `block_ids` as failed with `reason` (the first reason per id wins)."""
        with self._lock:
            for block_id in block_ids:
                self._failed.setdefault(block_id, reason)

    @property
    def failed_ids(self) -> list[str]:
        with self._lock:
            failed = self._failed
            if not failed:  # every wait asks: no pass over the task's ids when nothing failed
                return []
            seen: set[str] = set()
            return [b for b in self.block_ids if b in failed and not (b in seen or seen.add(b))]

    @property
    def failure_reasons(self) -> dict[str, str]:
        with self._lock:
            return dict(self._failed)

    def _raise_on_failure(self) -> None:
        self._raise_if_failed(_ERRORS[self.op])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.op}, {len(self.block_ids)} blocks, failed={len(self._failed)})"


class _CopyPart:
    """One device copy plus what to do once it has ended (publish, unpin), run exactly once.

    A copy whose handle raises (a device fault reported when polled or waited on) has ended too: its blocks
    (``block_ids()``, only asked then) are failed with the error and ``on_complete`` gets that sentence (None after
    a copy that succeeded)."""

    def __init__(self, task: CopyTask, handle: CopyHandle, on_complete: Callable[[str | None], None],
                 block_ids: Callable[[], Sequence[str]]):
        self.task, self.handle, self.on_complete, self.block_ids = task, handle, on_complete, block_ids
        self.lock = threading.Lock()
        self.finished = False

    def finish(self, block: bool) -> bool:
        with self.lock:  # held while completing, so no caller sees the task done before on_complete ran
            if self.finished:
                return True
            error = None
            try:
                if block:
                    self.handle.wait()
                elif not self.handle.done():
                    return False
            except Exception as exc:
                error = f"device copy failed: {error_line(exc)}"
                self.task.fail(self.block_ids(), error)
            try:
                self.on_complete(error)
            finally:
                self.finished = True
                self.task = None  # no cycle task -> part -> task
            return True


class CopyTask(_TaskBase):
    """Device copies in flight; each part's ``on_complete`` runs once, in whichever thread first sees it end."""

    def __init__(self, op: str, block_ids: Sequence[str]):
        super().__init__(op, block_ids)
        self._parts: list[_CopyPart] = []

    def add_part(
        self, handle: CopyHandle, on_complete: Callable[[str | None], None], block_ids: Callable[[], Sequence[str]]
    ) -> None:
        """Track one copy; ``on_complete(error)`` runs once it has ended (error None: success). `block_ids` gives
        the ids the copy moves, asked only when it failed (so a large load builds no list on the way)."""
        with self._lock:
            self._parts.append(_CopyPart(self, handle, on_complete, block_ids))

    def _finish_parts(self, block: bool) -> bool:
        with self._lock:
            parts = list(self._parts)
        return all([part.finish(block) for part in parts])

    def done(self) -> bool:
        return self._finish_parts(block=False)

    def wait(self, timeout: float | None = None) -> None:
        if timeout is None:
            self._finish_parts(block=True)
        else:
            deadline = time.monotonic() + timeout
            while not self._finish_parts(block=False):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{self.op} of {len(self.block_ids)} blocks not done after {timeout} s")
                time.sleep(0.0005)
        self._raise_on_failure()


class ThreadTask(_TaskBase):
    """Work split into `parts` jobs on I/O threads; each job calls `part_done()` exactly once."""

    def __init__(self, op: str, block_ids: Sequence[str], parts: int):
        super().__init__(op, block_ids)
        self._remaining = parts
        self._cond = threading.Condition(self._lock)

    def part_done(self) -> None:
        with self._cond:
            self._remaining -= 1
            if self._remaining <= 0:
                self._cond.notify_all()

    def done(self) -> bool:
        with self._lock:
            return self._remaining <= 0

    def wait(self, timeout: float | None = None) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._remaining <= 0, timeout):
                raise TimeoutError(f"{self.op} of {len(self.block_ids)} blocks not done after {timeout} s")
        self._raise_on_failure()
