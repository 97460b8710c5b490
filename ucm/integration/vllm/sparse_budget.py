"""Scheduler-side sparse budget: a sparse request's KV blocks shrink to the algorithm's plan at its first decode step.

Owned by the connector's scheduler role (``connector.sparse_budget``), release-independent: the release bindings
(`ucm.integration.vllm.compat`) bind it to the engine's KV block lists (`SchedulerBlocks`) and call
`before_allocate` before each of vLLM's block allocations; the connector calls `step_meta` in
``build_connector_meta`` so the changes reach the workers in the connector's own metadata.

What happens when the scheduler allocates slots for a request in decode (at its first decode step, then each
time the request opens a new block, when its local window moves and a block leaves it):
1. the sparse algorithm gives the request's `BlockPlan` (``sparse.block_plan``);
2. positions to free that still hold a block go back to vLLM's pool, the null block takes their place (the list
   keeps its length, so allocation of new blocks keeps working); a block filled in decode
   (``plan.decode_blocks_from`` on) is freed only once the connector confirmed its store copy on every worker
   (``stored(req_id)``), else it is *held* resident (a failed dump never leaves a hole in the context) and
   checked again at the next steps;
3. the work-slot and spare-slot blocks become exclusive to the request (the worker overwrites them with other
   logical blocks): a block shared through the prefix cache is replaced by a private copy, a private one leaves the
   prefix index;
4. the changed positions (position -> block id) are recorded for the workers: vLLM's worker block table only
   appends, it never hears about replaced or freed positions.

"Already shrunk" is read from the block list itself (freed positions hold the null block), so preemption (vLLM
frees everything and re-prefills densely) and resume need no extra state: the plan of the resumed request's
length frees its generated blocks again (their store copies were confirmed before the preemption).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ucm.errors import UcmConfigError
from ucm.integration.vllm.compat.base import SchedulerBlocks
from ucm.integration.vllm.metadata import SparseStepMeta
from ucm.sparse.base import UcmSparseBase

logger = logging.getLogger(__name__)


@dataclass
class BudgetStats:
    """Scheduler-side counters (read by tests and logged)."""

    shrinks: int = 0
    blocks_freed: int = 0
    work_blocks_copied: int = 0  # shared work-slot blocks replaced by a private copy
    work_blocks_unindexed: int = 0  # private work-slot blocks removed from the prefix cache index
    decode_blocks_freed: int = 0  # blocks filled in decode freed once their store copy was confirmed
    decode_blocks_held: int = 0  # blocks filled in decode kept resident when due: no confirmed copy (yet)


class SparseBudget:
    """Applies the sparse algorithm's block plans to one scheduler's KV block lists."""

    def __init__(self, sparse: UcmSparseBase, stored: Callable[[str], Collection[int]] | None = None):
        """``stored(req_id)``: the request's positions whose store copy is confirmed on every worker (the
        connector's dump reports); None: none is, blocks filled in decode are never freed."""
        self.sparse = sparse
        self.blocks: SchedulerBlocks | None = None
        self.pending: dict[str, dict[int, int]] = {}
        self._stored = stored
        #: req_id -> a position its shrink freed: while that position holds the null block the request is still
        #: shrunk (its prompt part depends on the prompt only), so later decode steps cost O(1), not O(blocks),
        #: except once per block (the local window moves) and for held blocks
        self._shrunk: dict[str, int] = {}
        self._planned_blocks: dict[str, int] = {}  # req_id -> blocks (num_total_blocks) of its last plan
        self._held: dict[str, set[int]] = {}  # req_id -> positions held resident for lack of a stored copy
        self.stats = BudgetStats()

    def bind(self, blocks: SchedulerBlocks) -> None:
        """Called by the release bindings once the scheduler's KV cache manager exists."""
        if self.sparse.block_size != blocks.block_size:
            raise UcmConfigError("sparse block_size", self.sparse.block_size, f"vLLM's block size {blocks.block_size}")
        self.blocks = blocks
        logger.info("ucm sparse: scheduler budget active (%s, block size %d)",
                    type(self.sparse).__name__, blocks.block_size)

    # ------------------------------------------------------------------ before each allocation
    def before_allocate(self, request: Any, num_new_tokens: int) -> None:
        """Shrink ``request`` if this allocation is for one of its decode steps and it holds freed positions."""
        blocks = self.blocks
        if blocks is None:
            return
        # vLLM's own prefill boundary: a resumed request re-prefills its output tokens too
        if request.num_computed_tokens < max(request.num_prompt_tokens, request.num_tokens - 1):
            return
        req_id = request.request_id
        marker = self._shrunk.get(req_id)
        shrunk = marker is not None and blocks.holds_null(req_id, marker)
        total = -(-(request.num_computed_tokens + num_new_tokens) // blocks.block_size)
        if shrunk and self._planned_blocks.get(req_id) == total:
            if self._held.get(req_id):
                self._free_held(req_id)  # their copies may have been confirmed since
            return  # no new block: the window did not move
        plan = self.sparse.block_plan(request, num_new_tokens)
        if not plan.sparse or not plan.freed_positions:
            return
        ids = blocks.block_ids(req_id)
        if not ids:
            return
        self._planned_blocks[req_id] = plan.num_total_blocks
        stored = self._stored(req_id) if self._stored is not None else ()
        held = self._held.setdefault(req_id, set())
        to_free = []
        for p in plan.freed_positions:
            if p >= len(ids):
                continue
            if ids[p] == blocks.null_block_id:
                held.discard(p)
                continue
            if p >= plan.decode_blocks_from and p not in stored:
                if p not in held:
                    held.add(p)
                    self.stats.decode_blocks_held += 1
                continue
            held.discard(p)
            to_free.append(p)
        self._shrunk[req_id] = plan.freed_positions[0]
        if not to_free:
            return  # already shrunk
        updates = self.pending.setdefault(req_id, {})
        blocks.release(req_id, to_free)
        for p in to_free:
            updates[p] = blocks.null_block_id
        late = sum(1 for p in to_free if p >= plan.decode_blocks_from)
        self.stats.decode_blocks_freed += late
        self.stats.blocks_freed += len(to_free)
        if shrunk:
            return  # the work slots were made exclusive at the first shrink
        for p in plan.work_positions + plan.spare_positions:
            if p >= len(ids):
                continue
            block_id, what = blocks.make_exclusive(req_id, p)
            if what == "copied":
                updates[p] = block_id
                self.stats.work_blocks_copied += 1
            elif what == "unindexed":
                self.stats.work_blocks_unindexed += 1
        self.stats.shrinks += 1
        logger.debug("ucm sparse: request %s keeps %d of %d blocks (%d freed)",
                     req_id, plan.num_blocks, plan.num_total_blocks, len(to_free))

    def _free_held(self, req_id: str) -> None:
        """Free the held blocks whose store copy was confirmed since they were due."""
        held = self._held[req_id]
        stored = self._stored(req_id) if self._stored is not None else ()
        ready = sorted(p for p in held if p in stored)
        if not ready:
            return
        held.difference_update(ready)
        self.blocks.release(req_id, ready)
        updates = self.pending.setdefault(req_id, {})
        for p in ready:
            updates[p] = self.blocks.null_block_id
        self.stats.decode_blocks_freed += len(ready)
        self.stats.blocks_freed += len(ready)

    # ------------------------------------------------------------------ once per step
    def take_updates(self, scheduled: Mapping[str, int] | Iterable[str]) -> dict[str, dict[int, int]]:
        """The updates of requests scheduled in this step; those of requests that still hold their blocks but
        were not scheduled wait for their next step, those of preempted requests (blocks freed, a dense
        re-prefill follows) are dropped."""
        ready: dict[str, dict[int, int]] = {}
        scheduled = set(scheduled)
        for req_id in list(self.pending):
            if req_id in scheduled:
                ready[req_id] = self.pending.pop(req_id)
            elif self.blocks is None or self.blocks.block_ids(req_id) is None:
                self.pending.pop(req_id)
        return ready

    def step_meta(self, scheduler_output: Any) -> SparseStepMeta:
        """What the workers' sparse runtime needs from this step's schedule (sent in the connector metadata)."""
        cached = scheduler_output.scheduled_cached_reqs
        return SparseStepMeta(
            block_updates=self.take_updates(scheduler_output.num_scheduled_tokens),
            new_req_ids=[r.req_id for r in scheduler_output.scheduled_new_reqs],
            resumed_req_ids=sorted(getattr(cached, "resumed_req_ids", None) or ()),
        )

    def request_finished(self, req_id: str) -> None:
        self.pending.pop(req_id, None)
        self._shrunk.pop(req_id, None)
        self._planned_blocks.pop(req_id, None)
        self._held.pop(req_id, None)
        self.sparse.request_finished(req_id)
