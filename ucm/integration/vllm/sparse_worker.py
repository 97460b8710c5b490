"""Worker-side sparse runtime: drives the sparse algorithm around each model step and each attention layer.

Owned by the connector's worker role (``connector.sparse_runtime``), created in ``register_kv_caches``;
release-independent. Who calls what:

- the connector, each step before the forward: `on_step_meta` with the scheduler's `SparseStepMeta` (block
  positions the budget changed, new and resumed requests) and the requests that finished;
- the release bindings' model-runner hooks: `begin_step` with the step's `BatchRow`s, then (where the release
  can put a view into the engine's own metadata) `step_view` before vLLM builds the step's attention metadata,
  `forward_begin` once the step's inputs are queued, and `end_step` after the forward;
- the release bindings' attention hook, per layer while `in_step`: `attention_begin` (may return the layer's
  sparse view) and `attention_finished`; not called into the algorithm in a step whose `step_view` was taken.

The algorithm never sees vLLM types: it gets a `SparseBatch` (each request's block row with the freed positions
as the null block) and the engine's block table and lengths as tensors.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ucm.errors import UcmError
from ucm.integration.vllm.compat.base import BatchRow
from ucm.integration.vllm.metadata import SparseStepMeta
from ucm.sparse.base import SparseAttentionView, SparseBatch, SparseRequestStep, SparseStepStats, UcmSparseBase


class SparseViewMissingError(UcmError, RuntimeError):
    """A request whose blocks were freed by the budget would be attended densely (it would read freed blocks)."""


class SparseDeviceMemoryError(UcmError, MemoryError):
    """The sparse method ran out of device memory: its per-request device state (ESA: the block representations
    of every running sparse request's whole context, about 1/32 of its K and V with 16-token blocks, and the
    selection's buffers) is allocated outside the KV cache budget vLLM sizes with ``gpu_memory_utilization``."""

    def __init__(self, method: str, hook: str, error: BaseException):
        self.method, self.hook = method, hook
        super().__init__(
            f"sparse method {method} ran out of device memory in {hook}: its per-request device state lives "
            f"outside vLLM's KV cache budget; leave it room with a lower gpu_memory_utilization (or fewer "
            f"concurrent long requests, max_num_seqs). Device error: {str(error).splitlines()[0]}")


@contextlib.contextmanager
def _device_memory(sparse: UcmSparseBase, hook: str) -> Iterator[None]:
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise SparseDeviceMemoryError(getattr(sparse, "name", type(sparse).__name__), hook, exc) from exc


@dataclass
class StepCounters:
    """What the last step did (tests read it): hooked layer calls, and those that attended through a view."""

    layers_seen: int = 0
    layers_sparse: int = 0
    step_view: bool = False  # the step attended one view written into the engine's metadata


@dataclass
class RuntimeTotals:
    """Counters since the engine started (summed over steps). ``*_s``: host seconds spent in the sparse
    algorithm's hooks (what a step costs the CPU beyond vLLM's own work; device work they queue is not in it)."""

    steps: int = 0
    forward_begins: int = 0  # steps whose forward was announced (`forward_begin`): held loads are released there
    view_steps: int = 0  # steps that attended one view written into the engine's metadata (no layer hooks)
    stats: SparseStepStats = field(default_factory=SparseStepStats)
    begin_s: float = 0.0  # execute_begin (batch rows, initial loads)
    attention_s: float = 0.0  # attention_begin + attention_finished over all layers (views, retrieval, loads)
    end_s: float = 0.0  # execute_finished


class SparseWorkerRuntime:
    """The sparse algorithm of one worker, between vLLM's hooks and `UcmSparseBase`."""

    def __init__(
        self,
        sparse: UcmSparseBase,
        block_size: int,
        null_block_id: int = 0,
        store_ids: Callable[[str], Sequence[str] | None] | None = None,
        on_stats: Callable[[SparseStepStats], None] | None = None,
    ):
        self.sparse = sparse
        self.block_size = block_size
        self.null_block_id = null_block_id
        self._store_ids = store_ids  # req_id -> store ids of its full prompt blocks (the connector's naming)
        self._on_stats = on_stats
        self._overrides: dict[str, dict[int, int]] = {}  # req_id -> {position: block id} from the scheduler
        #: req_id -> its block row with the overrides applied (extended as the runner's row grows)
        self._rows: dict[str, list[int]] = {}
        self._resumed: set[str] = set()
        self._shrunk_rows: frozenset[int] = frozenset()
        self.in_step = False
        self._view_in_metadata = False
        self.last_step = StepCounters()
        self.totals = RuntimeTotals()
        self._step_host_s = 0.0

    # ------------------------------------------------------------------ before the forward (connector)
    def on_step_meta(self, meta: SparseStepMeta | None, finished_req_ids: Sequence[str]) -> None:
        for req_id in finished_req_ids:
            self._overrides.pop(req_id, None)
            self._rows.pop(req_id, None)
            self.sparse.request_finished(req_id)
        if meta is None:
            self._resumed = set()
            return
        self._resumed = set(meta.resumed_req_ids)
        for req_id in [*meta.new_req_ids, *meta.resumed_req_ids]:
            self._overrides.pop(req_id, None)  # vLLM rebuilds the row: prefilled (again) into fresh blocks
            self._rows.pop(req_id, None)
        for req_id, updates in meta.block_updates.items():
            self._overrides.setdefault(req_id, {}).update(updates)
            self._rows.pop(req_id, None)

    # ------------------------------------------------------------------ around the forward (model-runner hook)
    def begin_step(self, rows: Sequence[BatchRow]) -> None:
        started = time.perf_counter()
        batch, self._shrunk_rows = self._batch(rows)
        self.last_step = StepCounters()
        self._view_in_metadata = False
        with _device_memory(self.sparse, "execute_begin"):
            self.sparse.execute_begin(batch)
        self.in_step = True
        self._step_host_s = elapsed = time.perf_counter() - started
        self.totals.begin_s += elapsed

    def step_view(self, block_table: torch.Tensor, seq_lens: torch.Tensor) -> SparseAttentionView | None:
        """The view the whole step attends (`UcmSparseBase.step_view`), for the bindings to write into the engine's
        metadata; from then on the layer hooks of this step only count layers. None: per-layer hooks."""
        started = time.perf_counter()
        with _device_memory(self.sparse, "step_view"):
            view = self.sparse.step_view(block_table, seq_lens) if self.in_step else None
        self._view_in_metadata = view is not None
        self.last_step.step_view = self._view_in_metadata
        self.totals.view_steps += self._view_in_metadata
        elapsed = time.perf_counter() - started
        self.totals.begin_s += elapsed
        self._step_host_s += elapsed
        return view

    def forward_begin(self) -> None:
        """The step's inputs are queued, its forward comes next (`UcmSparseBase.forward_begin`)."""
        if not self.in_step:
            return
        started = time.perf_counter()
        self.totals.forward_begins += 1
        with _device_memory(self.sparse, "forward_begin"):
            self.sparse.forward_begin()
        elapsed = time.perf_counter() - started
        self.totals.begin_s += elapsed
        self._step_host_s += elapsed

    @property
    def needs_layer_hooks(self) -> bool:
        """Whether this step's layers must run the attention hooks (False once the step's view is in the
        engine's metadata: the step may then run as one captured graph)."""
        return self.in_step and not self._view_in_metadata

    def end_step(self) -> None:
        started = time.perf_counter()
        self.in_step = False
        view_step, self._view_in_metadata = self._view_in_metadata, False
        with _device_memory(self.sparse, "execute_finished"):
            stats = self.sparse.execute_finished()
        stats.view_step = view_step
        elapsed = time.perf_counter() - started
        self.totals.end_s += elapsed
        stats.host_s = self._step_host_s + elapsed
        stats.end_s = elapsed
        self.totals.steps += 1
        t = self.totals.stats
        t.sparse_requests += stats.sparse_requests
        t.resident_blocks += stats.resident_blocks
        t.full_blocks += stats.full_blocks
        t.retrievals += stats.retrievals
        t.retrievals_consumed += stats.retrievals_consumed
        t.blocks_loaded += stats.blocks_loaded
        t.blocks_prefetched += stats.blocks_prefetched
        t.ahead_held += stats.ahead_held
        t.ahead_released_late += stats.ahead_released_late
        t.load_failures += stats.load_failures
        t.host_s += stats.host_s
        t.load_wait_s += stats.load_wait_s
        t.failed_block_hashes.extend(stats.failed_block_hashes)
        if self._on_stats is not None:
            self._on_stats(stats)

    def _batch(self, rows: Sequence[BatchRow]) -> tuple[SparseBatch, frozenset[int]]:
        requests: list[SparseRequestStep] = []
        shrunk: set[int] = set()
        for index, row in enumerate(rows):
            overrides = self._overrides.get(row.req_id)
            if overrides:
                block_ids = self._row_with(row, overrides)
                if self.null_block_id in overrides.values():
                    shrunk.add(index)
            else:
                block_ids = row.block_ids
            requests.append(
                SparseRequestStep(
                    req_id=row.req_id,
                    num_prompt_tokens=row.num_prompt_tokens,
                    num_computed_tokens=row.num_computed_tokens,
                    num_scheduled_tokens=row.num_scheduled_tokens,
                    block_ids=block_ids,
                    query_start=row.query_start,
                    block_hashes=self._store_ids(row.req_id) if self._store_ids is not None else None,
                    resumed=row.req_id in self._resumed,
                )
            )
        return SparseBatch(requests, self.block_size, self.null_block_id), frozenset(shrunk)

    def _row_with(self, row: BatchRow, overrides: dict[int, int]) -> list[int]:
        """The runner's row with the scheduler's overrides applied; rebuilt only when the overrides change, else
        extended by the blocks vLLM appended since (appended positions carry no override)."""
        cached = self._rows.get(row.req_id)
        runner_row = row.block_ids
        if cached is None or len(cached) > len(runner_row):
            cached = list(runner_row)
            for pos, block_id in overrides.items():
                if pos < len(cached):
                    cached[pos] = block_id
            self._rows[row.req_id] = cached
        elif len(cached) < len(runner_row):
            cached.extend(runner_row[len(cached):])
        return cached

    # ------------------------------------------------------------------ per attention layer (attention hook)
    def stage_query(self, layer_name: str, query: torch.Tensor) -> None:
        """Copy the layer's first query rows into the method's `UcmSparseBase.query_stage` (if it keeps one). Called
        by the attention hook in every forward with attention metadata, in or out of a step, so that a graph
        captured from a dummy forward copies them too."""
        stage = self.sparse.query_stage(layer_name)
        if stage is None:
            return
        n = min(stage.shape[0], query.shape[0])
        stage[:n].copy_(query[:n].reshape(n, *stage.shape[1:]))

    def attention_begin(
        self, layer_name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: Any,
        block_table: torch.Tensor, seq_lens: torch.Tensor,
    ) -> SparseAttentionView | None:
        """The view this layer must attend through, or None to attend densely."""
        self.last_step.layers_seen += 1
        if self._view_in_metadata:
            self.last_step.layers_sparse += 1  # the engine's metadata already holds the step's view
            return None
        started = time.perf_counter()
        with _device_memory(self.sparse, "attention_begin"):
            view = self.sparse.attention_begin(layer_name, query, key, value, kv_cache, block_table, seq_lens)
        elapsed = time.perf_counter() - started
        self.totals.attention_s += elapsed
        self._step_host_s += elapsed
        if view is not None:
            self.last_step.layers_sparse += 1
        elif self._shrunk_rows:
            raise SparseViewMissingError(
                f"layer {layer_name}: the sparse method returned no view although batch rows "
                f"{sorted(self._shrunk_rows)} hold freed blocks"
            )
        return view

    def attention_finished(
        self, layer_name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: Any,
        kv_cache: Any,
    ) -> None:
        if self._view_in_metadata:
            return
        started = time.perf_counter()
        with _device_memory(self.sparse, "attention_finished"):
            self.sparse.attention_finished(layer_name, query, key, value, output, kv_cache)
        elapsed = time.perf_counter() - started
        self.totals.attention_s += elapsed
        self._step_host_s += elapsed
