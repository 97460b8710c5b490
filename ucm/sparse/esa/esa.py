"""ESA (block-mean retrieval sparse attention): the `UcmSparseBase` the engine integration drives for "ESA".

Scheduler role: the budget (`ucm.sparse.budget`): prefill is dense; in decode a sparse request keeps its sink
window, k work slots, its local window and the partial tail, whatever its output length: a block that leaves the
local window (a prompt block, then generated blocks, dumped by the connector as they fill) becomes a candidate.

Worker role, per request and per layer (each layer has its own KV tensor, so each layer has its own selection):
- last prefill chunk (`attention_finished`): block representations (mean K per KV head over each
  ``repr_tokens`` slice of a block; a block scores as its best slice) of the
  candidate blocks and of the full blocks of the local window, kept on the device until the request ends, and an
  initial selection scored with the last prompt token's query; the blocks that fill in decode get theirs in the
  step that fills them (still in the local window, so resident), and the candidates of a step are the
  representations of [sink, L) (`WindowLayout.local_start_at`);
- decode (`attention_begin`): the pipeline of `ucm.sparse.esa.schedule` — retrieval (scores + top-k through the
  device layer) on a side stream, delta loads of newly selected blocks from the store into the work slots
  (offload mode), waited just before the attention that reads them; returns the layer's sparse block table and
  sequence lengths. In resident mode (no offload) the selection only rewrites the block table.
- boundary mode (offload, and the engine stages each layer's query rows in `query_stage`): the same pipeline run
  once per step for all layers at the step's edges (`_boundary`): one selection for every layer and request
  after the submit step's forward, every layer's delta loaded and waited before the consume step's forward; the
  steps between need no per-layer work (`step_view`: on a GPU, full CUDA graphs).
- a failed load never reaches the attention: the slot keeps the block it held (the store leaves failed pages
  unwritten) and the failure is reported in `SparseStepStats`.
- a candidate that left the local window but still holds its block (its store copy is not confirmed yet, or
  ``sparse_ratio`` 1.0) is attended where it lies, after the work slots, and never loaded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ucm.device import Backend, StreamGate, as_page_tensors, get_backend, page_nbytes
from ucm.device.backend import Cache
from ucm.errors import UcmConfigError
from ucm.sparse.base import (
    BlockPlan,
    PackedKeys,
    QueryShape,
    SparseAttentionView,
    SparseBatch,
    SparseRequestStep,
    SparseRequestView,
    SparseStepStats,
    UcmSparseBase,
    UcmSparseRole,
)
from ucm.sparse.budget import WindowLayout, plan_blocks, window_layout
from ucm.sparse.config import EsaConfig
from ucm.sparse.esa.retriever import BatchRetrieval, EsaRetriever
from ucm.sparse.esa.schedule import EsaSchedule

_log = logging.getLogger(__name__)

#: layers whose consume-step loads go to the store as one task (a model's layers in a few tasks: one call per layer
#: costs host time per call, one call for all layers leaves the copies idle until every layer is planned)
_LOAD_GROUP = 8
#: pins a request holds at most before its pins after the prompt's are merged (`Esa._extend_pins`)
_MAX_PINS = 8


@dataclass
class _LayerState:
    """One layer of one request on the worker."""

    reps: torch.Tensor | None = None  # [num_candidates * parts, num_kv_heads, head_dim], cache dtype
    #: offload: logical position held by work slot j, -1 = none (numpy: the delta of a retrieval is a few vector
    #: ops per request and layer, not a Python loop over k slots)
    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    selected: list[int] = field(default_factory=list)  # resident: selected logical positions
    pending: Pick | None = None  # submitted, not consumed yet
    due: Pick | None = None  # to consume once this step's attention of the layer is queued
    last_pick: Pick | None = None  # offload: the selection the work slots follow (consumed last)
    #: loads in flight: (slots, new positions, old positions, the request's store ids by position)
    loading: tuple[np.ndarray, np.ndarray, np.ndarray, Any] | None = None
    load_task: Any = None  # the store task of `loading`
    #: boundary mode: new blocks of the pending selection loaded ahead into the request's spare slots:
    #: (the pick they serve, their positions, the spare slot of each, the request's store ids, the store task)
    prefetch: tuple[Pick, np.ndarray, np.ndarray, Any, Any] | None = None
    prefill_query: torch.Tensor | None = None  # last prompt token's query, between attention begin and finished
    holes: bool = False  # a work slot was lost to a failed load of unknown blocks (stays empty)
    version: int = 0  # bumped whenever slots / selected change (invalidates `row`)
    row: torch.Tensor | None = None  # cached host block-table row (int32) for `row_key`
    row_key: tuple = ()  # what the cached row was built for


@dataclass(frozen=True)
class Pick:
    """One request's row of a batched retrieval of one layer."""

    batch: BatchRetrieval
    row: int

    def indices(self) -> list[int]:
        return self.batch.row(self.row)

    def array(self) -> np.ndarray:
        return self.batch.array(self.row)


@dataclass
class _RequestState:
    layout: WindowLayout
    layers: list[_LayerState]
    first_decode_computed: int | None = None  # num_computed_tokens at the first decode step (d = 0)
    #: offload rows shared by every layer whose work slots all hold a block: (blocks of the request) -> row
    full_rows: dict[int, torch.Tensor] = field(default_factory=dict)
    #: the store's pins of the request's blocks (`KVStoreBase.pin`), in position order, pin i covering positions
    #: [pin_starts[i], pin_starts[i + 1]) and the last one up to pin_len: every layer's loads at every retrieval
    #: come from these fixed sets, resolved once (the prompt's at the first load, later blocks once their stored
    #: copies are confirmed); blocks past pin_len are loaded by id; can_pin False: the store cannot pin
    pins: list[Any] = field(default_factory=list)
    pin_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pin_len: int = 0
    can_pin: bool = True
    #: (phase, physical block ids of the work slots followed by the spare slots: adjacent positions)
    slot_ids: tuple[int, np.ndarray] | None = None
    #: this step's candidates [sink_end, cand_end) and, among those after the prompt's, the positions that still
    #: hold their block (offload mode; attended where they lie)
    cand_end: int = 0
    late_resident: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def decode_step(self, step: SparseRequestStep) -> int:
        return step.num_computed_tokens - (self.first_decode_computed or 0)


