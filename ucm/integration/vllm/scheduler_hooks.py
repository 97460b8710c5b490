"""Scheduler-side sparse budget: shrink a sparse request's KV blocks at its first decode step.

Installed by `ucm.integration.vllm.plugin`: `install()` wraps ``Scheduler.__init__``; a scheduler whose KV
connector carries a sparse method (``connector.ucm_sparse``) gets a `SparseBudget` bound to its own
``kv_cache_manager`` (instance-level wrappers: other schedulers are untouched).

What it does, each time the scheduler allocates slots for a request in decode:
1. asks the sparse algorithm for the request's `BlockPlan` (``sparse.block_plan``);
2. if positions are to be freed and are not yet: frees them to vLLM's block pool and puts the null block in
   their place in the request's block list, as vLLM's sliding window does (`remove_skipped_blocks`); allocation
   of new blocks keeps working because the list keeps its length;
3. makes the work-slot blocks exclusive to the request: the worker overwrites them with other logical blocks,
   so a block shared with another request (prefix cache hit) is replaced by a private copy (vLLM's own
   copy-on-write path copies it on the worker before the step), and a private block is dropped from the prefix
   cache index (its content will change);
4. records the changed positions (position -> block id) so the worker learns them: vLLM's worker block table
   only appends, it never hears about replaced or freed positions. They travel on the step's
   ``SchedulerOutput`` (attribute `BLOCK_UPDATES_ATTR`) to `ucm.integration.vllm.model_runner_hooks`.

The check "already shrunk" reads the block list itself (freed positions hold the null block), so preemption
(vLLM frees everything and re-prefills densely) and resume need no extra state.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from ucm.errors import UcmConfigError
from ucm.sparse.base import UcmSparseBase

logger = logging.getLogger(__name__)

#: Attribute of vLLM's SchedulerOutput: {request id: {block position: new physical block id}}.
BLOCK_UPDATES_ATTR = "ucm_sparse_block_updates"


@dataclass
class BudgetStats:
    """Scheduler-side counters (read by tests and logged)."""

    shrinks: int = 0
    blocks_freed: int = 0
    work_blocks_copied: int = 0  # shared work-slot blocks replaced by a private copy
    work_blocks_unindexed: int = 0  # private work-slot blocks removed from the prefix cache index


class SparseBudget:
    """Applies the sparse algorithm's block plans to one scheduler's KV cache manager."""

    def __init__(self, sparse: UcmSparseBase, kv_cache_manager: Any):
        managers = kv_cache_manager.coordinator.single_type_managers
        if len(managers) != 1:
            raise UcmConfigError("KV cache groups", len(managers), "exactly 1 (one full-attention group) for sparse")
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        spec = managers[0].kv_cache_spec
        if not isinstance(spec, FullAttentionSpec):
            raise UcmConfigError("KV cache spec", type(spec).__name__, "FullAttentionSpec for sparse attention")
        self.sparse = sparse
        self.kv_cache_manager = kv_cache_manager
        self.manager = managers[0]
        self.block_pool = kv_cache_manager.block_pool
        self.null_block = self.block_pool.null_block
        self.block_size = self.manager.block_size
        if sparse.block_size != self.block_size:
            raise UcmConfigError("sparse block_size", sparse.block_size, f"vLLM's block size {self.block_size}")
        self.pending: dict[str, dict[int, int]] = {}
        self.stats = BudgetStats()

    # ------------------------------------------------------------------ called around allocate_slots
    def before_allocate(self, request: Any, num_new_tokens: int) -> None:
        """Shrink ``request`` if this allocation is for one of its decode steps and it holds freed positions."""
        # vLLM's own prefill boundary: a resumed request re-prefills its output tokens too
        if request.num_computed_tokens < max(request.num_prompt_tokens, request.num_tokens - 1):
            return
        plan = self.sparse.block_plan(request, num_new_tokens)
        if not plan.sparse or not plan.freed_positions:
            return
        blocks = self.manager.req_to_blocks.get(request.request_id)
        if not blocks:
            return
        to_free = [p for p in plan.freed_positions if p < len(blocks) and not blocks[p].is_null]
        if not to_free:
            return  # already shrunk
        updates = self.pending.setdefault(request.request_id, {})
        freed = []
        for p in to_free:
            freed.append(blocks[p])
            blocks[p] = self.null_block
            updates[p] = self.null_block.block_id
        # tail-first like vLLM's own frees, so cached prefix blocks of the request are evicted last
        self.block_pool.free_blocks(reversed(freed))
        for p in plan.work_positions:
            self._make_exclusive(request.request_id, blocks, p, updates)
        self.stats.shrinks += 1
        self.stats.blocks_freed += len(freed)
        logger.debug(
            "ucm sparse: request %s keeps %d of %d blocks (%d freed)",
            request.request_id, plan.num_blocks, plan.num_total_blocks, len(freed),
        )

    def _make_exclusive(self, req_id: str, blocks: list, pos: int, updates: dict[int, int]) -> None:
        block = blocks[pos]
        if block.is_null:
            return
        if block.ref_cnt > 1:
            # Shared through the prefix cache: give the request a private copy. vLLM's copy-on-write path
            # (the same one partial prefix hits use) copies the content on the worker before this step and
            # keeps both blocks alive until then; our reference to the shared block is released with it.
            private = self.block_pool.get_new_blocks(1)[0]
            self.manager._apply_cow(req_id, pos, block, private)
            updates[pos] = private.block_id
            self.stats.work_blocks_copied += 1
        elif block.block_hash is not None:
            # Private but indexed: its content changes from now on, so no later request may hit it.
            self.block_pool.evict_blocks({block.block_id})
            self.stats.work_blocks_unindexed += 1

    # ------------------------------------------------------------------ called around schedule
    def take_updates(self, scheduled: Any) -> dict[str, dict[int, int]]:
        """The updates of requests scheduled in this step; those of requests that still hold their blocks but
        were not scheduled wait for their next step, those of preempted requests (blocks freed, a dense
        re-prefill follows) are dropped."""
        ready: dict[str, dict[int, int]] = {}
        for req_id in list(self.pending):
            if req_id in scheduled:
                ready[req_id] = self.pending.pop(req_id)
            elif req_id not in self.manager.req_to_blocks:
                self.pending.pop(req_id)
        return ready


def connector_sparse(connector: Any) -> UcmSparseBase | None:
    """The sparse algorithm a KV connector carries, or None (no connector, or no sparse method)."""
    sparse = getattr(connector, "ucm_sparse", None) if connector is not None else None
    return sparse if isinstance(sparse, UcmSparseBase) else None


def attach(scheduler: Any) -> SparseBudget | None:
    """Bind a `SparseBudget` to ``scheduler`` when its connector has a sparse method; None otherwise."""
    sparse = connector_sparse(getattr(scheduler, "connector", None))
    if sparse is None:
        return None
    budget = SparseBudget(sparse, scheduler.kv_cache_manager)
    manager = scheduler.kv_cache_manager
    allocate_slots = manager.allocate_slots
    schedule = scheduler.schedule

    @functools.wraps(allocate_slots)
    def allocate_slots_with_budget(request: Any, num_new_tokens: int, *args: Any, **kwargs: Any) -> Any:
        if num_new_tokens > 0:
            budget.before_allocate(request, num_new_tokens)
        return allocate_slots(request, num_new_tokens, *args, **kwargs)

    @functools.wraps(schedule)
    def schedule_with_updates(*args: Any, **kwargs: Any) -> Any:
        output = schedule(*args, **kwargs)
        setattr(output, BLOCK_UPDATES_ATTR, budget.take_updates(output.num_scheduled_tokens))
        return output

    manager.allocate_slots = allocate_slots_with_budget
    scheduler.schedule = schedule_with_updates
    scheduler.ucm_sparse_budget = budget
    logger.info("ucm sparse: scheduler budget active (%s, block size %d)", type(sparse).__name__, budget.block_size)
    return budget


def install() -> None:
    """Wrap ``Scheduler.__init__`` so schedulers of sparse engines get a budget (idempotent)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    if getattr(Scheduler.__init__, "_ucm_sparse_hook", False):
        return
    original = Scheduler.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        attach(self)

    __init__._ucm_sparse_hook = True  # type: ignore[attr-defined]
    Scheduler.__init__ = __init__
