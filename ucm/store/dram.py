"""UcmDram: KV blocks in a pinned host-memory arena of this process, bounded by ``max_cache_size``.

Built by `ucm.store.create_store("UcmDram", ...)`; used by the connector's worker side. The arena is one
``[rows, kv_block_size]`` uint8 pinned buffer; a block owns one row. Dumps gather straight from the paged cache
into arena rows and loads scatter straight out of them (one batched copy per call, on a side stream), so
nothing is staged twice. When the arena is full, the least-recently-used published block that no load is
reading is evicted.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ucm.device import Backend, CopyHandle
from ucm.errors import UcmConfigError
from ucm.store.base import BlockPages, KVStoreBase, StoreStats, StoreTask
from ucm.store.config import get_int
from ucm.store.errors import StoreClosedError
from ucm.store.naming import check_block_id
from ucm.store.task import CopyTask


class _Entry:
    __slots__ = ("row", "pins")

    def __init__(self, row: int):
        self.row = row
        self.pins = 0  # loads in flight reading this row


class _Pending:
    """A block whose dump copy is in flight; `handle` is set once the copy is queued."""

    __slots__ = ("row", "handle")

    def __init__(self, row: int):
        self.row = row
        self.handle: CopyHandle | None = None


class _OtherDump:
    """Completion of blocks another task is dumping, so a second dump of a block ends only once it is stored."""

    def __init__(self, store: DramStore, pending: list[_Pending]):
        self._store, self._pending = store, pending

    def done(self) -> bool:
        with self._store._lock:  # handle is None until the other thread has queued its copy
            handles = [p.handle for p in self._pending]
        return all(h is not None and h.done() for h in handles)

    def wait(self) -> None:
        while not self.done():
            time.sleep(0.0002)


class DramStore(KVStoreBase):
    name = "UcmDram"
    config_fields = {
        "max_cache_size": "int bytes of pinned host memory, >= kv_block_size (required)",
        "kv_block_size": "int bytes of one stored block = one vLLM block of all layers of the worker (required)",
    }

    def __init__(self, config: Mapping[str, Any], backend: Backend):
        block = get_int(config, "kv_block_size")
        size = get_int(config, "max_cache_size")
        if size < block:
            raise UcmConfigError("max_cache_size", size, f"an int >= kv_block_size ({block} B): one block must fit")
        super().__init__(config, backend)
        self.capacity_blocks = size // block
        self._arena = backend.alloc_pinned(self.capacity_blocks * block).view(self.capacity_blocks, block)
        self._stream = backend.new_stream()
        self._lock = threading.Lock()
        self._published: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # LRU order, oldest first
        self._pending: dict[str, _Pending] = {}  # dumps in flight
        self._free_rows = list(range(self.capacity_blocks - 1, -1, -1))
        self._inflight: list[CopyTask] = []
        self._stats = StoreStats(capacity_bytes=self.capacity_blocks * block)
        self._closed = False

    # ------------------------------------------------------------------ queries
    def lookup(self, block_ids: Sequence[str]) -> list[bool]:
        self._reap()
        with self._lock:
            self._check_open()
            hits = [check_block_id(b) in self._published for b in block_ids]
            self._stats.lookup_hits += sum(hits)
            self._stats.lookup_misses += len(hits) - sum(hits)
        return hits

    # ------------------------------------------------------------------ transfers
    def dump(self, block_ids: Sequence[str], source: BlockPages) -> StoreTask:
        block_ids = [check_block_id(b) for b in block_ids]
        source.check(len(block_ids), self.kv_block_size, whole_row=True)
        self._reap()
        task = CopyTask("dump", block_ids)
        picks: list[int] = []
        rows: list[int] = []
        ids: list[str] = []
        mine: list[_Pending] = []
        others: list[_Pending] = []
        with self._lock:
            self._check_open()
            for i, block_id in enumerate(block_ids):
                if block_id in self._published:
                    self._published.move_to_end(block_id)
                    self._stats.dumps_skipped += 1
                elif block_id in self._pending:
                    others.append(self._pending[block_id])
                    self._stats.dumps_skipped += 1
                else:
                    row = self._take_row()
                    if row is None:
                        reason = f"UcmDram full: all {self.capacity_blocks} rows are being loaded or dumped"
                        task.fail([block_id], reason)
                        self._stats.dump_failures += 1
                        continue
                    self._pending[block_id] = pending = _Pending(row)
                    mine.append(pending)
                    picks.append(i)
                    rows.append(row)
                    ids.append(block_id)
        if ids:
            slots = source.slots.index_select(0, torch.tensor(picks, dtype=torch.int64, device=source.slots.device))
            rows_t = torch.tensor(rows, dtype=torch.int64)
            try:
                handle = self.backend.gather_blocks(source.cache, slots, self._arena, rows=rows_t, stream=self._stream)
            except Exception as exc:
                self._publish(ids, rows, ok=False)
                task.fail(ids, f"device gather failed: {exc}")
            else:
                with self._lock:
                    for pending in mine:
                        pending.handle = handle
                task.add_part(handle, lambda: self._publish(ids, rows, ok=True))
        if others:
            task.add_part(_OtherDump(self, others), lambda: None)
        return self._track(task)

    def load(self, block_ids: Sequence[str], destination: BlockPages) -> StoreTask:
        block_ids = [check_block_id(b) for b in block_ids]
        destination.check(len(block_ids), self.kv_block_size, whole_row=False)
        self._reap()
        task = CopyTask("load", block_ids)
        picks: list[int] = []
        entries: list[_Entry] = []
        missing: list[str] = []
        with self._lock:
            self._check_open()
            for i, block_id in enumerate(block_ids):
                entry = self._published.get(block_id)
                if entry is None:
                    missing.append(block_id)
                    continue
                self._published.move_to_end(block_id)
                entry.pins += 1
                picks.append(i)
                entries.append(entry)
            self._stats.load_failures += len(missing)
        if missing:
            task.fail(missing, "not in UcmDram (never dumped, evicted, or its dump has not finished)")
        if entries:
            slots = destination.slots.index_select(
                0, torch.tensor(picks, dtype=torch.int64, device=destination.slots.device)
            )
            rows_t = torch.tensor([e.row for e in entries], dtype=torch.int64)
            start = destination.row_offset
            src = self._arena[:, start : start + destination.row_bytes]
            try:
                handle = self.backend.scatter_blocks(src, destination.cache, slots, rows=rows_t, stream=self._stream)
            except Exception as exc:
                self._unpin(entries, 0)
                task.fail([block_ids[i] for i in picks], f"device scatter failed: {exc}")
            else:
                nbytes = destination.row_bytes * len(entries)
                task.add_part(handle, lambda: self._unpin(entries, nbytes))
        return self._track(task)

    # ------------------------------------------------------------------ housekeeping
    def stats(self) -> StoreStats:
        self._reap()
        with self._lock:
            snapshot = StoreStats(**self._stats.as_dict())
            snapshot.stored_blocks = len(self._published)
            snapshot.used_bytes = snapshot.stored_blocks * self.kv_block_size
        return snapshot

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            tasks, self._inflight = self._inflight, []
        for task in tasks:
            task._finish_parts(block=True)
        with self._lock:
            self._published.clear()
            self._arena = None

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(self.name)

    def _take_row(self) -> int | None:
        """A free row, evicting the least-recently-used unpinned published block if needed (lock held)."""
        if self._free_rows:
            return self._free_rows.pop()
        for block_id, entry in self._published.items():
            if entry.pins == 0:
                del self._published[block_id]
                self._stats.evictions += 1
                return entry.row
        return None

    def _publish(self, ids: list[str], rows: list[int], ok: bool) -> None:
        with self._lock:
            for block_id, row in zip(ids, rows, strict=True):
                del self._pending[block_id]
                if ok and not self._closed:
                    self._published[block_id] = _Entry(row)
                else:
                    self._free_rows.append(row)
            if ok:
                self._stats.blocks_dumped += len(ids)
                self._stats.bytes_dumped += len(ids) * self.kv_block_size
            else:
                self._stats.dump_failures += len(ids)

    def _unpin(self, entries: list[_Entry], nbytes: int) -> None:
        with self._lock:
            for entry in entries:
                entry.pins -= 1
            if nbytes:
                self._stats.blocks_loaded += len(entries)
                self._stats.bytes_loaded += nbytes

    def _track(self, task: CopyTask) -> CopyTask:
        if not task.done():
            with self._lock:
                self._inflight.append(task)
        return task

    def _reap(self) -> None:
        """Finish tasks whose copies have ended, so dumps are published even if nobody polls their task."""
        with self._lock:
            tasks = list(self._inflight)
        finished = [t for t in tasks if t.done()]
        if finished:
            with self._lock:
                self._inflight = [t for t in self._inflight if t not in finished]
