"""The sparse-attention framework contract: `UcmSparseBase`, one object per role per engine.

A sparse algorithm (ESA is the first) is written once against this class and driven by an engine integration
(the vLLM hooks in `ucm.integration.vllm`), never the other way round. The integration creates the object with
`ucm.sparse.create_sparse(method, ucm_sparse_config, role, ...)` and calls the methods below; everything an
algorithm needs from the engine arrives as plain arguments (`SparseRequestView`, `SparseBatch`, tensors).

Lifecycle of one request
------------------------
Scheduler process (role SCHEDULER), in the engine's scheduler loop::

    request_begin(request)                       # once, when the request is added (or re-added)
    every step that allocates KV for it:
        plan = block_plan(request, num_new_tokens)   # which logical block positions stay resident
        # = estimate_num_slots_sparse(request) when only the count is needed
        # the integration frees plan.freed_positions (replaces them by the null block)
    request_finished(request_id)                 # finished or aborted

Worker process (role WORKER), around each model step::

    register_kv_caches(kv_caches, key_views)     # once, after the KV cache is allocated
    every step:
        execute_begin(batch)                     # before the forward: requests of this step, in batch order
        view = step_view(block_table, seq_lens)  # a step whose layers all attend one view, with no per-layer
                                                 # work: the integration puts it in the engine's own metadata
                                                 # (one CUDA graph for the step) and skips the layer hooks
        otherwise, for each attention layer, in model order:
            view = attention_begin(layer_name, query, key, value, kv_cache, block_table, seq_lens)
            # the integration runs the engine's attention with view.block_table / view.seq_lens when not None
            attention_finished(layer_name, query, key, value, attn_output, kv_cache)
        execute_finished()                       # after the forward (stats, bookkeeping)
    request_finished(request_id)                 # frees the request's device state

Conventions
-----------
- A *logical block position* p of a request covers its tokens [p * block_size, (p + 1) * block_size).
  ``block_ids[p]`` (the engine's block-table row) is the physical block holding it; positions freed by the budget
  hold the engine's null block id.
- Prefill is dense. A request becomes sparse at its first decode step (``num_computed_tokens >=
  num_prompt_tokens``), when the scheduler shrinks it to ``block_plan(...).kept_positions``.
- Work slots (see `ucm.sparse.budget`) are overwritten by the worker with other logical blocks loaded from the
  store: the integration must give a sparse request exclusive blocks there (not shared through the prefix cache
  with another request, and no longer registered in the prefix cache under their original content hash).
- Every method has a safe default except the few an algorithm must define; defaults keep the request dense.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from ucm.device.backend import Cache


class UcmSparseRole(enum.Enum):
    """Which engine process an instance serves."""

    SCHEDULER = "scheduler"
    WORKER = "worker"


#: `estimate_num_slots_sparse` result for a request the algorithm leaves dense (allocate as usual).
INVALID_SLOTS = -1


@runtime_checkable
class SparseRequestView(Protocol):
    """What the scheduler side reads from a request (vLLM's `vllm.v1.request.Request` satisfies it as is)."""

    request_id: str
    num_prompt_tokens: int
    num_computed_tokens: int

    @property
    def num_tokens(self) -> int:
        """Prompt tokens plus output tokens generated so far."""
        ...


@dataclass(frozen=True)
class BlockPlan:
    """The scheduler's decision for one request at one step (see `ucm.sparse.budget.plan_blocks`).

    ``sparse``: False -> keep every block (dense request or still in prefill). Positions are logical block
    positions, ascending. ``num_blocks`` = len(kept_positions) = blocks the request needs now;
    ``num_slots`` = num_blocks * block_size (KV token slots). ``work_positions`` (subset of kept) are the
    positions whose physical blocks the worker reuses as work slots (slot j = work_positions[j]);
    ``spare_positions`` (subset of kept, never attended) those it loads blocks into ahead of their use. The worker
    overwrites both, so the integration makes them exclusive to the request.
    ``decode_blocks_from``: freed positions at or after it hold blocks filled in decode, whose store copy is
    written then: the integration frees such a block only once that copy is confirmed (else it stays resident).
    """

    sparse: bool
    block_size: int
    num_total_blocks: int
    kept_positions: tuple[int, ...]
    freed_positions: tuple[int, ...]
    work_positions: tuple[int, ...] = ()
    sink_positions: tuple[int, ...] = ()
    candidate_positions: tuple[int, ...] = ()
    decode_blocks_from: int = 0
    spare_positions: tuple[int, ...] = ()

    @property
    def num_blocks(self) -> int:
        return len(self.kept_positions)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size


@dataclass
class SparseRequestStep:
    """One request of a worker step, built by the integration from the engine's batch (one per row).

    ``num_computed_tokens``: tokens whose KV is in the cache before this step; ``num_scheduled_tokens``: tokens
    computed in this step (1 in plain decode). ``block_ids``: the request's block-table row (logical position ->
    physical block; the null block where the budget freed it). ``query_start``: index of the request's first
    query token in the step's flattened query (vLLM's ``query_start_loc[row]``). ``block_hashes``: store ids of
    the request's full prompt blocks, position order (offload mode; from the connector). ``resumed``: True on the
    first step after a preemption (device state of the request is rebuilt).
    """

    req_id: str
    num_prompt_tokens: int
    num_computed_tokens: int
    num_scheduled_tokens: int
    block_ids: Sequence[int]
    query_start: int
    block_hashes: Sequence[str] | None = None
    resumed: bool = False

    @property
    def seq_len(self) -> int:
        """Tokens whose KV the attention of this step reads (dense)."""
        return self.num_computed_tokens + self.num_scheduled_tokens

    @property
    def is_decode(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    @property
    def finishes_prefill(self) -> bool:
        """True in the step that computes the last prompt token (the last prefill chunk)."""
        return self.num_computed_tokens < self.num_prompt_tokens <= self.seq_len


@dataclass
class SparseBatch:
    """The requests of one worker step, in the engine's batch order (row i of block_table / seq_lens)."""

    requests: list[SparseRequestStep]
    block_size: int
    null_block_id: int = 0


@dataclass
class SparseAttentionView:
    """What one layer's attention must read this step, for every row of the batch.

    ``block_table`` int32 [num_reqs, width] and ``seq_lens`` int32 [num_reqs] on the cache's device, rows in
    batch order; rows of dense/prefill requests are the engine's own. ``max_seq_len`` is max(seq_lens).
    The integration passes them to the attention implementation for this layer only (the engine's own
    metadata stays unchanged for other layers and steps), or, for a `UcmSparseBase.step_view`, writes them into
    the engine's metadata for the whole step.
    """

    block_table: torch.Tensor
    seq_lens: torch.Tensor
    max_seq_len: int


@dataclass
class SparseStepStats:
    """Counters of one worker step (the connector aggregates them into its stats and log line)."""

    sparse_requests: int = 0
    resident_blocks: int = 0  # sum over sparse requests and layers of blocks attended
    full_blocks: int = 0  # the same with dense attention
    retrievals: int = 0  # (request, layer) retrievals submitted
    retrievals_consumed: int = 0  # (request, layer) retrievals whose selection was taken
    blocks_loaded: int = 0  # (request, layer) blocks loaded from the store, ahead or at a consume step
    blocks_prefetched: int = 0  # of which loaded ahead into spare slots (ESA's `prefetch_ratio`)
    ahead_held: int = 0  # batches of loads ahead queued from a held stream (`Backend.hold_stream`) this step
    ahead_released_late: int = 0  # of those held before, the ones found opened by their timeout at `forward_begin`
    load_failures: int = 0
    failed_block_hashes: list[str] = field(default_factory=list)
    host_s: float = 0.0  # host time in the algorithm's hooks this step (set by the runtime that drives them)
    load_wait_s: float = 0.0  # of which waiting for store loads to complete
    end_s: float = 0.0  # of which after the forward was queued (`execute_finished`; set by the runtime)
    view_step: bool = False  # the step attended one view in the engine's metadata (no layer hooks; set by the runtime)
    #: req_id -> [blocks attended, blocks dense would read, layers] summed over this step's layers (sparse requests)
    request_blocks: dict[str, list[int]] = field(default_factory=dict)
    retrieval_s: list[float] = field(default_factory=list)  # host seconds of each batched retrieval (one layer)


@dataclass(frozen=True)
class QueryShape:
    """What a step's query looks like to the attention hook: up to ``rows`` rows are staged (the most requests
    a step decodes), ``heads`` query heads of ``head_dim``, in the model's ``dtype``."""

    rows: int
    heads: int
    head_dim: int
    dtype: torch.dtype


@runtime_checkable
class PackedKeys(Protocol):
    """A layer's K whose packing no strided view expresses (vLLM-CPU's "amx" kernel interleaves head dims across
    tokens): read by block instead. ``shape`` is the logical ``[num_blocks, block_size, num_kv_heads, head_dim]``."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def dim(self) -> int: ...

    def read_blocks(self, block_ids: torch.Tensor) -> torch.Tensor:
        """K of the listed blocks, ``[n, block_size, num_kv_heads, head_dim]`` (a copy)."""
        ...


class UcmSparseBase:
    """Base of every sparse-attention algorithm. Subclasses set `name` and override what they need.

    Constructed through `ucm.sparse.create_sparse`; ``config`` is the method's validated config object
    (an instance of `config_class`, built with ``config_class.from_mapping(ucm_sparse_config.get(name))``).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[Any] = None

    def __init__(self, config: Any, role: UcmSparseRole, block_size: int):
        self.config = config
        self.role = role
        self.block_size = block_size

    # ============================================================== scheduler side
    def request_begin(self, request: SparseRequestView) -> None:
        """Scheduler: a request was added (also after it was re-queued by preemption). Default: nothing."""

    def block_plan(self, request: SparseRequestView, num_new_tokens: int = 1) -> BlockPlan:
        """Scheduler: which logical block positions `request` keeps once ``num_new_tokens`` more are computed.

        Called each time the scheduler allocates KV for the request; pure (the same inputs give the same plan,
        so preemption/resume needs no state). Default: dense (keep everything).
        """
        num_tokens = request.num_computed_tokens + num_new_tokens
        total = -(-num_tokens // self.block_size)
        return BlockPlan(False, self.block_size, total, tuple(range(total)), ())

    def estimate_num_slots_sparse(self, request: SparseRequestView, num_new_tokens: int = 1) -> int:
        """Scheduler: KV token slots the request needs now, or `INVALID_SLOTS` when it stays dense."""
        plan = self.block_plan(request, num_new_tokens)
        return plan.num_slots if plan.sparse else INVALID_SLOTS

    def request_finished(self, request_id: str) -> None:
        """Both roles: the request finished or was aborted; drop its state (device memory on the worker)."""

    # ============================================================== worker side
    def register_kv_caches(
        self, kv_caches: Mapping[str, Cache], key_views: Mapping[str, torch.Tensor | PackedKeys] | None = None,
        query_shape: QueryShape | None = None,
    ) -> None:
        """Worker: the engine's KV caches, layer name -> page tensor or (k, v) tuple, in model layer order.

        This order must be the store row order used by the connector (a stored block row = every layer's page
        concatenated in this order), so layer L's part starts at the sum of the earlier layers' page bytes.
        ``key_views[layer]`` is a K view ``[num_blocks, block_size, num_kv_heads, head_dim]`` of the same
        memory, or a `PackedKeys` where no view can express the packing; it may be omitted for (k, v) tuples
        whose k already has that shape. ``query_shape``: given when
        the engine copies each layer's query into `query_stage` in every step (see there).
        """

    def query_stage(self, layer_name: str) -> torch.Tensor | None:
        """Worker: a buffer ``[rows, num_q_heads, head_dim]`` into which the engine's attention hook copies the
        first ``rows`` query rows of this layer in every step, before the attention and also inside a step that
        runs as one captured graph (the copy is captured with the layer). A method reads a step's queries there
        at the step boundary (`execute_finished`) instead of in per-layer hooks. None: nothing to copy."""
        return None

    def execute_begin(self, batch: SparseBatch) -> None:
        """Worker: before the forward of a step; ``batch`` lists its requests in batch order."""

    def forward_begin(self) -> None:
        """Worker: the step's input copies are queued on the current stream, its forward is not yet (called after
        `execute_begin` and `step_view`, where the release bindings can place it; a method must not rely on it for
        correctness). Work held until then (`Backend.hold_stream`) may be released here."""

    def step_view(self, block_table: torch.Tensor, seq_lens: torch.Tensor) -> SparseAttentionView | None:
        """Worker, after `execute_begin`: the view every layer of this step attends, when the step needs no
        per-layer work (no query to read, no load to wait for, no layer with its own table); None otherwise.

        ``block_table``/``seq_lens`` are the engine's for this step (the same `attention_begin` would get). When
        a view is returned, `attention_begin`/`attention_finished` are not called this step (the engine may run
        the whole step as one captured graph), so the view must also count the step's stats for every layer.
        Default: None (per-layer hooks every step)."""
        return None

    def attention_begin(
        self,
        layer_name: str,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: Cache,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
    ) -> SparseAttentionView | None:
        """Worker: before layer ``layer_name``'s attention (``query`` [num_tokens, num_q_heads, head_dim]).

        ``block_table``/``seq_lens`` are the engine's for this step. Returns the table and lengths this layer's
        attention must use, or None to attend densely. May block until this layer's pending loads are done.
        """
        return None

    def attention_finished(
        self,
        layer_name: str,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_output: torch.Tensor,
        kv_cache: Cache,
    ) -> None:
        """Worker: after layer ``layer_name``'s attention; this step's KV of the layer is in ``kv_cache``."""

    def execute_finished(self) -> SparseStepStats:
        """Worker: after the forward of a step; returns the step's counters."""
        return SparseStepStats()
