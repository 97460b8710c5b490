"""The connector's scheduler half: which prompt blocks come from the store and which are saved to it.

Runs in vLLM's scheduler process, driven by `UnifiedCacheConnectorV1` (the vLLM scheduler calls
`get_num_new_matched_tokens`, `update_state_after_alloc`, `build_connector_meta`, `update_connector_output`,
`request_finished`). It never touches KV bytes: it names blocks (chained content hashes under the namespaces
the workers sent at start), looks them up, and tells the workers what to load and dump each step.

Prefix reuse: the full blocks of a prompt beyond vLLM's own prefix-cache hit that are all in the store (longest
run, in every worker's namespace) are reported as external tokens. With ``ucm_async_load`` (by default where
vLLM schedules asynchronously) they load while vLLM holds the request back, until the workers report its loads
ended; otherwise they load before the forward of the step that computes the rest of the prompt. At least one
prompt token is always left to compute. A block a worker failed to load is not offered again while a shared
store checks it again (a process-local store's index drops it at once).

Dumps: the full prompt blocks computed in a step are dumped after it (planned from the step's computed range, so
blocks recomputed after a failed load are dumped again). With a sparse method, every block that fills in decode
is dumped too, named by the same chained hash over the prompt + output tokens (a later prompt that repeats
prompt + output finds them); the workers report the positions whose copy is in the store (`stored_positions`,
read by the sparse budget before it frees such a block). Finished requests free their blocks at once (see
`request_finished`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Any

from vllm.logger import init_logger

from ucm.integration.vllm.config import ConnectorConfig
from ucm.integration.vllm.metadata import (
    SPARSE_COUNTERS,
    BlockTransfer,
    UcmConnectorMetadata,
    UcmHandshake,
    UcmWorkerMetadata,
)
from ucm.integration.vllm.stats import UcmConnectorStats
from ucm.store import StoreClosedError, block_ids_for_tokens

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so it shares vLLM's log handlers


@dataclasses.dataclass
class _Request:
    request: Any  # vllm.v1.request.Request
    ids: dict[int, list[str]] | None = None  # tp_rank -> store ids of the full prompt blocks
    sent: bool = False  # ids sent to the workers
    planned_load: tuple[int, int] | None = None  # (first position, count) from the last lookup
    hit_blocks: int = 0
    loaded_blocks: int = 0
    load_failed_blocks: int = 0
    recomputed_blocks: int = 0  # hit, but recomputed (a failed block and every block after it)
    dumped_positions: int = 0  # prompt blocks planned for dumping (sum over steps)
    decode_dumped_positions: int = 0  # blocks filled in decode planned for dumping (sparse engines)
    #: its own sparse decode: [steps, blocks attended, blocks dense would read] (per step averaged over layers,
    #: summed over steps)
    sparse: list[float] = dataclasses.field(default_factory=lambda: [0, 0.0, 0.0])
    #: engine-wide sparse counters (`SPARSE_COUNTERS`) when it began
    sparse_at_start: dict[str, float] = dataclasses.field(default_factory=dict)
    #: the request's physical block ids in position order, as the scheduler output announced them to the workers
    block_ids: list[int] = dataclasses.field(default_factory=list)
    ids_sent: int = 0  # ids (of one rank) the workers have
    dump_next: int = 0  # decode dumps: the first position not planned yet
    #: positions whose store copy is confirmed on every rank; position -> ranks while some are missing
    stored: set[int] = dataclasses.field(default_factory=set)
    stored_ranks: dict[int, set[int]] = dataclasses.field(default_factory=dict)


class ConnectorScheduler:
    def __init__(self, config: ConnectorConfig, block_size: int):
        self.config = config
        self.block_size = block_size
        self.namespaces: dict[int, str] = {}  # tp_rank -> namespace (from the workers' handshake)
        self.store = None  # a lookup-only instance on shared storage; None for process-local stores
        if not config.store_is_process_local:
            from ucm.store import create_store

            self.store = create_store(config.store_name, config.store_config, _backend(config))
        capacity = None
        if config.store_is_process_local and "max_cache_size" in config.store_config:
            capacity = int(config.store_config["max_cache_size"]) // int(config.store_config["kv_block_size"])
        self._index_capacity = capacity
        self._index: dict[int, collections.OrderedDict[str, None]] = {}  # process-local stores: rank -> ids
        self._requests: dict[str, _Request] = {}
        self._pending_loads: list[BlockTransfer] = []
        self._rechecks: list[tuple[set[str], Any]] = []  # (ids, the shared store's check of them) not ended
        self.stats = UcmConnectorStats()
        self.decode_dumps = config.sparse_method is not None  # generated blocks are dumped and become candidates
        self._sparse_totals = dict.fromkeys(SPARSE_COUNTERS, 0.0)  # engine-wide, from the workers' sparse hooks
        #: requests that finished in the step being processed: (state, the summary dict handed to vLLM)
        self._finishing: dict[str, tuple[_Request, dict[str, Any]]] = {}

    # ------------------------------------------------------------------ start-up
    def set_handshakes(self, metadata: dict[int, Any]) -> None:
        for rank, meta in metadata.items():
            if not isinstance(meta, UcmHandshake):
                continue
            self.namespaces[int(rank)] = meta.namespace
        logger.info("UCM connector: block namespaces of %d worker(s): %s", len(self.namespaces), self.namespaces)

    # ------------------------------------------------------------------ naming and lookup
    def _state(self, request: Any) -> _Request:
        state = self._requests.get(request.request_id)
        if state is None or state.request is not request:
            state = self._requests[request.request_id] = _Request(request)
            state.sparse_at_start = dict(self._sparse_totals)
        return state

    def _ids(self, state: _Request) -> dict[int, list[str]]:
        if state.ids is None:
            prompt = state.request.prompt_token_ids
            if prompt is None or not self.namespaces:
                return {}  # prompt embeddings, or no namespace yet: nothing to name
            state.ids = {
                rank: block_ids_for_tokens(list(prompt), self.block_size, ns) for rank, ns in self.namespaces.items()
            }
        return state.ids

    def _name_blocks(self, state: _Request, blocks: int) -> int:
        """Extend the request's ids to its first ``blocks`` blocks where their tokens are known (prompt + output:
        the chained naming of prompt blocks, continued); returns how many of those ``blocks`` are named on every
        rank."""
        ids = self._ids(state)
        if not ids:
            return 0
        bs = self.block_size
        tokens = state.request.all_token_ids
        known = min(blocks, len(tokens) // bs)
        for rank, rank_ids in ids.items():
            start = len(rank_ids)
            if start < known:
                parent = rank_ids[-1] if rank_ids else None
                rank_ids.extend(block_ids_for_tokens(list(tokens[start * bs : known * bs]), bs,
                                                     self.namespaces[rank], parent_id=parent))
        return min(blocks, *(len(rank_ids) for rank_ids in ids.values()))

    def stored_positions(self, req_id: str) -> set[int]:
        """Positions of the request whose store copy every worker confirmed (the sparse budget's ``stored``)."""
        state = self._requests.get(req_id)
        return state.stored if state is not None else set()

    def _lookup_run(self, ids: dict[int, list[str]], start: int, stop: int) -> int:
        """Length of the run of positions start.. < stop stored for every worker."""
        if stop <= start:
            return 0
        run = stop - start
        suspect = self._suspect_ids() if self.store is not None else set()
        for rank, rank_ids in ids.items():
            wanted = rank_ids[start:stop]
            if self.store is not None:
                checked = self.store.lookup_prefix(wanted[:run])
                run = min(run, next((i for i, b in enumerate(wanted[:checked]) if b in suspect), checked))
            else:
                index = self._index.get(rank, {})
                count = 0
                for block_id in wanted[:run]:
                    if block_id not in index:
                        break
                    count += 1
                run = min(run, count)
            if run == 0:
                break
        return run

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        state = self._state(request)
        state.planned_load = None
        if not self.config.prefix_reuse:
            return 0, False
        ids = self._ids(state)
        if not ids:
            return 0, False
        # Leave at least one prompt token to compute (vLLM needs logits for it).
        max_blocks = (request.num_prompt_tokens - 1) // self.block_size
        start = num_computed_tokens // self.block_size
        run = self._lookup_run(ids, start, max_blocks)
        self.stats.add(lookup_blocks=max(0, max_blocks - start))
        if run == 0:
            return 0, False
        state.planned_load = (start, run)
        return run * self.block_size, self.config.async_load

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        state = self._state(request)
        if num_external_tokens <= 0 or state.planned_load is None:
            return
        start, run = state.planned_load
        count = min(run, num_external_tokens // self.block_size)
        block_ids = blocks.get_block_ids()[0]
        positions = list(range(start, start + count))
        self._pending_loads.append(BlockTransfer(request.request_id, positions, [block_ids[p] for p in positions]))
        state.hit_blocks += count
        state.planned_load = None
        self.stats.add(hit_blocks=count, hit_tokens=count * self.block_size)
        logger.info(
            "UCM connector: request %s: %d prompt block(s) (%d tokens) found in %s, loading",
            request.request_id, count, count * self.block_size, self.config.store_name,
        )

    # ------------------------------------------------------------------ per step
    def build_meta(self, scheduler_output: Any) -> UcmConnectorMetadata:
        meta = UcmConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        self._finishing = {}  # their outputs have left
        for transfer in meta.loads:  # an asynchronous load's request is not scheduled yet: the workers need its ids
            state = self._requests.get(transfer.req_id)
            if state is not None and not state.sent and state.ids:
                self._send_ids(meta, transfer.req_id, state, state.ids)
        steps: list[tuple[str, int]] = []
        for new in scheduler_output.scheduled_new_reqs:
            steps.append((new.req_id, new.num_computed_tokens))
            self._track_blocks(new.req_id, new.block_ids, replace=True)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", None) or ()
        for req_id, num_computed, new_ids in zip(
            cached.req_ids, cached.num_computed_tokens, cached.new_block_ids, strict=True
        ):
            steps.append((req_id, num_computed))
            self._track_blocks(req_id, new_ids, replace=req_id in resumed)
        for req_id, num_computed in steps:
            state = self._requests.get(req_id)
            if state is None:
                continue
            ids = self._ids(state)
            scheduled = scheduler_output.num_scheduled_tokens.get(req_id, 0)
            start = num_computed // self.block_size
            if self.decode_dumps and ids:
                # blocks filled by this step (or by an earlier one whose tokens were not known yet)
                end = self._name_blocks(state, (num_computed + scheduled) // self.block_size)
                if state.request.num_prompt_tokens // self.block_size <= state.dump_next < start:
                    start = state.dump_next
                state.dump_next = max(state.dump_next, end)
            else:
                end = min(num_computed + scheduled, state.request.num_prompt_tokens) // self.block_size
            if ids and not state.sent:
                self._send_ids(meta, req_id, state, ids)
            elif ids and state.ids_sent < min(len(rank_ids) for rank_ids in ids.values()):
                meta.appended_ids[req_id] = {rank: rank_ids[state.ids_sent :] for rank, rank_ids in ids.items()}
                state.ids_sent = min(len(rank_ids) for rank_ids in ids.values())
            if not (self.config.save_blocks and ids):
                continue
            positions = list(range(start, end))
            if not positions:
                continue
            block_ids = state.block_ids
            if len(block_ids) < end:
                continue
            meta.dumps.append(BlockTransfer(req_id, positions, [block_ids[p] for p in positions]))
            prompt_blocks = state.request.num_prompt_tokens // self.block_size
            decode = sum(1 for p in positions if p >= prompt_blocks)
            state.dumped_positions += len(positions) - decode
            state.decode_dumped_positions += decode
        meta.finished_req_ids = sorted(scheduler_output.finished_req_ids or ())
        meta.preempted_req_ids = sorted(getattr(scheduler_output, "preempted_req_ids", None) or ())
        return meta

    @staticmethod
    def _send_ids(meta: UcmConnectorMetadata, req_id: str, state: _Request, ids: dict[int, list[str]]) -> None:
        """Hand the workers every store id the request has so far (its first ids; later ones are appended)."""
        meta.new_requests[req_id] = {rank: list(rank_ids) for rank, rank_ids in ids.items()}
        state.sent = True
        state.ids_sent = min(len(rank_ids) for rank_ids in ids.values())

    def _track_blocks(self, req_id: str, block_ids: Any, replace: bool) -> None:
        """Follow the block list the workers see: a new or resumed request gets its whole list, a running one
        the blocks appended in this step (the same contract vLLM's worker block table follows)."""
        state = self._requests.get(req_id)
        if state is None:
            return
        group = list(block_ids[0]) if block_ids else []
        if replace:
            state.block_ids = group
        else:
            state.block_ids.extend(group)

    def update_connector_output(self, output: Any) -> None:
        worker_meta = getattr(output, "kv_connector_worker_meta", None)
        if not isinstance(worker_meta, UcmWorkerMetadata):
            return
        for name, value in worker_meta.sparse.items():
            self._sparse_totals[name] = self._sparse_totals.get(name, 0.0) + value
        for req_id, (ok, failed, recomputed) in worker_meta.load_results.items():
            state = self._state_of(req_id)
            if state is not None:
                state.loaded_blocks += ok
                state.load_failed_blocks += failed
                state.recomputed_blocks += recomputed
        for rank, per_req in worker_meta.dumped.items():
            for req_id, positions in per_req.items():
                self._confirm_stored(req_id, rank, positions)
        for req_id, row in worker_meta.sparse_requests.items():
            state = self._state_of(req_id)
            if state is not None:
                state.sparse = [a + b for a, b in zip(state.sparse, row, strict=True)]
        # vLLM finishes requests (request_finished) before it hands the connector the same step's worker output,
        # and sends their outputs after both: the summaries it holds get that last step's counts here
        for state, summary in self._finishing.values():
            summary.clear()
            summary.update(self._summary(state))
        if self.store is None:
            for rank, ids in worker_meta.stored_ids.items():
                index = self._index.setdefault(rank, collections.OrderedDict())
                for block_id in ids:
                    index[block_id] = None
                    index.move_to_end(block_id)
                while self._index_capacity is not None and len(index) > self._index_capacity:
                    index.popitem(last=False)
            for rank, ids in worker_meta.missing_ids.items():
                index = self._index.get(rank, {})
                for block_id in ids:
                    index.pop(block_id, None)
        else:  # the lookup-only instance re-checks them, so a block that can never load is not offered again
            for ids in worker_meta.missing_ids.values():
                with contextlib.suppress(StoreClosedError):
                    task = self.store.report_failed_loads(ids)
                    if task is not None:
                        self._rechecks.append((set(ids), task))

    def _suspect_ids(self) -> set[str]:
        """Ids a worker failed to load whose check by the shared store has not ended: not offered meanwhile (a
        request whose load failed is looked up again at once, before the check can have hidden a corrupt file)."""
        self._rechecks = [(ids, task) for ids, task in self._rechecks if not task.done()]
        return set().union(*(ids for ids, _ in self._rechecks))

    def _confirm_stored(self, req_id: str, rank: int, positions: list[int]) -> None:
        state = self._requests.get(req_id)
        if state is None:
            return
        ranks = max(1, len(self.namespaces))
        for p in positions:
            if p in state.stored:
                continue
            seen = state.stored_ranks.setdefault(p, set())
            seen.add(rank)
            if len(seen) >= ranks:
                state.stored.add(p)
                del state.stored_ranks[p]

    def request_finished(self, request: Any) -> tuple[bool, dict[str, Any]]:
        """(False: the blocks are freed at once, per-request summary for the output's kv_transfer_params).

        Freeing at once is safe: vLLM reuses a freed block at the earliest in the next step, and the workers
        wait in `handle_preemptions` (before that step touches any block) for the dumps of finished requests. A
        request that ends while its asynchronous load runs keeps its blocks: vLLM frees them once the workers
        report that load ended (`get_finished`).
        """
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return False, {"ucm": {"hit_blocks": 0}}
        summary = self._summary(state)
        self._finishing[request.request_id] = (state, summary)
        return False, {"ucm": summary}

    def _state_of(self, req_id: str) -> _Request | None:
        state = self._requests.get(req_id)
        if state is None and req_id in self._finishing:
            state = self._finishing[req_id][0]
        return state

    def _summary(self, state: _Request) -> dict[str, Any]:
        """The request's ``kv_transfer_params["ucm"]`` (docs/connector.md, "Per request")."""
        summary: dict[str, Any] = {
            "hit_blocks": state.hit_blocks,
            "loaded_blocks": state.loaded_blocks,
            "load_failed_blocks": state.load_failed_blocks,
            "recomputed_blocks": state.recomputed_blocks,
            "saved_blocks_planned": state.dumped_positions,
            "block_size": self.block_size,
        }
        if self.decode_dumps:
            summary["saved_decode_blocks_planned"] = state.decode_dumped_positions
        steps, resident, full = state.sparse
        if steps and full:
            delta = {k: v - state.sparse_at_start.get(k, 0.0) for k, v in self._sparse_totals.items()}
            summary["sparse"] = {
                "steps": int(steps),  # this request's decode steps attended sparsely
                "resident_blocks": round(resident / steps, 2),  # per step, averaged over layers
                "full_blocks": round(full / steps, 2),
                "resident_share": resident / full,
                # the whole engine's while the request ran (the request's own when it ran alone)
                "engine": {k: (round(v, 3) if k.endswith("_ms") else int(v)) for k, v in delta.items()},
            }
        return summary

    def take_stats(self) -> UcmConnectorStats | None:
        if self.stats.is_empty():
            return None
        stats, self.stats = self.stats, UcmConnectorStats()
        return stats

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def _backend(config: ConnectorConfig) -> Any:
    from ucm.device import get_backend

    return get_backend(config.device_backend)
