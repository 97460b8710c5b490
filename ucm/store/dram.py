"""UcmDram: KV blocks in a pinned host-memory arena of this process, bounded by ``max_cache_size``.

Built by `ucm.store.create_store("UcmDram", ...)`; used by the connector's worker side. The arena is one
``[rows, kv_block_size]`` uint8 pinned rows (`PinnedArena`: a few power-of-two chunks, so the host locks what was
asked); a block owns one row. All copies are queued on the store's side stream, ordered after the caller's queued
work; background loads (`BlockPages.background`) on a second one (`_load_stream`), so a caller holding its stream
until later (`Backend.hold_stream`) holds only those. Two ways across PCIe (``transfer``):
- ``kernel``: one batched copy kernel reads/writes the arena rows directly (zero-copy); also used for host caches
  and for sub-range (one-layer) loads;
- ``dma`` (``auto`` for device caches): a batched copy kernel between the cache and a small device staging buffer
  (HBM speed, brief) plus one DMA per run of consecutive arena rows on the copy engines, so compute running on
  other streams keeps the SMs (the zero-copy kernel holds them for the whole PCIe transfer).
When the arena is full, the least-recently-used published block that no load is reading is evicted.
Faults never leave a task waiting: a dump whose copy fails frees its rows and fails its blocks, and so does a second
dump of those blocks waiting on it; `close` waits for the calls queuing copies and for the copies in flight.
"""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ucm.device import Backend, CopyHandle
from ucm.store.arena import PinnedArena
from ucm.store.base import BlockPages, KVStoreBase, StoreStats, StoreTask
from ucm.store.config import MAX_KV_BLOCK_SIZE, config_error, get_choice, get_int, get_pinned_size
from ucm.store.errors import StoreClosedError, StoreDumpError, error_line
from ucm.store.naming import check_block_id
from ucm.store.task import CopyTask

_DEVICE_STAGING_BYTES = 64 << 20  # device memory of the 'dma' transfer; chunks larger calls


def _runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """Split arena rows into runs of consecutive rows: (first index, end index, first row)."""
    breaks = (np.flatnonzero(np.diff(rows) != 1) + 1).tolist()
    return [(i0, i1, int(rows[i0])) for i0, i1 in zip([0, *breaks], [*breaks, len(rows)], strict=True)]


class _Entry:
    __slots__ = ("row", "pins")

    def __init__(self, row: int):
        self.row = row
        self.pins = 0  # loads in flight reading this row


class _Pending:
    """The blocks one `dump` call is copying into the arena. `settled` is set once that dump has published them
    or failed (then `error` says why), on every path, so a second dump of one of them never waits forever."""

    __slots__ = ("owner", "settled", "error")

    def __init__(self, owner: CopyTask):
        self.owner = owner
        self.settled = threading.Event()
        self.error: str | None = None


class _Pinned:
    """A `DramStore.pin`: the entries it holds (None where the id was not stored) and their arena rows."""

    __slots__ = ("block_ids", "entries", "rows", "released")

    def __init__(self, block_ids: list[str], entries: list[_Entry | None]):
        self.block_ids = block_ids
        self.entries = entries
        self.rows = np.fromiter((-1 if e is None else e.row for e in entries), dtype=np.int64, count=len(entries))
        self.released = False


class _OtherDump:
    """Completion of blocks other dumps are copying: a second dump of a block ends once the first has settled."""

    def __init__(self, pending: list[_Pending]):
        self._pending = list({id(p): p for p in pending}.values())

    def done(self) -> bool:
        for p in self._pending:
            if not p.settled.is_set():
                p.owner.done()  # publishes the first dump's blocks once its copy has ended, even if nobody polls it
        return all(p.settled.is_set() for p in self._pending)

    def wait(self) -> None:
        for p in self._pending:
            while not p.settled.is_set():
                try:
                    p.owner.wait()
                except StoreDumpError:
                    pass  # settled with its error
                p.settled.wait(0.001)  # the owner may still be queuing its copy


