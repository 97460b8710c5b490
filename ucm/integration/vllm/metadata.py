"""Messages between the connector's two halves (all plain data: they cross process boundaries).

- `UcmConnectorMetadata`: scheduler -> workers, once per step (built by `build_connector_meta`).
- `UcmWorkerMetadata`: workers -> scheduler, once per step (`build_connector_worker_meta`), aggregated over
  workers by vLLM.
- `UcmHandshake`: each worker -> scheduler once at start: the block namespace the worker derived from its real
  KV caches, so scheduler lookups and worker dumps name blocks the same way.
"""

from __future__ import annotations

import dataclasses

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclasses.dataclass
class BlockTransfer:
    """Move the blocks at logical positions `positions` of request `req_id` to/from vLLM blocks `block_ids`."""

    req_id: str
    positions: list[int]
    block_ids: list[int]


@dataclasses.dataclass
class SparseStepMeta:
    """Scheduler -> workers, per step, for sparse engines (`sparse_budget.SparseBudget.step_meta`).

    ``block_updates``: req_id -> {block position: physical block id} the budget changed (freed positions get the
    null block, shared work slots their private copy); vLLM's worker block table never hears of them.
    ``new_req_ids`` / ``resumed_req_ids``: requests whose worker rows vLLM rebuilds in this step (their earlier
    updates no longer apply; resumed ones re-prefill into fresh blocks).
    """

    block_updates: dict[str, dict[int, int]] = dataclasses.field(default_factory=dict)
    new_req_ids: list[str] = dataclasses.field(default_factory=list)
    resumed_req_ids: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class UcmConnectorMetadata(KVConnectorMetadata):
    #: store ids of the full prompt blocks of requests new to the workers: req_id -> tp_rank -> ids
    new_requests: dict[str, dict[int, list[str]]] = dataclasses.field(default_factory=dict)
    #: sparse engines: ids of blocks filled in decode, appended to the request's ids: req_id -> tp_rank -> ids
    appended_ids: dict[str, dict[int, list[str]]] = dataclasses.field(default_factory=dict)
    loads: list[BlockTransfer] = dataclasses.field(default_factory=list)  # before this step's forward
    dumps: list[BlockTransfer] = dataclasses.field(default_factory=list)  # computed by this step's forward
    #: requests whose blocks vLLM may reuse from this step on: their dumps must have read them first
    finished_req_ids: list[str] = dataclasses.field(default_factory=list)
    preempted_req_ids: list[str] = dataclasses.field(default_factory=list)
    sparse: SparseStepMeta | None = None  # sparse engines only


#: What the sparse hooks report per step for the whole engine (worker -> scheduler; each request's summary gets
#: their change while it ran, under ``sparse["engine"]``): decode steps with a sparse request, (request, decode
#: step) pairs attended sparsely, (request, layer) retrievals, blocks loaded from the store (summed over layers)
#: and of those the ones loaded ahead into spare slots, those loads that failed, host milliseconds in the hooks
#: and, of those, waiting for loads, the decode steps that attended one view written into the engine's
#: metadata (no layer hooks: full-graph steps), and the batches of loads ahead queued from a held stream and of
#: those the ones its timeout released before the next step's forward; of the host milliseconds, those after the
#: forward was queued (loads ahead, selections submitted at the step's end).
SPARSE_COUNTERS = ("steps", "sparse_steps", "retrievals", "blocks_loaded", "blocks_prefetched", "load_failures",
                   "host_ms", "load_wait_ms", "view_steps", "ahead_held", "ahead_released_late", "end_ms")


@dataclasses.dataclass
class UcmWorkerMetadata(KVConnectorWorkerMetadata):
    #: req_id -> [blocks loaded and used (before the first failed one), blocks whose load failed, blocks vLLM
    #: recomputes instead (the failed one and all after it)] in this step
    load_results: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    #: tp_rank -> ids published by finished dumps (only for process-local stores: the scheduler's index)
    stored_ids: dict[int, list[str]] = dataclasses.field(default_factory=dict)
    #: tp_rank -> ids found missing or corrupt on load (dropped from the scheduler's index, or re-checked by its
    #: lookup-only instance of a shared store)
    missing_ids: dict[int, list[str]] = dataclasses.field(default_factory=dict)
    #: sparse hooks' counters of this step, named by `SPARSE_COUNTERS`
    sparse: dict[str, float] = dataclasses.field(default_factory=dict)
    #: req_id -> [sparse decode steps, blocks attended, blocks dense would read] (blocks: per step, averaged over
    #: layers, summed over the steps)
    sparse_requests: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    #: sparse engines: tp_rank -> req_id -> block positions whose store copy is confirmed (dumped, or already
    #: stored); the sparse budget frees a block filled in decode only once every rank confirmed it
    dumped: dict[int, dict[str, list[int]]] = dataclasses.field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, UcmWorkerMetadata)
        merged = UcmWorkerMetadata(
            {k: list(v) for k, v in self.load_results.items()},
            {k: list(v) for k, v in self.stored_ids.items()},
            {k: list(v) for k, v in self.missing_ids.items()},
            # tensor-parallel workers attend the same blocks (one block table): take one worker's counts (times:
            # the slowest worker's)
            {k: max(self.sparse.get(k, 0), other.sparse.get(k, 0)) for k in {*self.sparse, *other.sparse}},
            {k: list(v) for k, v in self.sparse_requests.items()},
            {rank: {r: list(p) for r, p in per_req.items()} for rank, per_req in self.dumped.items()},
        )
        for rank, per_req in other.dumped.items():
            for req_id, positions in per_req.items():
                merged.dumped.setdefault(rank, {}).setdefault(req_id, []).extend(positions)
        for req_id, row in other.sparse_requests.items():
            mine = merged.sparse_requests.setdefault(req_id, list(row))
            merged.sparse_requests[req_id] = [max(a, b) for a, b in zip(mine, row, strict=True)]
        for req_id, (ok, failed, recomputed) in other.load_results.items():
            # a block counts as loaded only when every worker loaded its shard of it
            mine = merged.load_results.setdefault(req_id, [ok, failed, recomputed])
            mine[0], mine[1], mine[2] = min(mine[0], ok), max(mine[1], failed), max(mine[2], recomputed)
        for rank, ids in other.stored_ids.items():
            merged.stored_ids.setdefault(rank, []).extend(ids)
        for rank, ids in other.missing_ids.items():
            merged.missing_ids.setdefault(rank, []).extend(ids)
        return merged

    def is_empty(self) -> bool:
        return not (self.load_results or self.stored_ids or self.missing_ids or any(self.sparse.values())
                    or self.sparse_requests or self.dumped)


@dataclasses.dataclass
class UcmHandshake(KVConnectorHandshakeMetadata):
    namespace: str
    bytes_per_block: int