class Esa(UcmSparseBase):
    """ESA for both roles. ``offload``: the KV of dropped blocks lives in ``store`` (the scheduler frees them);
    both roles must be given the same value. ``backend``/``store`` are used by the worker only."""

    name = "ESA"
    config_class = EsaConfig

    def __init__(
        self,
        config: EsaConfig,
        role: UcmSparseRole,
        block_size: int,
        *,
        backend: Backend | None = None,
        store: Any = None,
        offload: bool = True,
    ):
        super().__init__(config, role, block_size)
        self.offload = bool(offload)
        self.schedule = EsaSchedule(config.retrieval_stride)
        self.parts = config.repr_parts(block_size)  # representations per block (validated here: both roles)
        self.store = store
        self._requests: dict[str, _RequestState] = {}
        self._layer_index: dict[str, int] = {}
        self._caches: list[Cache] = []
        self._key_views: list[torch.Tensor | PackedKeys] = []
        self._row_offsets: list[int] = []
        self._batch: SparseBatch | None = None
        self._view_cache: tuple[tuple, SparseAttentionView] | None = None  # the last view of this step
        #: this step's prompt block ids on the device, per request ending its prefill (the same in every layer)
        self._prompt_ids: dict[str, torch.Tensor] = {}
        self._phase = -1  # decode steps of this worker so far (the retrieval pipeline's clock, see schedule)
        self._steady = False
        #: the view every layer of a steady step attends and each request's (resident, full) blocks per layer
        self._steady_view: tuple[SparseAttentionView, list[tuple[str, int, int]]] | None = None
        self._stats = SparseStepStats()
        #: boundary mode (offload, an engine that stages queries): every layer's query of the step, [layers, rows,
        #: heads, head_dim]; the retrieval cycle runs at step boundaries, not in per-layer hooks (see `_boundary`)
        self._stage: torch.Tensor | None = None
        self._stage_checked = False  # the first staged submit checks that the engine really copied the queries
        self._stage_submits: list[tuple[_RequestState, int]] = []  # this step's (request, query row) to submit
        #: boundary mode: the layers this step loads ahead at its end, and the requests they load for
        self._ahead: tuple[range, list[tuple[SparseRequestStep, _RequestState]]] | None = None
        #: the stream the loads ahead are queued from, held until the next step's inputs are copied (see
        #: `_prefetch`), and the gates not opened yet
        self._ahead_stream: torch.Stream | None = None
        self._gates: list[StreamGate] = []
        self._layer_submits = False
        if role is UcmSparseRole.WORKER:
            if self.offload and store is None:
                raise UcmConfigError("store", None, "a KV store (ucm.store) when ESA offloads (offload=True)")
            self.backend = backend if backend is not None else get_backend()
            self.retriever = EsaRetriever(self.backend)

    # ============================================================== scheduler side
    def block_plan(self, request: SparseRequestView, num_new_tokens: int = 1) -> BlockPlan:
        return plan_blocks(
            request.num_prompt_tokens,
            request.num_computed_tokens,
            request.num_computed_tokens + num_new_tokens,
            self.block_size,
            self.config,
            self.offload,
        )

    def request_finished(self, request_id: str) -> None:
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        state = self._requests.pop(request_id, None)
        if state is None:
            return
        self._settle(state)  # its blocks go back to vLLM: no copy may still be writing them
        for pin in state.pins:
            self.store.unpin(pin)

    def _settle(self, state: _RequestState) -> None:
        """Wait for the loads still in flight into a request's work and spare slots."""
        for layer_state in state.layers:
            self._wait_loads(layer_state)
            self._drop_prefetch(layer_state)

    # ============================================================== worker side
    def register_kv_caches(
        self, kv_caches: Mapping[str, Cache], key_views: Mapping[str, torch.Tensor | PackedKeys] | None = None,
        query_shape: QueryShape | None = None,
    ) -> None:
        self._layer_index, self._caches, self._key_views, self._row_offsets = {}, [], [], []
        self._stage, self._stage_checked, self._stage_submits = None, False, []
        for request_id in list(self._requests):  # a re-registered cache holds none of the earlier requests' blocks
            self._forget(request_id)
        offset = 0
        for index, (layer, cache) in enumerate(kv_caches.items()):
            key_view = (key_views or {}).get(layer)
            if key_view is None:
                if isinstance(cache, torch.Tensor):
                    raise UcmConfigError(
                        f"key_views[{layer!r}]", None,
                        "a K view [num_blocks, block_size, num_kv_heads, head_dim] for a single-tensor cache",
                    )
                key_view = cache[0]
            if key_view.dim() != 4 or key_view.shape[1] != self.block_size:
                raise UcmConfigError(
                    f"key_views[{layer!r}] shape", tuple(key_view.shape),
                    f"[num_blocks, block_size={self.block_size}, num_kv_heads, head_dim]",
                )
            self._layer_index[layer] = index
            self._caches.append(cache)
            self._key_views.append(key_view)
            self._row_offsets.append(offset)
            offset += sum(page_nbytes(p) for p in as_page_tensors(cache))
        if query_shape is not None and self.offload and self._key_views:
            q = query_shape
            self._stage = torch.zeros(len(self._key_views), q.rows, q.heads, q.head_dim, dtype=q.dtype,
                                      device=self._key_views[0].device)
        if self._key_views:
            self._warm_up()

    def _warm_up(self) -> None:
        """Run the device work of the engine's steps once at engine start, on scratch data shaped like the
        engine's, so that kernels compiled on first use (Triton's JIT on CUDA) compile here and not inside the first
        requests' decode steps: the selection at every row width the caches allow (one width per power of two: the
        kernels' tiles follow the width; sizes and strides are not specialized), the loads, block moves and the
        dumps' gathers."""
        key_view, cache = self._key_views[0], self._caches[0]
        device = key_view.device
        one = self.retriever.representations(key_view, torch.zeros(1, dtype=torch.int64, device=device), self.parts)
        heads = self._stage.shape[2] if self._stage is not None else one.shape[1]
        queries = torch.zeros(2, heads, one.shape[2], dtype=one.dtype, device=device)
        row = sum(page_nbytes(p) for p in as_page_tensors(self._caches))  # a stored block: every layer's pages
        width, limit = 1, key_view.shape[0]  # no request has more candidate blocks than the cache has blocks
        while True:
            reps = torch.zeros(width * self.parts, *one.shape[1:], dtype=one.dtype, device=device)
            self.retriever.submit_batch(queries, [reps, reps], [1, min(width, 4)], self.parts).handle.wait()
            if width >= limit:
                break
            width *= 2
        for n in (1, 8):
            ids = torch.zeros(n, dtype=torch.int64, device=device)  # the null block: only read
            if self.config.initial_selection == "attention":
                self.retriever.submit_attention([queries[:1]], key_view, [ids], [(0, n)], [1]).handle.wait()
            if not self.offload:
                continue
            scratch = [torch.empty((n, *p.shape[1:]), dtype=p.dtype, device=device) for p in as_page_tensors(cache)]
            nbytes = sum(page_nbytes(p) for p in scratch)
            buf = self.backend.alloc_pinned(2 * n * nbytes).view(2 * n, nbytes)
            rows = torch.arange(n, dtype=torch.int64) * 2
            slots = torch.arange(n, dtype=torch.int64)
            for background in (False, True):  # host ids (the copy engines on CUDA), device ids (the kernel)
                for where in (slots, slots.to(device)):
                    self.backend.scatter_blocks(buf, scratch, where, rows=rows, stream=self.retriever.stream,
                                                background=background).wait()
            # loads ahead go as one call for all their layers (on CUDA the copy engines or the copy-list kernel)
            self.backend.scatter_blocks_many([(buf, scratch, slots, rows)], stream=self.retriever.stream,
                                             background=True).wait()
            staging = torch.empty(n, nbytes, dtype=torch.uint8, device=device)
            self.backend.gather_blocks(scratch, slots.to(device), staging).wait()
            self.backend.scatter_blocks(staging, scratch, slots.to(device)).wait()
            self.backend.gather_blocks(scratch, slots, buf, rows=rows).wait()
            # the connector's dumps gather whole rows of every layer (into a device staging buffer or the arena)
            self.backend.gather_blocks(self._caches, ids, torch.empty(n, row, dtype=torch.uint8, device=device)).wait()
            if n > 1:
                self.backend.move_blocks(scratch, slots[:1].to(device), slots[-1:].to(device)).wait()

    def query_stage(self, layer_name: str) -> torch.Tensor | None:
        if self._stage is None or layer_name not in self._layer_index:
            return None
        return self._stage[self._layer_index[layer_name]]

    def execute_begin(self, batch: SparseBatch) -> None:
        self._batch = batch
        self._view_cache = None
        self._prompt_ids = {}
        self._ahead = None
        if any(step.is_decode for step in batch.requests):
            self._phase += 1
        initial: list[tuple[SparseRequestStep, _RequestState]] = []  # requests at their first decode step
        reloads: list[tuple[SparseRequestStep, _RequestState]] = []  # selected blocks freed since the last step
        for step in batch.requests:
            state = self._requests.get(step.req_id)
            if state is not None and (step.resumed or not step.is_decode):
                # a (re-)prefill: the request's blocks are being recomputed, rebuild its state at its end
                self._forget(step.req_id)
                state = None
            layout = window_layout(step.num_prompt_tokens, batch.block_size, self.config)
            if not layout.sparse:
                continue
            if step.finishes_prefill:
                self._requests[step.req_id] = _RequestState(layout, [_LayerState() for _ in self._caches])
                continue
            if not step.is_decode:
                continue
            if state is None:
                # no representations (e.g. the prompt was never prefilled here): attend to the budget's blocks
                state = _RequestState(layout, [_LayerState() for _ in self._caches])
                self._requests[step.req_id] = state
            if state.first_decode_computed is None:
                state.first_decode_computed = step.num_computed_tokens
                work = np.arange(layout.sink_end, layout.sink_end + layout.num_work, dtype=np.int64)
                for layer_state in state.layers:
                    layer_state.slots = work.copy()
                    layer_state.selected = work.tolist()
            if self._track_candidates(step, state, batch.null_block_id) and state.decode_step(step) > 0:
                reloads.append((step, state))
            if state.decode_step(step) == 0:
                initial.append((step, state))
        # loads in flight into requests not in this step (finished, preempted, waiting): their blocks may be handed
        # to other requests from this step on
        scheduled = {step.req_id for step in batch.requests}
        for req_id, state in self._requests.items():
            if req_id not in scheduled and any(ls.load_task is not None or ls.prefetch is not None
                                               for ls in state.layers):
                self._settle(state)
        self._consume_pending(initial)
        # a selected candidate attended where it lay until the scheduler freed it: load it into a work slot now
        for index in range(len(self._caches)) if reloads else ():
            self._consume(index, [(step, state, state.layers[index], state.layers[index].last_pick)
                                  for step, state in reloads], reload=True)
        layer_stage = self._stage_at(self._phase)
        self._stage_submits = []
        if self._stage is not None:
            layer_stage = self._boundary(batch)
        self._layer_submits = layer_stage  # this step's selections are submitted in the layer hooks
        # A steady step (no pipeline stage, no request starting or ending its prefill or decode, every work slot
        # of every layer holding a block): all layers attend the same blocks, so the first layer's view serves
        # every layer and nothing else happens per layer
        self._steady_view = None
        self._steady = (
            self.offload and not initial and not reloads and not layer_stage
            and not any(step.finishes_prefill for step in batch.requests if step.req_id in self._requests)
            and not any(ls.holes or ls.load_task is not None for st in self._requests.values() for ls in st.layers)
            and not any(self._needs_reps(step) for step in batch.requests)
        )

    def _boundary(self, batch: SparseBatch) -> bool:
        """Boundary mode: the retrieval cycle at the step's edges, for every layer at once, so that the steps in
        between need no per-layer work (on a GPU: each runs as one full CUDA graph).

        - the blocks a step filled get their representations at the start of a later step (all layers, one
          launch per layer for every request), at the latest the step before they become candidates;
        - submit step: after the forward (`execute_finished`), one selection for every layer and request from the
          staged queries (`query_stage`: the engine copies each layer's query rows there, inside a captured
          graph too);
        - consume step: before the forward, the delta of every layer is loaded and waited, so the step already
          attends the new blocks.

        Returns whether this step still needs the per-layer hooks for the pipeline (a submitting request whose
        query row is not staged: that step submits in the hooks, as without a stage)."""
        phase = self._phase
        decoding = [(step, self._requests[step.req_id]) for step in batch.requests
                    if step.is_decode and step.req_id in self._requests]
        with_reps = [(step, st) for step, st in decoding if st.layers and st.layers[0].reps is not None]
        if self.schedule.is_submit(phase) or any(self._needs_reps(step) for step, _ in decoding):
            self._boundary_reps(with_reps)
        if self.schedule.is_consume(phase):
            due = [(step, st) for step, st in decoding if st.decode_step(step) > 0]
            self._consume_pending(due)
            for _, st in due:  # every layer's loads in flight together; the step attends what they brought
                for layer_state in st.layers:
                    self._wait_loads(layer_state)
        ahead = self._prefetch_layers(phase)
        if ahead:
            due = [(step, st) for step, st in decoding if st.decode_step(step) > 0 and st.layout.num_spare]
            self._ahead = (ahead, due) if due else None
        if not self.schedule.is_submit(phase):
            return False
        rows = self._stage.shape[1]
        submits = [(st, step.query_start + step.num_scheduled_tokens - 1) for step, st in with_reps
                   if st.decode_step(step) > 0]
        if any(row >= rows for _, row in submits):
            return True
        self._stage_submits = submits
        if submits and not self._stage_checked:
            # poison the rows: if the engine's hook does not copy the queries, the submit sees NaN and falls back
            self._stage[:, [row for _, row in submits]] = float("nan")
        return False

    def _prefetch_layers(self, phase: int) -> range:
        """The layers whose pending selection step ``phase`` loads ahead, queued at the end of the step (after its
        forward is queued, so the host work hides behind it; the copies run beside the next step): the steps from
        the one after a submit to the one two before its consume share the layers in order, each carrying a part
        of the host work and of the transfers, and the step before the consume is left for the last copies.
        On the copy engines the next step's own input copies would wait behind these loads (`bench/copy_overlap.py`):
        `_load_held` holds them until those are queued."""
        lag = self.schedule.lag
        since = (phase - 2) % self.schedule.stride if phase >= 2 else -1
        if lag < 3 or not 1 <= since < lag - 1:
            return range(0)
        layers, steps = len(self._caches), lag - 2
        return range((since - 1) * layers // steps, since * layers // steps)

    def _prefetch(self, layers: range, due: list[tuple[SparseRequestStep, _RequestState]]) -> None:
        """Load the first new blocks of each request's pending selection in these layers into its spare slots
        (one store task for all of them), while the steps keep attending the work slots; the consume step moves
        them into the work slots on the device (`_consume`)."""
        planned = []
        for index in layers:
            loads = []
            for step, state in due:
                layer_state = state.layers[index]
                pick = layer_state.pending
                if pick is None:
                    continue
                self._drop_prefetch(layer_state)  # an older selection's, never consumed: its copies end first
                delta = self._delta(step, state, layer_state, pick)
                if delta is None:
                    continue
                needed = delta[1][: state.layout.num_spare]
                spares = np.arange(needed.size)
                loads.append((step, state, needed, self._spare_ids(step, state)[spares], (layer_state, pick, spares)))
            planned.append((index, loads))
        for (_, loads), tasks in zip(planned, self._load_held(planned), strict=True):
            for (step, _, needed, _, (layer_state, pick, spares)), task in zip(loads, tasks, strict=True):
                layer_state.prefetch = (pick, needed, spares, step.block_hashes or (), task)
                self._stats.blocks_loaded += int(needed.size)
                self._stats.blocks_prefetched += int(needed.size)

    def _load_held(self, planned: list[tuple[int, list[Any]]]) -> list[list[Any]]:
        """`_load_layers` of loads ahead. The forward of this step is queued; the next step's input copies are not
        yet, and the copy engines serve in queue order: queued now, these loads would delay those inputs by
        their whole transfer. Where the store gives background loads a stream of their own, they are queued from
        a stream held on the device (`Backend.hold_stream`) that `forward_begin` of the next step opens after its
        inputs; every host wait on them opens it first (`_wait_task`)."""
        if not (self.store.background_apart and self._caches):
            return self._load_layers(planned, background=True)
        if self._ahead_stream is None:
            self._ahead_stream = self.backend.new_stream()
        stream = self._ahead_stream
        self.backend.wait_event(self.backend.record_event(), stream)  # after this step's forward
        gate = self.backend.hold_stream(stream)
        if gate.held:
            self._gates.append(gate)
            self._stats.ahead_held += 1
        with self.backend.use_stream(stream):
            return self._load_layers(planned, background=True)

    def forward_begin(self) -> None:
        gates, self._gates = self._gates, []
        if gates:
            stream = self.backend.current_stream()
            for gate in gates:
                if gate.is_open:  # its timeout came first: these loads may have delayed this step's inputs
                    self._stats.ahead_released_late += 1
                gate.open_after(stream)

    def _open_gates(self) -> None:
        gates, self._gates = self._gates, []
        for gate in gates:
            gate.open()

    def _drop_prefetch(self, layer_state: _LayerState) -> None:
        record, layer_state.prefetch = layer_state.prefetch, None
        if record is not None:
            self._wait_task(record[4])

    def _take_prefetch(self, layer_state: _LayerState, pick: Pick) -> tuple[np.ndarray, np.ndarray] | None:
        """The positions loaded ahead for ``pick`` and their spare slots, once their loads ended (failed ones
        left out: they are loaded again at the consume step); None when nothing was loaded ahead for it."""
        record, layer_state.prefetch = layer_state.prefetch, None
        if record is None:
            return None
        served, positions, spares, hashes, task = record
        failed, unknown = self._wait_task(task)
        if served is not pick or unknown:
            return None
        if failed:
            ok = np.fromiter((hashes[p] not in failed for p in positions.tolist()), dtype=bool, count=positions.size)
            positions, spares = positions[ok], spares[ok]
        return positions, spares

    def _consume_pending(self, requests: list[tuple[SparseRequestStep, _RequestState]]) -> None:
        """Consume the pending selection of these requests in every layer: one store task per `_LOAD_GROUP`
        layers, queued as soon as their deltas are planned, so the first copies move while the host plans the
        next layers."""
        planned = []
        for index in range(len(self._caches)) if requests else ():
            due = []
            for step, state in requests:
                layer_state = state.layers[index]
                pick, layer_state.pending = layer_state.pending, None
                due.append((step, state, layer_state, pick))
            planned.append((index, self._consume_plan(index, due)))
            if len(planned) == _LOAD_GROUP:
                self._issue_loads(planned)
                planned = []
        self._issue_loads(planned)

    def _boundary_reps(self, decoding: list[tuple[SparseRequestStep, _RequestState]]) -> None:
        """Representations of the blocks full before this step (their K is in the cache) that have none yet."""
        wanted = []
        for step, state in decoding:
            start, end = self._reps_end(state, state.layers[0]), step.num_computed_tokens // self.block_size
            if end > start:
                wanted.append((state, step.block_ids[start:end]))
        if not wanted:
            return
        sizes = [len(ids) for _, ids in wanted]
        # the same physical blocks in every layer (all layers' caches live on one device): one transfer of the ids
        ids = torch.tensor([b for _, ids in wanted for b in ids], dtype=torch.int64)
        ids = ids.to(self._key_views[0].device, non_blocking=True)
        for index, key_view in enumerate(self._key_views):
            new = self.retriever.representations(key_view, ids, self.parts).split([n * self.parts for n in sizes])
            for (state, _), part in zip(wanted, new, strict=True):
                layer_state = state.layers[index]
                layer_state.reps = torch.cat([layer_state.reps, part])

    def _boundary_submit(self) -> None:
        """One selection for every layer and every request submitting this step, from the staged queries."""
        submits, self._stage_submits = self._stage_submits, []
        started = time.perf_counter()
        rows = torch.tensor([row for _, row in submits], dtype=torch.int64)
        if self._stage.device.type != "cpu":  # a blocking copy would wait for this step's queued forward
            rows = rows.pin_memory()
        rows = rows.to(self._stage.device, non_blocking=True)
        queries = self._stage.index_select(1, rows)  # [layers, requests, heads, head_dim], a copy
        if not self._stage_checked:
            if torch.isnan(queries).any():  # one sync, once per engine
                _log.warning(
                    "ESA: the engine's attention hook did not stage the queries; retrieval runs in the per-layer "
                    "hooks from now on")
                self._stage = None
                return
            self._stage_checked = True
        layers = len(self._caches)
        reps = [self._candidate_reps(st, st.layers[index]) for index in range(layers) for st, _ in submits]
        ks = [st.layout.num_work for _ in range(layers) for st, _ in submits]
        batch = self.retriever.submit_batch(queries.flatten(0, 1), reps, ks, self.parts)
        self._stats.retrieval_s.append(time.perf_counter() - started)
        for index in range(layers):
            for r, (state, _) in enumerate(submits):
                state.layers[index].pending = Pick(batch, index * len(submits) + r)
        self._stats.retrievals += layers * len(submits)

    def _track_candidates(self, step: SparseRequestStep, state: _RequestState, null_block_id: int) -> bool:
        """This step's candidate range and the candidates after the prompt's that still hold their block; True
        when one of those the work slots' selection holds was freed since the last step (to load now)."""
        layout = state.layout
        before = state.late_resident
        state.cand_end = layout.local_start_at(step.seq_len)
        if not self.offload or state.cand_end <= layout.local_start:
            state.late_resident = before[:0]
            return False
        late = np.asarray(step.block_ids[layout.local_start : state.cand_end], dtype=np.int64)
        state.late_resident = np.flatnonzero(late != null_block_id) + layout.local_start
        freed = before[~np.isin(before, state.late_resident)] if before.size else before
        return bool(freed.size) and any(
            ls.last_pick is not None and np.isin(freed, ls.last_pick.array() + layout.sink_end).any()
            for ls in state.layers
        )

    def _needs_reps(self, step: SparseRequestStep) -> bool:
        """Whether this decode step must give blocks their representations (per-layer work): the next step makes a
        block without one a candidate, which the scheduler may free. Until then a filled block waits in the local
        window (resident) for a step that runs the layer hooks anyway (`_add_reps` catches up every block), so
        filling a block alone does not take a steady step off its single view (or full CUDA graph)."""
        state = self._requests.get(step.req_id)
        if state is None or not step.is_decode or not state.layers or state.layers[0].reps is None:
            return False
        return state.layout.local_start_at(step.seq_len + 1) > self._reps_end(state, state.layers[0])

    def _reps_end(self, state: _RequestState, layer_state: _LayerState) -> int:
        """First position without a representation (they cover [sink_end, reps_end))."""
        reps = layer_state.reps
        return state.layout.sink_end + (0 if reps is None else reps.shape[0] // self.parts)

    def _stage_at(self, phase: int) -> bool:
        return self.schedule.is_consume(phase) or self.schedule.is_submit(phase)

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
        batch = self._batch
        if batch is None or not self._requests:
            return None
        if self._steady_view is not None:
            view, counted = self._steady_view
            self._count_blocks(counted)
            return view
        index = self._layer(layer_name)
        counted: list[tuple[str, int, int]] = []  # (req_id, blocks attended, blocks dense would read)
        rows: list[int] = []
        tables: list[torch.Tensor] = []
        lengths: list[int] = []
        submits: list[tuple[_LayerState, _RequestState, int]] = []  # (layer state, request, query row)
        for row, step in enumerate(batch.requests):
            state = self._requests.get(step.req_id)
            if state is None:
                continue
            layer_state = state.layers[index]
            if step.finishes_prefill:
                last = step.query_start + (step.num_prompt_tokens - 1 - step.num_computed_tokens)
                if self.config.initial_selection == "attention":  # the last prompt queries of this chunk
                    first = max(step.query_start, last + 1 - self.config.initial_queries)
                    layer_state.prefill_query = query[first : last + 1].detach().clone()
                else:
                    layer_state.prefill_query = query[last].detach().clone()
                continue
            if not step.is_decode:
                continue
            # the pipeline runs on the engine's decode-step count, the same for every request: the requests of a
            # step retrieve (and load) together, one batched launch per layer; d = 0 is each request's own
            d = state.decode_step(step)
            phase = self._phase
            if layer_state.load_task is not None:
                # loads queued after this layer's attention of an earlier step: wait before the attention that
                # reads their slots (waiting later keeps the step on its slower per-layer path meanwhile)
                self._wait_loads(layer_state)
            if d > 0 and self.schedule.is_consume(phase) and self._stage is None:
                # consumed in attention_finished: its loads must not overwrite slots this attention reads
                layer_state.due, layer_state.pending = layer_state.pending, None
            if (d > 0 and self.schedule.is_submit(phase) and layer_state.reps is not None
                    and self._layer_submits):
                submits.append((layer_state, state, step.query_start + step.num_scheduled_tokens - 1))
            table, length = self._sparse_row(step, state, layer_state)
            rows.append(row)
            tables.append(table)
            lengths.append(length)
            counted.append((step.req_id, table.numel(), -(-step.seq_len // self.block_size)))
        self._count_blocks(counted)
        if submits:
            if query.dim() == 2:  # [num_tokens, num_q_heads * head_dim]
                query = query.view(query.shape[0], -1, self._key_views[index].shape[-1])
            self._submit(query, submits)
        if not rows:
            return None
        key = (id(block_table), id(seq_lens), tuple(rows), tuple(map(id, tables)), tuple(lengths))
        if self._view_cache is not None and self._view_cache[0] == key:
            view = self._view_cache[1]  # an earlier layer of this step attends the same blocks
        else:
            sparse_rows = set(rows)
            dense_max = max((s.seq_len for r, s in enumerate(batch.requests) if r not in sparse_rows), default=0)
            view = self._view(block_table, seq_lens, rows, tables, lengths, max(max(lengths), dense_max))
            self._view_cache = (key, view)
        if self._steady:
            self._steady_view = (view, counted)
        return view

    def step_view(self, block_table: torch.Tensor, seq_lens: torch.Tensor) -> SparseAttentionView | None:
        """In a steady step (see `execute_begin`) every layer attends the first layer's view and nothing else
        happens per layer: that view, with the step's stats counted for every layer."""
        if not self._steady or self._batch is None or not self._requests or not self._caches:
            return None
        first = next(iter(self._layer_index))
        view = self.attention_begin(first, None, None, None, self._caches[0], block_table, seq_lens)
        if view is None or self._steady_view is None:
            return None
        _, counted = self._steady_view
        for _ in range(len(self._caches) - 1):
            self._count_blocks(counted)
        return view

    def _count_blocks(self, counted: list[tuple[str, int, int]]) -> None:
        """One layer's blocks attended / dense, per request."""
        for req_id, resident, full in counted:
            self._stats.resident_blocks += resident
            self._stats.full_blocks += full
            row = self._stats.request_blocks.setdefault(req_id, [0, 0, 0])
            row[0] += resident
            row[1] += full
            row[2] += 1

    def _submit(self, query: torch.Tensor, submits: list[tuple[_LayerState, _RequestState, int]]) -> None:
        """One batched retrieval for every request of this layer that submits at this step."""
        host = self.backend.alloc_pinned(8 * len(submits)).view(torch.int64)
        host.copy_(torch.tensor([q for _, _, q in submits], dtype=torch.int64))
        index = host.to(query.device, non_blocking=True)
        queries = query.index_select(0, index)  # a copy: outlives the layer's activations
        started = time.perf_counter()
        batch = self.retriever.submit_batch(
            queries, [self._candidate_reps(st, ls) for ls, st, _ in submits],
            [st.layout.num_work for _, st, _ in submits], self.parts,
        )
        self._stats.retrieval_s.append(time.perf_counter() - started)
        for r, (layer_state, _, _) in enumerate(submits):
            layer_state.pending = Pick(batch, r)
        self._stats.retrievals += len(submits)

    def _candidate_reps(self, state: _RequestState, layer_state: _LayerState, cand_end: int | None = None) -> Any:
        """The representations of the candidates [sink_end, cand_end) (this step's by default)."""
        end = state.cand_end if cand_end is None else cand_end
        return layer_state.reps[: (end - state.layout.sink_end) * self.parts]

    def attention_finished(
        self,
        layer_name: str,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_output: torch.Tensor,
        kv_cache: Cache,
    ) -> None:
        batch = self._batch
        if batch is None or self._steady:
            return  # a steady step: nothing is due and no prefill ends (see execute_begin)
        index = self._layer(layer_name)
        due: list[tuple[SparseRequestStep, _RequestState, _LayerState, Pick | None]] = []
        prefill: list[tuple[_LayerState, _RequestState]] = []
        prefill_steps: list[SparseRequestStep] = []
        key_view = self._key_views[index]
        for step in batch.requests:
            state = self._requests.get(step.req_id)
            if state is None:
                continue
            layer_state = state.layers[index]
            if step.is_decode:
                if layer_state.due is not None:
                    pick, layer_state.due = layer_state.due, None
                    due.append((step, state, layer_state, pick))
                if layer_state.reps is not None:
                    self._add_reps(step, state, layer_state, key_view)  # blocks this step filled
                continue
            if not step.finishes_prefill:
                continue
            # every full block from the sink on: the prompt's candidates and its local window's full blocks (and,
            # after a resume, the generated ones), which become candidates as decode moves the window
            layer_state.reps = None
            self._add_reps(step, state, layer_state, key_view)
            if layer_state.prefill_query is not None:
                prefill.append((layer_state, state))
                prefill_steps.append(step)
        if due:
            self._consume(index, due)
        if prefill:
            started = time.perf_counter()
            # scored over the candidates of the request's first decode step
            first = [(st, st.layout.local_start_at(step.seq_len + 1)) for (_, st), step in zip(prefill, prefill_steps,
                                                                                             strict=True)]
            if self.config.initial_selection == "attention":
                batch_retrieval = self._initial_by_attention(key_view, prefill, prefill_steps, first)
            else:
                batch_retrieval = self.retriever.submit_batch(
                    torch.stack([ls.prefill_query for ls, _ in prefill]),
                    [self._candidate_reps(st, ls, end) for (ls, _), (st, end) in zip(prefill, first, strict=True)],
                    [st.layout.num_work for _, st in prefill], self.parts,
                )
            self._stats.retrieval_s.append(time.perf_counter() - started)
            for r, (layer_state, _) in enumerate(prefill):
                layer_state.pending = Pick(batch_retrieval, r)
                layer_state.prefill_query = None
            self._stats.retrievals += len(prefill)

    def _initial_by_attention(
        self, key_view: torch.Tensor | PackedKeys, prefill: list[tuple[_LayerState, _RequestState]],
        steps: list[SparseRequestStep], first: list[tuple[_RequestState, int]],
    ) -> Any:
        """The initial selection of requests ending their prefill, ranked by the attention mass their last prompt
        queries pay to each candidate block (softmax over the keys of the prompt's full blocks)."""
        device = key_view.device
        ids, ranges = [], []
        for step, (state, end) in zip(steps, first, strict=True):
            full = step.seq_len // self.block_size  # a partial last block holds stale keys past the prompt
            if step.req_id not in self._prompt_ids:  # one transfer per request for all layers
                prompt = torch.tensor(step.block_ids[:full], dtype=torch.int64)
                self._prompt_ids[step.req_id] = prompt.to(device, non_blocking=True)
            ids.append(self._prompt_ids[step.req_id])
            sink_end = state.layout.sink_end
            ranges.append((sink_end, max(sink_end, min(end, full))))
        return self.retriever.submit_attention(
            [ls.prefill_query for ls, _ in prefill], key_view, ids, ranges,
            [st.layout.num_work for _, st in prefill],
        )

    def _add_reps(
        self, step: SparseRequestStep, state: _RequestState, layer_state: _LayerState,
        key_view: torch.Tensor | PackedKeys,
    ) -> None:
        """Append the representations of the blocks full after this step that have none yet (resident: they are
        in the local window or, at the end of a prefill, everywhere)."""
        start, end = self._reps_end(state, layer_state), step.seq_len // self.block_size
        if end <= start:
            return
        ids = torch.tensor(step.block_ids[start:end], dtype=torch.int64).to(key_view.device, non_blocking=True)
        new = self.retriever.representations(key_view, ids, self.parts)
        layer_state.reps = new if layer_state.reps is None else torch.cat([layer_state.reps, new])

    def execute_finished(self) -> SparseStepStats:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            self._prefetch(*ahead)
        if self._stage_submits:
            self._boundary_submit()
        if self._batch is not None:
            self._stats.sparse_requests = sum(
                1 for s in self._batch.requests if s.req_id in self._requests and s.is_decode
            )
        stats, self._stats = self._stats, SparseStepStats()
        self._batch = None
        return stats

    # ------------------------------------------------------------------ worker internals
    def _layer(self, layer_name: str) -> int:
        if layer_name not in self._layer_index:
            raise UcmConfigError("layer_name", layer_name, sorted(self._layer_index) or "a registered layer")
        return self._layer_index[layer_name]

    def _consume(
        self, index: int, due: list[tuple[SparseRequestStep, _RequestState, _LayerState, Pick | None]],
        reload: bool = False,
    ) -> None:
        """Take the finished retrievals of one layer; offload: bring the newly selected blocks of every request
        (delta) into the work slots: those loaded ahead into spare slots by a device copy, the rest with one store
        task for the layer. ``reload``: the same selections again (their blocks freed)."""
        self._issue_loads([(index, self._consume_plan(index, due, reload))])

    def _consume_plan(
        self, index: int, due: list[tuple[SparseRequestStep, _RequestState, _LayerState, Pick | None]],
        reload: bool = False,
    ) -> list[tuple[SparseRequestStep, _RequestState, np.ndarray, np.ndarray, Any]]:
        """`_consume` up to its loads: the selections taken and the device moves queued; returns the loads the
        layer still needs (`_issue_loads` queues them)."""
        loads = []
        moves: list[tuple[np.ndarray, np.ndarray]] = []  # (spare block ids, work block ids)
        for step, state, layer_state, pick in due:
            if pick is None:
                continue
            self._stats.retrievals_consumed += not reload
            layout = state.layout
            if not self.offload:
                layer_state.selected = [layout.sink_end + c for c in pick.indices()]
                layer_state.version += 1
                continue
            if layer_state.load_task is not None:
                self._wait_loads(layer_state)
            layer_state.last_pick = pick
            ahead = None if reload else self._take_prefetch(layer_state, pick)
            delta = self._delta(step, state, layer_state, pick)
            if delta is None:
                continue
            free, needed, unnamed = delta
            self._stats.load_failures += unnamed
            if ahead is not None and ahead[0].size and needed.size:
                positions, spares = ahead
                spare_of = np.full(int(max(positions.max(), needed.max())) + 1, -1, dtype=np.int64)
                spare_of[positions] = spares
                src = spare_of[needed]
                moved = src >= 0
                if moved.any():
                    moves.append((self._spare_ids(step, state)[src[moved]], self._work_ids(step, state)[free[moved]]))
                    layer_state.slots[free[moved]] = needed[moved]
                    layer_state.version += 1
                    free, needed = free[~moved], needed[~moved]
            if needed.size:
                loads.append((step, state, needed, self._work_ids(step, state)[free], (layer_state, free)))
        if moves:  # queued before this step's forward, after the last one that attended the replaced blocks
            src = torch.from_numpy(np.concatenate([m[0] for m in moves]))
            dst = torch.from_numpy(np.concatenate([m[1] for m in moves]))
            device = self._key_views[index].device
            self.backend.move_blocks(self._caches[index], src.to(device, non_blocking=True),
                                     dst.to(device, non_blocking=True))
        return loads

    def _issue_loads(self, planned: list[tuple[int, list]]) -> None:
        """Queue the loads `_consume_plan` left, (layer index, loads) each, as one store task for all layers."""
        for (_, loads), tasks in zip(planned, self._load_layers(planned), strict=True):
            for (step, _, needed, _, (layer_state, free)), task in zip(loads, tasks, strict=True):
                self._mark_loading(layer_state, free, needed, step.block_hashes or (), task)

    def _delta(
        self, step: SparseRequestStep, state: _RequestState, layer_state: _LayerState, pick: Pick
    ) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(free, needed, unnamed): the positions of ``pick`` not in the work slots (nor attended where they lie)
        that have a stored copy named, paired with the work slots holding unselected blocks that take them, and
        how many could not be loaded for want of a name (their slots keep their blocks). None: nothing new."""
        selected = pick.array() + state.layout.sink_end
        current = layer_state.slots
        if not selected.size:
            return None
        # membership through position masks (index -1, an empty slot, lands on the spare last entry): a few
        # vector ops, several times cheaper than np.isin on these small arrays
        size = int(max(selected.max(), current.max(initial=-1))) + 2
        held = np.zeros(size, dtype=bool)
        held[current] = True
        needed = selected[~held[selected]]
        if state.late_resident.size:  # attended where they lie
            needed = needed[~np.isin(needed, state.late_resident)]
        if not needed.size:
            return None
        wanted = np.zeros(size, dtype=bool)
        wanted[selected] = True
        free = np.flatnonzero(~wanted[current])  # |free| >= |needed|
        count = min(free.size, needed.size)
        free, needed = free[:count], needed[:count]
        # a position without a stored copy named cannot be loaded: its slot keeps its block
        named = needed < len(step.block_hashes or ())
        if named.all():
            return free, needed, 0
        return free[named], needed[named], int(count - named.sum())

    def _load_layers(
        self, planned: list[tuple[int, list[tuple[SparseRequestStep, _RequestState, np.ndarray, np.ndarray, Any]]]],
        background: bool = False,
    ) -> list[list[Any]]:
        """Load positions ``needed`` of each request into physical blocks ``targets`` of layer ``index``, for
        (index, entries (step, state, needed, targets, tag)) pairs: one store task for every layer's loads of
        pinned blocks (`load_pinned_layers`), one per layer for blocks loaded by id. ``background``: loads ahead of
        their use (`BlockPages.background`). Returns each layer's tasks, one per entry (a tuple where an entry's
        blocks went both ways)."""
        # pins extended first, for the furthest position each request loads in any layer: an extension may merge
        # (release) pins, which the groups of this call must not refer to
        furthest: dict[int, tuple[SparseRequestStep, _RequestState, int]] = {}
        for _, loads in planned:
            for step, state, needed, _, _ in loads:
                upto = int(needed.max()) + 1
                seen = furthest.get(id(state))
                if seen is None or upto > seen[2]:
                    furthest[id(state)] = (step, state, upto)
        for step, state, upto in furthest.values():
            self._extend_pins(step, state, upto)
        pinned_items: list[tuple[list[tuple[Any, np.ndarray]], Any]] = []
        layer_kinds: list[tuple[list[tuple[bool, bool]], Any]] = []
        for index, loads in planned:
            pinned_groups: list[tuple[Any, np.ndarray]] = []
            pinned_slots: list[np.ndarray] = []
            ids: list[str] = []
            slots: list[np.ndarray] = []
            kinds: list[tuple[bool, bool]] = []
            for step, state, needed, targets, _ in loads:
                hashes = step.block_hashes or ()
                by_pin = needed < state.pin_len
                pinned, by_id = bool(by_pin.any()), not by_pin.all()
                if pinned:
                    groups, order = self._pin_groups(state, needed[by_pin])
                    pinned_groups.extend(groups)
                    pin_targets = targets[by_pin]
                    pinned_slots.append(pin_targets if order is None else pin_targets[order])
                if by_id:
                    ids.extend(hashes[p] for p in needed[~by_pin].tolist())
                    slots.append(targets[~by_pin])
                kinds.append((pinned, by_id))
            if pinned_groups:
                pinned_items.append((pinned_groups, self._pages(index, pinned_slots, background)))
            by_id_task = self.store.load(ids, self._pages(index, slots, background)) if ids else None
            layer_kinds.append((kinds, by_id_task))
        by_pin_task = self.store.load_pinned_layers(pinned_items) if pinned_items else None
        return [[(by_pin_task, by_id) if pin and ident else by_pin_task if pin else by_id
                 for pin, ident in kinds] for kinds, by_id in layer_kinds]

    def _extend_pins(self, step: SparseRequestStep, state: _RequestState, upto: int) -> None:
        """Pin the request's stored blocks from ``pin_len`` on when a load reaches position ``upto``: the prompt's
        at the first load (dumped before its first decode step), later ones up to the first position whose
        stored copy is not confirmed yet (a late candidate still holding its block) or this step's candidates'
        end. Each extension is one more pin; once a request holds `_MAX_PINS`, its pins after the prompt's are
        merged into one (a pin is resolved block by block: merging costs the generated blocks, not the prompt)."""
        if not state.can_pin or upto <= state.pin_len:
            return
        hashes = step.block_hashes or ()
        start = state.pin_len
        if len(state.pins) >= _MAX_PINS:
            start = int(state.pin_starts[1])
        end = len(hashes)
        if start:
            end = min(end, state.cand_end)
            late = state.late_resident[state.late_resident >= start]
            if late.size:
                end = min(end, int(late.min()))
        if end <= start:
            return
        pin = self.store.pin(list(hashes[start:end]))
        if pin is None:
            state.can_pin = False
            return
        if start < state.pin_len:  # the merge: the new pin covers the later ones (pinned before they are let go)
            for old in state.pins[1:]:
                self.store.unpin(old)
            del state.pins[1:]
            state.pin_starts = state.pin_starts[:1]
        state.pins.append(pin)
        state.pin_starts = np.append(state.pin_starts, start)
        state.pin_len = end

    @staticmethod
    def _pin_groups(
        state: _RequestState, positions: np.ndarray
    ) -> tuple[list[tuple[Any, np.ndarray]], np.ndarray | None]:
        """(pin, indices in it) groups of ``positions`` (all below ``pin_len``) in pin order, and the order that
        puts ``positions`` (and so their targets) in the groups' order (None: already in it)."""
        if len(state.pins) == 1:
            return [(state.pins[0], positions)], None
        which = np.searchsorted(state.pin_starts, positions, side="right") - 1
        groups = [(state.pins[w], positions[which == w] - state.pin_starts[w]) for w in np.unique(which).tolist()]
        return groups, (None if len(groups) == 1 else np.argsort(which, kind="stable"))

    def _slot_ids(self, step: SparseRequestStep, state: _RequestState) -> np.ndarray:
        """Physical block ids of the request's work slots then its spare slots (the same in every layer; cached
        for the step)."""
        cached = state.slot_ids
        if cached is None or cached[0] != self._phase:
            layout = state.layout
            end = layout.sink_end + layout.num_work + layout.num_spare
            ids = np.asarray(step.block_ids[layout.sink_end : end], dtype=np.int64)
            cached = state.slot_ids = (self._phase, ids)
        return cached[1]

    def _work_ids(self, step: SparseRequestStep, state: _RequestState) -> np.ndarray:
        """Physical block ids of the request's work slots."""
        return self._slot_ids(step, state)[: state.layout.num_work]

    def _spare_ids(self, step: SparseRequestStep, state: _RequestState) -> np.ndarray:
        """Physical block ids of the request's spare slots."""
        return self._slot_ids(step, state)[state.layout.num_work :]

    def _pages(self, index: int, slots: list[np.ndarray], background: bool = False) -> Any:
        from ucm.store.base import BlockPages

        # host slots: the store's device layer moves them with its copy (a load on the copy engines needs them there)
        slots_t = torch.from_numpy(np.concatenate(slots))
        return BlockPages(self._caches[index], slots_t, row_offset=self._row_offsets[index], background=background)

    def _mark_loading(
        self, layer_state: _LayerState, free: np.ndarray, needed: np.ndarray, hashes: Any, task: Any
    ) -> None:
        layer_state.load_task = task
        layer_state.loading = (free, needed, layer_state.slots[free].copy(), hashes)
        layer_state.slots[free] = -1  # being written: never attended until the wait
        layer_state.version += 1
        self._stats.blocks_loaded += int(free.size)

    def _wait_loads(self, layer_state: _LayerState) -> None:
        """Wait for the layer's loads; a failed block leaves its slot with the block it held before."""
        task = layer_state.load_task
        if task is None:
            return
        layer_state.load_task = None
        failed, unknown_failure = self._wait_task(task)
        loading, layer_state.loading = layer_state.loading, None
        if loading is not None:
            js, new, old, hashes = loading
            slots = layer_state.slots
            if unknown_failure:
                slots[js] = -1
                layer_state.holes = True
                self._stats.load_failures += int(js.size)
            elif failed:
                lost = np.fromiter((hashes[p] in failed for p in new.tolist()), dtype=bool, count=new.size)
                slots[js] = np.where(lost, old, new)
                self._stats.load_failures += int(lost.sum())
                self._stats.failed_block_hashes.extend(hashes[p] for p in new[lost].tolist())
            else:
                slots[js] = new
            # a slot lost earlier stays out of the attention until a later retrieval fills it again
            layer_state.holes = bool(slots.size) and int(slots.min()) < 0
        layer_state.version += 1

    def _wait_task(self, task: Any) -> tuple[set[str], bool]:
        """Wait for a store task (or a tuple of them: blocks loaded both pinned and by id): (the ids they failed,
        whether one failed without naming them: trust none)."""
        failed: set[str] = set()
        unknown = False
        started = time.perf_counter()
        if self._gates:  # a load ahead waits on a held stream: open it, or this wait lasts until its timeout
            self._open_gates()
        for part in task if isinstance(task, tuple) else (task,):
            try:
                part.wait()
            except Exception:  # the task names the failed ids; anything else: trust none of its blocks
                named = set(getattr(part, "failed_ids", None) or ())
                failed |= named
                unknown = unknown or not named
        self._stats.load_wait_s += time.perf_counter() - started
        return failed, unknown

    def _sparse_row(
        self, step: SparseRequestStep, state: _RequestState, layer_state: _LayerState
    ) -> tuple[torch.Tensor, int]:
        """The layer's block-table row (sink, work, local + tail; the partial last block last) and its length.

        The row only changes when the layer's resident set changes or a block is appended, so it is cached on the
        host and rebuilt then (O(k) Python; O(1) per request and layer otherwise). In offload mode a layer whose
        work slots all hold a block attends the request's full row, one tensor shared by those layers (the work
        slots are the same physical blocks in every layer), so the step's view is built once, not per layer."""
        bs = self.block_size
        layout = state.layout
        total = -(-step.seq_len // bs)
        ids = step.block_ids
        # candidates after the prompt's that hold their block, then the local window and the tail; the resident
        # set only shrinks (the scheduler frees) or grows with L, so (L, its size) identifies it
        local_start = min(max(state.cand_end, layout.local_start), total)
        late = state.late_resident
        if self.offload and (not layer_state.slots.size or layer_state.slots.min() >= 0):
            row_key = (total, local_start, late.size)
            row = state.full_rows.get(row_key)
            if row is None:
                work = [ids[layout.sink_end + j] for j in range(len(layer_state.slots))]
                sink = [ids[p] for p in range(layout.sink_end)]
                tail = [ids[p] for p in late.tolist()] + [ids[p] for p in range(local_start, total)]
                row = torch.tensor(sink + work + tail, dtype=torch.int32)
                state.full_rows = {row_key: row}  # older keys are never asked for again
        else:
            key = (layer_state.version, total, local_start, late.size)
            if layer_state.row is None or layer_state.row_key != key:
                if self.offload:
                    work = self._work_ids(step, state)[layer_state.slots >= 0].tolist()
                else:
                    work = [ids[pos] for pos in layer_state.selected]
                sink = [ids[p] for p in range(layout.sink_end)]
                tail = [ids[p] for p in late.tolist()] + [ids[p] for p in range(local_start, total)]
                layer_state.row = torch.tensor(sink + work + tail, dtype=torch.int32)
                layer_state.row_key = key
            row = layer_state.row
        length = (row.numel() - 1) * bs + step.seq_len - (total - 1) * bs
        return row, length

    def _view(
        self,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        rows: list[int],
        tables: list[torch.Tensor],
        lengths: list[int],
        max_len: int,
    ) -> SparseAttentionView:
        """The engine's table and lengths with the sparse rows replaced (one pinned staging copy each)."""
        width = block_table.shape[1]
        host = self.backend.alloc_pinned(len(rows) * width * 4).view(torch.int32).view(len(rows), width)
        host.zero_()  # padding: the null block, never read (beyond seq_len)
        for i, table in enumerate(tables):
            host[i, : table.numel()] = table
        meta = self.backend.alloc_pinned(len(rows) * 16).view(torch.int64).view(2, len(rows))
        meta[0] = torch.tensor(rows, dtype=torch.int64)
        meta[1] = torch.tensor(lengths, dtype=torch.int64)
        device = block_table.device
        meta_dev = meta.to(device, non_blocking=True)
        new_table = block_table.clone()
        new_table.index_copy_(0, meta_dev[0], host.to(device, non_blocking=True).to(block_table.dtype))
        new_lens = seq_lens.clone()
        new_lens.index_copy_(0, meta_dev[0].to(seq_lens.device), meta_dev[1].to(seq_lens.device, seq_lens.dtype))
        return SparseAttentionView(new_table, new_lens, max_len)