class DramStore(KVStoreBase):
    name = "UcmDram"
    background_apart = True
    config_fields = {
        "max_cache_size": "int bytes of pinned host memory, >= kv_block_size (required)",
        "kv_block_size": "int bytes of one stored block = one vLLM block of all layers of the worker (required)",
        "transfer": "how whole blocks cross PCIe: 'kernel' (the device layer's copy reading/writing pinned memory "
        "directly), "
        "'dma' (a copy kernel into device staging + DMA on the copy engines, leaves the SMs to compute) or "
        "'auto' (dma for device caches; default)",
    }

    def __init__(self, config: Mapping[str, Any], backend: Backend):
        block = get_int(config, "kv_block_size", maximum=MAX_KV_BLOCK_SIZE)
        checked = self.check_values(config)
        size, self.transfer = checked["max_cache_size"], checked["transfer"]
        super().__init__(config, backend)
        self.capacity_blocks = size // block
        self._arena = self._alloc_arena(size)
        self._stream = backend.new_stream()
        self._background_stream = backend.new_stream()
        self._staging_rows = max(1, _DEVICE_STAGING_BYTES // block)
        self._staging: dict[torch.device, torch.Tensor] = {}  # device staging of the 'dma' transfer
        self._issue_lock = threading.Lock()  # one thread at a time queues copies through the device staging
        self._lock = threading.Lock()
        self._published: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # LRU order, oldest first
        self._pending: dict[str, _Pending] = {}  # dumps in flight
        self._free_rows = list(range(self.capacity_blocks - 1, -1, -1))
        self._inflight: list[CopyTask] = []
        self._busy = 0  # calls between `_begin` and `_end`
        self._idle = threading.Condition(self._lock)
        self._stats = StoreStats(capacity_bytes=self.capacity_blocks * block)
        self._closed = False

    @classmethod
    def check_values(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        block = get_int(config, "kv_block_size", None, maximum=MAX_KV_BLOCK_SIZE)
        size = get_pinned_size(config, "max_cache_size")
        if block is not None and size < block:
            raise config_error("max_cache_size", size, f"an int >= kv_block_size ({block} B): one block must fit")
        return {"max_cache_size": size, "transfer": get_choice(config, "transfer", "auto", ["auto", "kernel", "dma"])}

    def _alloc_arena(self, size: int) -> PinnedArena:
        """The pinned arena; a size this machine cannot pin is the user's config to fix, said as such."""
        try:
            return PinnedArena(self.backend.alloc_pinned, self.capacity_blocks, self.kv_block_size)
        except (RuntimeError, MemoryError) as exc:  # torch.AcceleratorError (CUDA OOM) is a RuntimeError
            raise config_error(
                "max_cache_size", size,
                f"an amount of host memory this machine can pin: {size / 2**30:.1f} GiB was asked and allocating "
                f"it failed ({error_line(exc)})",
            ) from exc

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
        source.check(len(block_ids), self.kv_block_size, whole_row=True, block_ids=block_ids)
        self._reap()
        task = CopyTask("dump", block_ids)
        claims: dict[int, tuple[_Pending, list[int], list[str], list[int]]] = {}  # per arena chunk
        others: list[_Pending] = []
        other_ids: list[str] = []
        with self._lock:
            self._begin()
            for i, block_id in enumerate(block_ids):
                if block_id in self._published:
                    self._published.move_to_end(block_id)
                    self._stats.dumps_skipped += 1
                elif block_id in self._pending:
                    if self._pending[block_id].owner is not task:  # else: listed twice in this call, copied once
                        others.append(self._pending[block_id])
                        other_ids.append(block_id)
                    self._stats.dumps_skipped += 1
                else:
                    row = self._take_row()
                    if row is None:
                        reason = f"UcmDram full: all {self.capacity_blocks} rows are being loaded or dumped"
                        task.fail([block_id], reason)
                        self._stats.dump_failures += 1
                        continue
                    chunk = self._arena.chunk_of(row)
                    if chunk not in claims:
                        claims[chunk] = (_Pending(task), [], [], [])
                    mine, picks, ids, rows = claims[chunk]
                    self._pending[block_id] = mine
                    picks.append(i)
                    ids.append(block_id)
                    rows.append(row)
        try:
            interrupted: BaseException | None = None
            for mine, picks, ids, rows in claims.values():
                if interrupted is None:
                    try:
                        self._queue_dump(task, mine, source, picks, ids, rows)
                    except BaseException as exc:  # settles its own claims; the later chunks' are settled below
                        interrupted = exc
                else:
                    reason = f"device gather interrupted: {error_line(interrupted)}"
                    task.fail(ids, reason)
                    self._publish(mine, ids, rows, error=reason)
            if interrupted is not None:
                raise interrupted
            if others:
                on_settled = functools.partial(self._check_others, task, other_ids, others)
                task.add_part(_OtherDump(others), on_settled, lambda: other_ids)
        finally:
            self._end(task)
        return task

    def _queue_dump(
        self, task: CopyTask, mine: _Pending, source: BlockPages, picks: list[int], ids: list[str], rows: list[int]
    ) -> None:
        """Queue the copy of the claimed blocks; on any error release their rows and settle `mine` failed."""
        try:
            picks_t = torch.tensor(picks, dtype=torch.int64, device=source.slots.device)
            handle = self._to_arena(source, source.slots.index_select(0, picks_t), rows)
        except BaseException as exc:  # even an interrupt must settle the claims that other dumps may wait on
            reason = f"device gather failed: {error_line(exc)}"
            task.fail(ids, reason)
            self._publish(mine, ids, rows, error=reason)
            if not isinstance(exc, Exception):
                raise
        else:
            task.add_part(handle, lambda error: self._publish(mine, ids, rows, error), lambda: ids)

    def _check_others(self, task: CopyTask, ids: list[str], others: list[_Pending], _: str | None) -> None:
        """Fail the ids whose dump by another task failed (they are not stored)."""
        for block_id, pending in zip(ids, others, strict=True):
            if pending.error is not None:
                task.fail([block_id], f"another task's dump of this block failed: {pending.error}")

    def load(self, block_ids: Sequence[str], destination: BlockPages) -> StoreTask:
        block_ids = [check_block_id(b) for b in block_ids]
        destination.check(len(block_ids), self.kv_block_size, whole_row=False, block_ids=block_ids)
        self._reap()
        task = CopyTask("load", block_ids)
        picks: list[int] = []
        entries: list[_Entry] = []
        missing: list[str] = []
        with self._lock:
            self._begin()
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
        try:
            if missing:
                task.fail(missing, "not in UcmDram (never dumped, evicted, or its dump has not finished)")
            rows = [e.row for e in entries]
            groups = self._arena.groups(rows) if entries else []
            for n, group in enumerate(groups):
                try:
                    self._queue_load(task, destination, block_ids, picks, entries, rows, group)
                except BaseException:  # an interrupt: the later chunks' blocks are unpinned and failed too
                    for rest in groups[n + 1 :]:
                        self._unpin([entries[j] for j in rest.tolist()], 0)
                        task.fail([block_ids[picks[j]] for j in rest.tolist()], "load interrupted")
                    raise
        finally:
            self._end(task)
        return task

    def _queue_load(
        self, task: CopyTask, destination: BlockPages, block_ids: list[str], picks: list[int],
        entries: list[_Entry], rows: list[int], group: np.ndarray | None,
    ) -> None:
        """Queue the load of the found blocks at positions `group` (None: all) of `picks`; one arena chunk."""
        if group is not None:
            picks = [picks[j] for j in group.tolist()]
            entries = [entries[j] for j in group.tolist()]
            rows = [rows[j] for j in group.tolist()]
        try:
            picks_t = torch.tensor(picks, dtype=torch.int64, device=destination.slots.device)
            handle = self._from_arena(destination, destination.slots.index_select(0, picks_t), rows)
        except BaseException as exc:  # unpin on every path, or the rows could never be evicted
            self._unpin(entries, 0)
            task.fail([block_ids[i] for i in picks], f"device scatter failed: {error_line(exc)}")
            if not isinstance(exc, Exception):
                raise
        else:
            nbytes = destination.row_bytes * len(entries)
            task.add_part(handle, lambda error: self._unpin(entries, 0 if error else nbytes),
                          lambda: [block_ids[i] for i in picks])

    # ------------------------------------------------------------------ pinned loads
    def pin(self, block_ids: Sequence[str]) -> _Pinned:
        self._reap()
        entries: list[_Entry | None] = []
        with self._lock:
            self._check_open()
            for block_id in block_ids:
                entry = self._published.get(block_id)
                if entry is None:
                    check_block_id(block_id)
                else:
                    entry.pins += 1
                entries.append(entry)
        return _Pinned(list(block_ids), entries)

    def unpin(self, pinned: _Pinned) -> None:
        with self._lock:
            if pinned.released:
                return
            pinned.released = True
            for entry in pinned.entries:
                if entry is not None:
                    entry.pins -= 1

    def load_pinned(self, groups: Sequence[tuple[_Pinned, Sequence[int]]], destination: BlockPages) -> StoreTask:
        return self.load_pinned_layers([(groups, destination)])

    def load_pinned_layers(
        self, items: Sequence[tuple[Sequence[tuple[_Pinned, Sequence[int]]], BlockPages]]
    ) -> StoreTask:
        """One task for every destination; per arena chunk one device call for all destinations' blocks."""
        block_ids: list[str] = []
        plans: list[tuple[BlockPages, int, np.ndarray]] = []  # (destination, its first id in block_ids, rows)
        for groups, destination in items:
            first = len(block_ids)
            parts: list[np.ndarray] = []
            for pinned, indices in groups:
                if pinned.released:
                    raise ValueError("load_pinned: a pin of these groups was released")
                indices = np.asarray(indices, dtype=np.int64)
                ids = pinned.block_ids
                block_ids.extend([ids[i] for i in indices.tolist()])
                parts.append(pinned.rows[indices])
            rows = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            destination.check(len(rows), self.kv_block_size, whole_row=False, block_ids=block_ids[first:])
            plans.append((destination, first, rows))
        task = CopyTask("load", block_ids)
        with self._lock:
            self._begin()
        try:
            by_chunk: dict[int, list[tuple[BlockPages, torch.Tensor, np.ndarray, np.ndarray]]] = {}
            for destination, first, rows in plans:
                ok = rows >= 0
                picks = np.flatnonzero(ok)
                if picks.size < rows.size:
                    missing = [block_ids[first + j] for j in np.flatnonzero(~ok).tolist()]
                    task.fail(missing, "not in UcmDram when the reader pinned its blocks")
                    with self._lock:
                        self._stats.load_failures += len(missing)
                if not picks.size:
                    continue
                slots, good = destination.slots, rows[picks]
                if picks.size < rows.size:
                    slots = slots.index_select(0, torch.from_numpy(picks).to(slots.device))
                for group in self._arena.groups(good):
                    g_slots, g_rows, g_picks = slots, good, picks
                    if group is not None:
                        g_slots = slots.index_select(0, torch.from_numpy(group).to(slots.device))
                        g_rows, g_picks = good[group], picks[group]
                    chunk = self._arena.chunk_of(int(g_rows[0]))
                    by_chunk.setdefault(chunk, []).append((destination, g_slots, g_rows, g_picks + first))
            for jobs in by_chunk.values():
                self._queue_pinned_loads(task, block_ids, jobs)
        finally:
            self._end(task)
        return task

    def _queue_pinned_loads(
        self, task: CopyTask, block_ids: list[str],
        jobs: list[tuple[BlockPages, torch.Tensor, np.ndarray, np.ndarray]],
    ) -> None:
        """Queue the loads of one arena chunk's rows into each job's (destination, slots) as one device call; jobs
        are (destination, slots, global rows, positions of their ids in `block_ids`). A whole-row destination that
        goes through the device staging is queued on its own."""
        copies, counted = [], []
        for destination, slots, rows, picks in jobs:
            whole = destination.row_offset == 0 and destination.row_bytes == self.kv_block_size
            if self._uses_dma(destination, whole_row=whole):
                self._queue_copy(task, block_ids, picks, destination.row_bytes * int(rows.size),
                                 lambda d=destination, s=slots, r=rows: self._from_arena(d, s, r))
                continue
            chunk, local = self._arena.locate(rows)
            start = destination.row_offset
            copies.append((chunk[:, start : start + destination.row_bytes], destination.cache, slots,
                           torch.from_numpy(local)))
            counted.append((destination, int(rows.size), picks))
        if not copies:
            return
        picks = np.concatenate([c[2] for c in counted])
        background = any(destination.background for destination, _, _ in counted)
        nbytes = sum(destination.row_bytes * n for destination, n, _ in counted)
        stream = self._load_stream(background)
        self._queue_copy(task, block_ids, picks, nbytes, lambda: self.backend.scatter_blocks_many(
            copies, stream=stream, background=background))

    def _queue_copy(
        self, task: CopyTask, block_ids: list[str], picks: np.ndarray, nbytes: int, queue: Any
    ) -> None:
        """Run `queue()` (queues a device copy of `nbytes`, returns its handle) as one part of `task` moving the
        blocks at positions `picks` of `block_ids`; a copy that cannot be queued fails those blocks."""
        try:
            handle = queue()
        except Exception as exc:
            task.fail([block_ids[j] for j in picks.tolist()], f"device scatter failed: {error_line(exc)}")
            return
        blocks = int(picks.size)
        task.add_part(handle, lambda error: self._count_loaded(blocks, nbytes, error),
                      lambda: [block_ids[j] for j in picks.tolist()])

    def _count_loaded(self, blocks: int, nbytes: int, error: str | None) -> None:
        if error is not None:
            return
        with self._lock:
            self._stats.blocks_loaded += blocks
            self._stats.bytes_loaded += nbytes

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
            self._closed = True  # calls from now on raise StoreClosedError
            self._idle.wait_for(lambda: self._busy == 0)  # calls already past the check finish queuing first
            tasks, self._inflight = self._inflight, []
        for task in tasks:
            task._finish_parts(block=True)
        with self._lock:
            self._published.clear()
            self._arena = None

    # ------------------------------------------------------------------ device copies
    def _load_stream(self, background: bool) -> torch.Stream:
        """The side stream a load is queued on: background loads have their own (see the module docstring)."""
        return self._background_stream if background else self._stream

    def _uses_dma(self, pages: BlockPages, whole_row: bool) -> bool:
        # background loads go by the device layer's scatter (its own way of sparing compute) on their own stream:
        # the device staging is shared with the store's other copies
        if not whole_row or self.transfer == "kernel" or pages.background:
            return False  # sub-range rows are strided in the arena: the kernel reads them in place
        return self.transfer == "dma" or pages.pages[0].device.type != "cpu"  # 'auto': dma for device caches

    def _device_staging(self, device: torch.device) -> torch.Tensor:
        staging = self._staging.get(device)
        if staging is None:
            staging = torch.empty(self._staging_rows, self.kv_block_size, dtype=torch.uint8, device=device)
            self._staging[device] = staging
        return staging

    def _to_arena(self, source: BlockPages, slots: torch.Tensor, rows: list[int]) -> CopyHandle:
        """Queue the copy of pages `slots` into arena `rows` (of one chunk) on the side stream."""
        chunk, local = self._arena.locate(rows)
        if not self._uses_dma(source, whole_row=True):
            local_t = torch.from_numpy(local)
            return self.backend.gather_blocks(source.cache, slots, chunk, rows=local_t, stream=self._stream)
        keep = []
        with self._issue_lock:
            staging = self._device_staging(source.pages[0].device)
            for start in range(0, len(local), self._staging_rows):
                part = local[start : start + self._staging_rows]
                keep.append(self.backend.gather_blocks(
                    source.cache, slots[start : start + len(part)], staging, stream=self._stream))
                for i0, i1, row in _runs(part):
                    keep.append(self.backend.copy_async(chunk[row : row + i1 - i0], staging[i0:i1], self._stream))
            return CopyHandle(self.backend.record_event(self._stream), tuple(keep))

    def _from_arena(self, destination: BlockPages, slots: torch.Tensor, rows: Sequence[int]) -> CopyHandle:
        """Queue the copy of arena `rows` (of one chunk; or their sub-range) into pages `slots` on the side stream."""
        chunk, local = self._arena.locate(rows)
        whole = destination.row_offset == 0 and destination.row_bytes == self.kv_block_size
        if not self._uses_dma(destination, whole_row=whole):
            start = destination.row_offset
            src = chunk[:, start : start + destination.row_bytes]
            local_t = torch.from_numpy(local)
            return self.backend.scatter_blocks(src, destination.cache, slots, rows=local_t,
                                               stream=self._load_stream(destination.background),
                                               background=destination.background)
        keep = []
        with self._issue_lock:
            staging = self._device_staging(destination.pages[0].device)
            for start in range(0, len(local), self._staging_rows):
                part = local[start : start + self._staging_rows]
                for i0, i1, row in _runs(part):
                    keep.append(self.backend.copy_async(staging[i0:i1], chunk[row : row + i1 - i0], self._stream))
                keep.append(self.backend.scatter_blocks(
                    staging, destination.cache, slots[start : start + len(part)], stream=self._stream))
            return CopyHandle(self.backend.record_event(self._stream), tuple(keep))

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(self.name)

    def _begin(self) -> None:
        """Start a call that queues copies (lock held): raise if closed, else `close` waits for its `_end`."""
        self._check_open()
        self._busy += 1

    def _end(self, task: CopyTask) -> None:
        """End a `_begin` call; `task` is tracked until done, so its blocks are published even if nobody polls."""
        done = False
        try:
            done = task.done()
        finally:  # whatever happens, close must not wait for this call forever
            with self._lock:
                if not done:
                    self._inflight.append(task)
                self._busy -= 1
                if self._busy == 0:
                    self._idle.notify_all()

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

    def _publish(self, pending: _Pending, ids: list[str], rows: list[int], error: str | None) -> None:
        """End the dump of `ids` into `rows`: publish them (error None) or free the rows, then settle `pending`."""
        with self._lock:
            for block_id, row in zip(ids, rows, strict=True):
                del self._pending[block_id]
                if error is None and not self._closed:
                    self._published[block_id] = _Entry(row)
                else:
                    self._free_rows.append(row)
            if error is None:
                self._stats.blocks_dumped += len(ids)
                self._stats.bytes_dumped += len(ids) * self.kv_block_size
            else:
                self._stats.dump_failures += len(ids)
            pending.error = error
            pending.settled.set()

    def _unpin(self, entries: list[_Entry], nbytes: int) -> None:
        with self._lock:
            for entry in entries:
                entry.pins -= 1
            if nbytes:
                self._stats.blocks_loaded += len(entries)
                self._stats.bytes_loaded += nbytes

    def _reap(self) -> None:
        """Finish tasks whose copies have ended, so dumps are published even if nobody polls their task."""
        with self._lock:
            tasks = list(self._inflight)
        finished = [t for t in tasks if t.done()]
        if finished:
            with self._lock:
                self._inflight = [t for t in self._inflight if t not in finished]
