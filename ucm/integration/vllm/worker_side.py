"""The connector's worker half: moves KV blocks between vLLM's paged cache and the store.

Runs in each vLLM worker process, driven by `UnifiedCacheConnectorV1` (vLLM's model runner calls
`register_kv_caches` once, then per step `bind_connector_metadata`, `start_load_kv`, the forward, `wait_for_save`,
`get_finished`, `get_block_ids_with_load_errors`, `get_kv_connector_stats`, `build_connector_worker_meta`).

- Loads (prefix hits), asynchronous where vLLM schedules asynchronously (``ucm_async_load``, "auto"):
  submitted in `start_load_kv` of the step whose metadata lists them, while vLLM keeps the request out of the
  batch (``WAITING_FOR_REMOTE_KVS``); each step's `get_finished` reports the requests whose loads all ended
  (their blocks are in place), and their failed blocks go out in the same step's
  `get_block_ids_with_load_errors`, so vLLM schedules such a request from its first failed block with no output
  frame of it in flight. Synchronous loads are waited in `start_load_kv` before the forward; vLLM then discards
  the step's output for a request with a failed block and recomputes from there. Either way the failed blocks
  are the ones the store cannot deliver (missing, evicted, checksum mismatch, I/O error), and the connector sets
  vLLM's failure policy to recompute.
- Dumps run asynchronously after the forward (`wait_for_save` submits them as one batched task per request)
  and overlap the following steps. vLLM frees a finished or preempted request's blocks at once; the first step
  that may reuse them calls `handle_preemptions` before touching any block, and there this half waits for the
  dumps of those requests (with a sparse method: for every dump in flight, since the sparse budget frees blocks
  of running requests and loads them back from the store). Blocks already in the store are not written again.
  With synchronous loads, blocks computed in a step in which some load failed are not dumped (they may have been
  computed from bad KV).
- With a sparse method the scheduler also plans dumps of the blocks filled in decode (their ids arrive in
  ``appended_ids``), and this half reports the positions whose copy is in the store (dumped, or found there) in
  `UcmWorkerMetadata.dumped`: the sparse budget frees such a block only then, a failed dump leaves it resident.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any

import torch
from vllm.logger import init_logger

from ucm.integration.vllm.config import ConnectorConfig
from ucm.integration.vllm.kv_layout import KvLayout
from ucm.integration.vllm.metadata import BlockTransfer, UcmConnectorMetadata, UcmWorkerMetadata
from ucm.integration.vllm.stats import UcmConnectorStats
from ucm.store import BlockPages, StoreError, StoreTask

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so it shares vLLM's log handlers


@dataclasses.dataclass
class _Load:
    """One prefix load in flight: the transfer, the store ids it reads and the store's task (None: it did not
    start, every block counts as failed)."""

    transfer: BlockTransfer
    ids: list[str]
    task: StoreTask | None
    started: float


class ConnectorWorker:
    def __init__(self, config: ConnectorConfig, tp_rank: int):
        self.config = config
        self.tp_rank = tp_rank
        self.layout: KvLayout | None = None
        self.store: Any = None
        self.backend: Any = None
        self.namespace = ""
        self._block_ids: dict[str, list[str]] = {}  # req_id -> store ids of its full prompt blocks (this rank)
        self._dumps: dict[str, list[StoreTask]] = {}  # req_id -> dump tasks in flight
        self._loads: dict[str, list[_Load]] = {}  # req_id -> loads not accounted yet
        self._load_errors: set[int] = set()
        self._failed_this_step = False
        self._meta = UcmWorkerMetadata()
        self.stats = UcmConnectorStats()
        self._dump_started: dict[int, float] = {}  # id(dump task) -> when it was submitted (save latency)
        #: sparse engines: id(dump task) -> (req_id, block id -> position), to confirm stored positions
        self._dump_positions: dict[int, tuple[str, dict[str, int]]] = {}
        self._report_dumps = config.sparse_method is not None
        self._sparse_seen: set[str] = set()  # requests whose sparse decoding was counted (sparse_requests)
        self._store_sent: tuple[int, int, int | None, int] | None = None  # the store gauges last reported

    # ------------------------------------------------------------------ start-up
    def start(self, layout: KvLayout, namespace: str) -> None:
        from ucm.device import get_backend
        from ucm.store import create_store

        self.layout, self.namespace = layout, namespace
        self.backend = get_backend(self.config.device_backend)
        self.store = create_store(self.config.store_name, self.config.store_config, self.backend)
        logger.info(
            "UCM connector worker (tp rank %d): store %s, %d layers, %d B per block, layout %s",
            self.tp_rank, self.config.store_name, len(layout.layer_names), layout.bytes_per_block, layout.tag,
        )

    def request_block_ids(self, req_id: str) -> list[str] | None:
        """Store ids of the request's full prompt blocks in position order (None if unknown)."""
        return self._block_ids.get(req_id)

    # ------------------------------------------------------------------ per step
    def bind(self, meta: UcmConnectorMetadata) -> None:
        for req_id, per_rank in meta.new_requests.items():
            ids = per_rank.get(self.tp_rank)
            if ids is not None:
                self._block_ids[req_id] = list(ids)
        for req_id, per_rank in meta.appended_ids.items():
            ids = per_rank.get(self.tp_rank)
            if ids is not None and req_id in self._block_ids:
                self._block_ids[req_id].extend(ids)

    def _pages(self, transfer: BlockTransfer) -> tuple[list[str], BlockPages] | None:
        ids = self._block_ids.get(transfer.req_id)
        if ids is None or max(transfer.positions, default=-1) >= len(ids):
            return None
        slots = torch.tensor(transfer.block_ids, dtype=torch.int64)
        return [ids[p] for p in transfer.positions], BlockPages(list(self.layout.caches), slots)

    def load(self, meta: UcmConnectorMetadata) -> None:
        """Submit this step's prefix loads; synchronous loads are also waited here (vLLM runs the forward next),
        asynchronous ones end in `finished_loads`."""
        if not meta.loads:
            return
        started = time.perf_counter()
        for transfer in meta.loads:
            task = None
            pages = self._pages(transfer)
            ids = pages[0] if pages is not None else []
            if pages is not None:
                try:
                    task = self.store.load(*pages)
                except StoreError as exc:
                    logger.warning("UCM connector: load of %d blocks failed to start: %s", len(ids), exc)
            self._loads.setdefault(transfer.req_id, []).append(_Load(transfer, ids, task, started))
        if not self.config.async_load:
            for req_id in dict.fromkeys(t.req_id for t in meta.loads):
                self._end_loads(req_id, block=True)
            self.stats.add(load_seconds=time.perf_counter() - started)

    def finished_loads(self) -> set[str]:
        """Requests whose asynchronous loads all ended since the last call (their failed blocks are recorded for
        `take_load_errors`, which vLLM reads in the same step)."""
        return {req_id for req_id in list(self._loads) if self._end_loads(req_id, block=False)}

    def _end_loads(self, req_id: str, block: bool) -> bool:
        """Account the loads of ``req_id`` if all have ended (``block``: wait for them); True if accounted."""
        loads = self._loads[req_id]
        if not block and not all(load.task is None or load.task.done() for load in loads):
            return False
        del self._loads[req_id]
        for load in loads:
            self._account_load(load)
        return True

    def _account_load(self, load: _Load) -> None:
        transfer, ids, task = load.transfer, load.ids, load.task
        failed_ids: set[str]
        if task is None:
            failed_ids = set(ids)
            bad = list(transfer.block_ids)
        else:
            try:
                task.wait()
            except StoreError:
                pass
            failed_ids = set(task.failed_ids)
            bad = [b for b, i in zip(transfer.block_ids, ids, strict=True) if i in failed_ids]
        if bad:
            self._load_errors.update(bad)
            if not self.config.async_load:
                self._failed_this_step = True  # this step's forward reads them
            self._meta.missing_ids.setdefault(self.tp_rank, []).extend(sorted(failed_ids))
            reasons = task.failure_reasons if task is not None else {}
            logger.warning(
                "UCM connector: request %s: %d of %d block(s) failed to load from %s, vLLM recomputes them (%s)",
                transfer.req_id, len(bad), len(transfer.block_ids), self.config.store_name,
                "; ".join(list(reasons.values())[:2]) or "request unknown to this worker",
            )
        # vLLM recomputes from the first failed block on (the longest valid prefix is kept): only the blocks
        # before it are used, the others were read for nothing
        bad_set = set(bad)
        used = next((i for i, b in enumerate(transfer.block_ids) if b in bad_set), len(transfer.block_ids))
        recomputed = len(transfer.block_ids) - used
        row = self._meta.load_results.setdefault(transfer.req_id, [0, 0, 0])
        row[0], row[1], row[2] = row[0] + used, row[1] + len(bad), row[2] + recomputed
        self.stats.add(
            loaded_blocks=used, loaded_bytes=used * self.layout.bytes_per_block, load_failed_blocks=len(bad),
            recomputed_blocks=recomputed,
        )
        # submission until this half saw the end (asynchronous loads are polled once per step)
        self.stats.sample("load_durations", time.perf_counter() - load.started)

    def save(self, meta: UcmConnectorMetadata) -> None:
        """Submit dumps of the full prompt blocks this step computed (asynchronous)."""
        for transfer in meta.dumps:
            if self._failed_this_step:
                self.stats.add(save_dropped_blocks=len(transfer.positions))
                continue
            pages = self._pages(transfer)
            if pages is None:
                continue
            ids, source = pages
            stored = self.store.lookup(ids)
            keep = [i for i, hit in enumerate(stored) if not hit]
            self.stats.add(save_skipped_blocks=len(ids) - len(keep))
            if self._report_dumps and len(keep) != len(ids):
                self._confirm(transfer.req_id, [p for p, hit in zip(transfer.positions, stored, strict=True) if hit])
            if not keep:
                continue
            if len(keep) != len(ids):
                ids = [ids[i] for i in keep]
                source = BlockPages(source.cache, source.slots[torch.tensor(keep, dtype=torch.int64)])
            try:
                submitted = time.perf_counter()
                task = self.store.dump(ids, source)
                self._dump_started[id(task)] = submitted
                if self._report_dumps:
                    positions = [transfer.positions[i] for i in keep]
                    self._dump_positions[id(task)] = (transfer.req_id, dict(zip(ids, positions, strict=True)))
                self._dumps.setdefault(transfer.req_id, []).append(task)
            except StoreError as exc:
                logger.warning("UCM connector: dump of %d blocks failed to start: %s", len(ids), exc)
                self.stats.add(save_failed_blocks=len(ids))
        self._failed_this_step = False

    def _reap(self, req_ids: Iterable[str], block: bool = False) -> None:
        for req_id in list(req_ids):
            tasks = self._dumps.get(req_id)
            if not tasks:
                self._dumps.pop(req_id, None)
                continue
            pending = []
            for task in tasks:
                if block:
                    try:
                        task.wait()
                    except StoreError:
                        pass
                elif not task.done():
                    pending.append(task)
                    continue
                self._account_dump(task)
            if pending:
                self._dumps[req_id] = pending
            else:
                del self._dumps[req_id]

    def _account_dump(self, task: StoreTask) -> None:
        started = self._dump_started.pop(id(task), None)
        if started is not None:
            # submission to the step that saw it finished (dumps are polled once per step)
            self.stats.sample("save_durations", time.perf_counter() - started)
        failed = set(task.failed_ids)
        ok = [b for b in task.block_ids if b not in failed]
        self.stats.add(
            saved_blocks=len(ok), saved_bytes=len(ok) * self.layout.bytes_per_block, save_failed_blocks=len(failed)
        )
        if failed:
            logger.warning(
                "UCM connector: %d block(s) could not be saved: %s",
                len(failed), "; ".join(list(task.failure_reasons.values())[:2]),
            )
        if self.config.store_is_process_local and ok:
            self._meta.stored_ids.setdefault(self.tp_rank, []).extend(ok)
        dumped = self._dump_positions.pop(id(task), None)
        if dumped is not None:
            req_id, position_of = dumped
            self._confirm(req_id, [position_of[b] for b in ok])

    def _confirm(self, req_id: str, positions: list[int]) -> None:
        """Report positions of ``req_id`` whose store copy exists (sparse engines, see `UcmWorkerMetadata.dumped`)."""
        if positions:
            self._meta.dumped.setdefault(self.tp_rank, {}).setdefault(req_id, []).extend(positions)

    def record_sparse_step(self, stats: Any) -> None:
        """Counters of one sparse step (`ucm.sparse.SparseStepStats`), from the sparse runtime.

        Block counts become per (request, decode step), averaged over the layers that attended sparsely."""
        per_request = self._meta.sparse_requests
        resident_steps = full_steps = 0.0
        for req_id, (resident, full, layers) in stats.request_blocks.items():
            if not layers:
                continue
            row = per_request.setdefault(req_id, [0, 0.0, 0.0])
            row[0] += 1
            row[1] += resident / layers
            row[2] += full / layers
            resident_steps += resident / layers
            full_steps += full / layers
        new = [r for r in stats.request_blocks if r not in self._sparse_seen]
        self._sparse_seen.update(new)
        self.stats.add(sparse_requests=len(new), sparse_steps=len(stats.request_blocks),
                       resident_block_steps=resident_steps, full_block_steps=full_steps,
                       retrievals=stats.retrievals)
        for seconds in stats.retrieval_s:
            self.stats.sample("retrieval_durations", seconds)
        step = {
            "steps": 1 if stats.sparse_requests else 0, "sparse_steps": len(stats.request_blocks),
            "retrievals": stats.retrievals, "blocks_loaded": stats.blocks_loaded,
            "blocks_prefetched": stats.blocks_prefetched, "load_failures": stats.load_failures,
            "host_ms": 1e3 * stats.host_s, "load_wait_ms": 1e3 * stats.load_wait_s,
            "end_ms": 1e3 * stats.end_s,
            "view_steps": 1 if stats.sparse_requests and stats.view_step else 0,
            "ahead_held": stats.ahead_held, "ahead_released_late": stats.ahead_released_late,
        }
        counts = self._meta.sparse
        for name, value in step.items():
            counts[name] = counts.get(name, 0) + value

    def handle_preemptions(self, meta: UcmConnectorMetadata) -> None:
        """Before a step touches any block: vLLM may now reuse the blocks of the finished and preempted requests,
        so their dumps must have read them (waited here; usually long done)."""
        if meta.preempted_req_ids:
            count = len(meta.preempted_req_ids)
            logger.info("UCM connector: %d request(s) preempted, their blocks are released", count)
        if self.config.sparse_method is not None:
            # The sparse budget frees blocks of running requests at their first decode step, and the sparse
            # algorithm loads them back from the store: every dump must be complete before that step runs.
            self._reap(list(self._dumps), block=True)
        else:
            self._reap(meta.finished_req_ids + meta.preempted_req_ids, block=True)
        for req_id in meta.finished_req_ids:
            self._block_ids.pop(req_id, None)
            self._sparse_seen.discard(req_id)

    def poll(self) -> None:
        """Account the dumps that have ended (non-blocking; called once per step)."""
        self._reap(list(self._dumps))

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_stats(self) -> UcmConnectorStats | None:
        self._store_gauges()
        if self.stats.is_empty():
            return None
        stats, self.stats = self.stats, UcmConnectorStats()
        return stats

    def _store_gauges(self) -> None:
        """The store's occupancy (when it changed since last reported) and the evictions since then."""
        if self.store is None:
            return
        s = self.store.stats()
        now = (s.used_bytes, s.stored_blocks, s.capacity_bytes, s.evictions)
        if now == self._store_sent:
            return
        evicted = s.evictions - (self._store_sent[3] if self._store_sent is not None else 0)
        self._store_sent = now
        self.stats.add(store_evictions=evicted)
        self.stats.set_gauge("store_used_bytes", self.tp_rank, s.used_bytes)
        self.stats.set_gauge("store_blocks", self.tp_rank, s.stored_blocks)
        if s.capacity_bytes is not None:
            self.stats.set_gauge("store_capacity_bytes", self.tp_rank, s.capacity_bytes)

    def take_worker_meta(self) -> UcmWorkerMetadata | None:
        if self._meta.is_empty():
            return None
        meta, self._meta = self._meta, UcmWorkerMetadata()
        return meta

    def close(self) -> None:
        for req_id in list(self._loads):  # the store must not write into the caches after this
            self._end_loads(req_id, block=True)
        self._reap(list(self._dumps), block=True)
        if self.store is not None:
            self.store.close()
