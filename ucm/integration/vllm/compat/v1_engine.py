"""Bindings shared by the release lines whose internals follow vLLM's V1 engine layout (0.26 and 0.32).

A release module (`compat.v0_26`, `compat.v0_32`) subclasses `V1EngineBindings` and overrides what its release
changed. What is bound, each wrapper calling the original straight away unless the engine is sparse:

- ``Scheduler.__init__``: a scheduler whose KV connector owns a sparse budget binds it to its KV cache manager
  (`V1SchedulerBlocks`) and routes that manager's ``allocate_slots`` through ``budget.before_allocate`` first
  (an instance-level wrapper: other schedulers in the process are untouched).
- ``GPUModelRunner.execute_model`` / ``_determine_batch_execution_and_padding`` / ``_model_forward`` (the V1
  runner; the CPU and NPU runners derive from it): once the step's inputs are prepared (block table and slot
  mapping committed, before vLLM picks the CUDA-graph mode and builds the attention metadata), the worker's sparse
  runtime begins the step with the batch rows (`batch_rows`). When the step has one view for every layer
  (`SparseWorkerRuntime.step_view`), it is written into the runner's own block-table and sequence-length buffers,
  so the attention metadata vLLM builds (and a full CUDA graph replays) reads it; otherwise full graphs are ruled
  out for the step (``CudagraphDispatcher.dispatch``) and the layer hooks run between the piecewise graphs. The
  step ends after the forward, and the overwritten block-table rows are put back: vLLM's CPU runner aliases the
  device block table to its persistent host copy (the next step's slot mapping is computed from it), and on a GPU
  the next step rewrites them from the host copy anyway.
- ``Attention.__init__``: each layer's ``impl.forward`` goes through `SparseAttentionForward` (vLLM's attention
  custom ops are registered at import time and call ``layer.impl.forward``, so the instance method is the stable
  point); during a sparse step the layer's metadata is rebuilt for the runtime's sparse view.
- ``VllmConfig.use_v2_model_runner``: sparse engines run the V1 model runner. Model Runner V2 (vLLM's default
  for Llama-like models on CUDA) keeps its batch state in other structures that these bindings do not read; a
  dense engine keeps vLLM's choice.
- ``CPUAttentionMetadataBuilder.__init__``: CPU attention of sparse engines keeps vLLM's kernel; the hook only
  refuses a kernel whose K packing the sparse algorithm cannot read (`SPARSE_CPU_ISAS`).

The sparse objects live on our connector; the wrappers find them through vLLM's KV transfer group (worker) or
the scheduler's connector, so no state is hung on vLLM's objects.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ucm.errors import UcmConfigError
from ucm.integration.vllm.compat.base import BatchRow, MetadataAdapter, SchedulerBlocks, VllmBindings
from ucm.sparse.base import QueryShape, SparseAttentionView

logger = logging.getLogger(__name__)

#: Marker set on every function these bindings wrapped (so installing twice wraps once).
_MARK = "_ucm_sparse_hook"

#: The CPU attention kernels whose K the sparse algorithm reads. vLLM's CPU kernels pack a block's K per KV head
#: by ISA: "vec" stores it transposed, ``[head_size, block_size]`` (V follows as ``[block_size, head_size]``), a
#: layout a strided view expresses; "amx" (bf16 on AMX CPUs) stores 16-token tiles of head-dim pairs,
#: ``[block_size / 16, head_size / 2, 16, 2]``, read by `AmxKeys`.
SPARSE_CPU_ISAS = ("vec", "amx")


def sparse_requested(vllm_config: Any) -> bool:
    """True when the engine's KV connector config asks for a sparse method."""
    kv = getattr(vllm_config, "kv_transfer_config", None)
    extra = getattr(kv, "kv_connector_extra_config", None) or {}
    return bool(extra.get("ucm_sparse_method"))


def check_sparse_cpu_isa(isa: str, field: str = "CPU attention kernel") -> str:
    """``isa`` if the sparse algorithm reads K packed by that CPU kernel (a clear error naming ``field``
    otherwise)."""
    if isa not in SPARSE_CPU_ISAS:
        raise UcmConfigError(field, isa, f"one of {SPARSE_CPU_ISAS} for sparse attention")
    return isa


def wrap_method(cls: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace ``cls.name`` by ``make(original)`` once (idempotent through a marker on the wrapper); a static
    method stays one."""
    original = getattr(cls, name)
    if getattr(original, _MARK, False):
        return
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, _MARK, True)
    static = isinstance(inspect.getattr_static(cls, name), staticmethod)
    setattr(cls, name, staticmethod(wrapper) if static else wrapper)


def run_after_init(cls: type, after: Callable[[Any], None]) -> None:
    """Make every new instance of ``cls`` call ``after(instance)`` once its own ``__init__`` returned."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            after(self)

        return __init__

    wrap_method(cls, "__init__", make)


# ====================================================================== attention metadata per backend
class CpuMetadataAdapter(MetadataAdapter):
    """vLLM's CPU attention (``vllm.v1.attention.backends.cpu_attn``): its kernel also reads a work partition
    (``scheduler_metadata``) computed from the sequence lengths, so it is planned again for the sparse lengths."""

    def __init__(self, schedule_kwargs: Callable[[Any], dict[str, Any]], isa_of: Callable[[Any, Any], str]):
        self._schedule_kwargs = schedule_kwargs
        self._isa_of = isa_of  # (layer, impl) -> the CPU kernel ISA the layer's cache is packed for

    def schedule_args(self, metadata: Any, view: SparseAttentionView, layer: Any, impl: Any) -> dict[str, Any]:
        """Keyword arguments of ``ops.cpu_attn_get_scheduler_metadata`` for the sparse lengths (what a release's
        CPU planner takes; the common ones are added by `with_view`)."""
        from vllm import envs

        return dict(
            sliding_window_size=impl.sliding_window,
            isa=self._isa_of(layer, impl),
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=metadata.dynamic_causal,
            **self._schedule_kwargs(impl),
        )

    def with_view(self, metadata: Any, view: SparseAttentionView, layer: Any, impl: Any) -> Any:
        from vllm import _custom_ops as ops

        schedule = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=int(view.seq_lens.shape[0]),
            num_heads=impl.num_heads,
            num_kv_heads=impl.num_kv_heads,
            head_dim=impl.head_size,
            seq_lens=view.seq_lens,
            dtype=_model_dtype(layer),
            query_start_loc=metadata.query_start_loc,
            causal=metadata.causal,
            **self.schedule_args(metadata, view, layer, impl),
        )
        return dataclasses.replace(
            metadata,
            block_table=view.block_table,
            seq_lens=view.seq_lens,
            max_seq_len=int(view.max_seq_len),
            scheduler_metadata=schedule,
        )


class PagedMetadataAdapter(MetadataAdapter):
    """GPU backends whose metadata names the paged inputs ``block_table``, ``seq_lens``, ``max_seq_len``
    (FlashAttention 2/3, Triton attention)."""

    def with_view(self, metadata: Any, view: SparseAttentionView, layer: Any, impl: Any) -> Any:
        if getattr(metadata, "use_cascade", False):
            # cascade attention shares a common prefix across requests: a sparse row breaks that assumption
            raise UcmConfigError("cascade attention", True, "disabled when a sparse method is active")
        changes: dict[str, Any] = {
            "block_table": view.block_table,
            "seq_lens": view.seq_lens,
            "max_seq_len": int(view.max_seq_len),
        }
        if "scheduler_metadata" in {f.name for f in dataclasses.fields(metadata)}:
            changes["scheduler_metadata"] = None  # FA3's ahead-of-time plan was made for the dense lengths
        return dataclasses.replace(metadata, **changes)


def _model_dtype(layer: Any) -> torch.dtype:
    from vllm.config import get_current_vllm_config

    try:
        return get_current_vllm_config().model_config.dtype
    except Exception:  # outside a config context (unit tests): the layer's own dtype
        return getattr(layer, "dtype", torch.get_default_dtype())


# ====================================================================== K pages of a layer
class AmxKeys:
    """K of a cache the CPU "amx" kernel packed (`PackedKeys`): per (block, KV head) the K part holds 16-token
    tiles of head-dim pairs, ``[block_size / 16, head_size / 2, 16, 2]``, which no strided view turns into
    tokens x dims; `read_blocks` unpacks the listed blocks."""

    def __init__(self, kv_cache: torch.Tensor, block_size: int, num_kv_heads: int, head_size: int):
        if block_size % 16 or head_size % 2:
            raise UcmConfigError("amx KV cache block", (block_size, head_size), "block_size % 16 == 0, even head_size")
        num_blocks = kv_cache.shape[0]
        # per (block, head): K's block_size * head_size elements, then V's
        self._k = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * head_size)[:, :, 0]
        self.shape = torch.Size((num_blocks, block_size, num_kv_heads, head_size))
        self.dtype, self.device = kv_cache.dtype, kv_cache.device

    def dim(self) -> int:
        return 4

    def read_blocks(self, block_ids: torch.Tensor) -> torch.Tensor:
        n = int(block_ids.numel())
        _, block_size, heads, head_size = self.shape
        tiles = self._k.index_select(0, block_ids).view(n, heads, block_size // 16, head_size // 2, 16, 2)
        return tiles.permute(0, 2, 4, 1, 3, 5).reshape(n, block_size, heads, head_size)


def key_view(
    kv_cache: Any, block_size: int, num_kv_heads: int, head_size: int, backend: str = "CPU_ATTN",
    isa: str | None = None,
) -> torch.Tensor | AmxKeys:
    """The K pages of one layer's cache as ``[num_blocks, block_size, num_kv_heads, head_size]`` (a view, no copy;
    `AmxKeys` for the CPU "amx" kernel's packing).

    - (k, v) tuple (vllm-ascend): k already has that shape.
    - ``CPU_ATTN``, ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``: filled by the vec kernel (``isa``
      "vec" or None), per (block, head) the K part is stored ``[head_size, block_size]``; by the amx kernel, see
      `AmxKeys`.
    - other backends (FLASH_ATTN, TRITON_ATTN): the logical ``[num_blocks, num_kv_heads, block_size,
      2 * head_size]`` view whose strides address K as ``[..., :head_size]``, or ``[2, num_blocks, block_size,
      num_kv_heads, head_size]`` (K first).
    """
    if isinstance(kv_cache, (tuple, list)):
        k = kv_cache[0]
        if k.dim() != 4 or tuple(k.shape[1:]) != (block_size, num_kv_heads, head_size):
            raise UcmConfigError(
                "k cache shape", tuple(k.shape), f"[num_blocks, {block_size}, {num_kv_heads}, {head_size}]"
            )
        return k
    logical = (num_kv_heads, block_size, 2 * head_size)
    if kv_cache.dim() == 4 and tuple(kv_cache.shape[1:]) == logical:
        if backend == "CPU_ATTN" and isa == "amx":
            return AmxKeys(kv_cache, block_size, num_kv_heads, head_size)
        if backend == "CPU_ATTN":
            pages = kv_cache.view(kv_cache.shape[0], num_kv_heads, 2, head_size, block_size)
            return pages[:, :, 0].permute(0, 3, 1, 2)
        return kv_cache[..., :head_size].permute(0, 2, 1, 3)
    if kv_cache.dim() == 5 and kv_cache.shape[0] == 2 and tuple(kv_cache.shape[2:]) == (
        block_size, num_kv_heads, head_size
    ):
        return kv_cache[0]
    raise UcmConfigError(
        "kv cache shape",
        tuple(kv_cache.shape),
        f"[num_blocks, {num_kv_heads}, {block_size}, {2 * head_size}], "
        f"[2, num_blocks, {block_size}, {num_kv_heads}, {head_size}] or a (k, v) tuple",
    )


# ====================================================================== scheduler block lists
class V1SchedulerBlocks(SchedulerBlocks):
    """`SchedulerBlocks` over a V1 ``KVCacheManager`` with one full-attention KV cache group."""

    def __init__(self, kv_cache_manager: Any):
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        managers = kv_cache_manager.coordinator.single_type_managers
        if len(managers) != 1:
            raise UcmConfigError("KV cache groups", len(managers), "exactly 1 (one full-attention group) for sparse")
        spec = managers[0].kv_cache_spec
        if not isinstance(spec, FullAttentionSpec):
            raise UcmConfigError("KV cache spec", type(spec).__name__, "FullAttentionSpec for sparse attention")
        self._manager = managers[0]
        self._pool = kv_cache_manager.block_pool
        self._null = self._pool.null_block
        self.block_size = int(self._manager.block_size)
        self.null_block_id = int(self._null.block_id)

    def block_ids(self, req_id: str) -> list[int] | None:
        blocks = self._manager.req_to_blocks.get(req_id)
        return [b.block_id for b in blocks] if blocks else None

    def holds_null(self, req_id: str, position: int) -> bool:
        blocks = self._manager.req_to_blocks.get(req_id)
        return bool(blocks) and position < len(blocks) and blocks[position].is_null

    def release(self, req_id: str, positions: Sequence[int]) -> None:
        blocks = self._manager.req_to_blocks[req_id]
        freed = []
        for p in positions:
            freed.append(blocks[p])
            blocks[p] = self._null
        # tail-first like vLLM's own frees, so cached prefix blocks of the request are evicted last
        self._pool.free_blocks(reversed(freed))

    def make_exclusive(self, req_id: str, position: int) -> tuple[int, str]:
        blocks = self._manager.req_to_blocks[req_id]
        block = blocks[position]
        if block.is_null:
            return block.block_id, "kept"
        if block.ref_cnt > 1:
            # Shared through the prefix cache: vLLM's copy-on-write path (the one partial prefix hits use)
            # copies the content on the worker before this step and keeps both blocks alive until then.
            private = self._pool.get_new_blocks(1)[0]
            self._manager._apply_cow(req_id, position, block, private)
            return private.block_id, "copied"
        if block.block_hash is not None:
            # private but indexed: its content changes from now on, so no later request may hit it
            self._pool.evict_blocks({block.block_id})
            return block.block_id, "unindexed"
        return block.block_id, "kept"


# ====================================================================== attention layers
class SparseAttentionForward:
    """Replaces one layer's ``impl.forward``; during a sparse step the layer attends through the runtime's view."""

    def __init__(self, layer_name: str, forward: Any, bindings: V1EngineBindings):
        self.layer_name = layer_name
        self.forward = forward
        self.bindings = bindings
        functools.update_wrapper(self, forward)

    def __call__(
        self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: Any,
        attn_metadata: Any, *args: Any, **kwargs: Any,
    ) -> Any:
        runtime = self.bindings.worker_runtime() if attn_metadata is not None else None
        if runtime is not None:
            runtime.stage_query(self.layer_name, query)
        if runtime is None or not runtime.in_step:
            return self.forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
        adapter = self.bindings.adapter_for(attn_metadata)
        view = runtime.attention_begin(
            self.layer_name, query, key, value, kv_cache,
            adapter.block_table(attn_metadata), adapter.seq_lens(attn_metadata),
        )
        if view is not None:
            attn_metadata = self.bindings.adapted(adapter, attn_metadata, view, layer,
                                                  getattr(self.forward, "__self__", None))
        output = self.forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
        runtime.attention_finished(self.layer_name, query, key, value, output, kv_cache)
        return output


# ====================================================================== the bindings
class V1EngineBindings(VllmBindings):
    """Bindings for a release line with vLLM's V1 engine layout; subclasses set `release` and override what
    their release changed (see the module docstring for what is bound)."""

    release: tuple[int, int] = (0, 0)
    full_graph_steps = True

    def __init__(self) -> None:
        self._installed = False
        self._last_adapted: tuple | None = None  # (metadata, view, kernel shape, adapted metadata)
        self._stepping: tuple[Any, Any] | None = None  # (runner, scheduler output) of the step being prepared
        self._begun_early = False  # the step was begun before the forward (`_determine_batch...`)
        self._overwritten: tuple[torch.Tensor, torch.Tensor] | None = None  # (runner's block table rows, originals)
        self._no_full_graph = False  # set while vLLM picks the graph mode of a step that needs the layer hooks
        self._adapters: dict[str, MetadataAdapter] = {
            "CPUAttentionMetadata": CpuMetadataAdapter(self.cpu_schedule_kwargs, self.cpu_isa),
            "FlashAttentionMetadata": PagedMetadataAdapter(),
            "TritonAttentionMetadata": PagedMetadataAdapter(),
        }

    # ------------------------------------------------------------------ what releases change
    def cpu_schedule_kwargs(self, impl: Any) -> dict[str, Any]:
        """Release-specific keyword arguments of ``ops.cpu_attn_get_scheduler_metadata``."""
        return {}

    def cpu_isa(self, layer: Any, impl: Any = None) -> str | None:
        """The CPU attention kernel ISA a layer's cache is packed for (None off the CPU backend). Here: the
        attribute vLLM's CPU builder sets on each layer (``_set_isa_to_layers``)."""
        return getattr(layer, "isa", None)

    def _install_cpu_isa_hook(self) -> None:
        """A sparse engine keeps vLLM's CPU attention kernel (so its pages, tokens and block namespace are a dense
        engine's); it stops at start if the sparse algorithm cannot read that kernel's K packing."""
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder

        def check_isa(builder: Any) -> None:
            if sparse_requested(builder.vllm_config):
                check_sparse_cpu_isa(builder.isa)

        run_after_init(CPUAttentionMetadataBuilder, check_isa)

    # ------------------------------------------------------------------ VllmBindings
    def installed(self) -> bool:
        return self._installed

    def install(self) -> None:
        if self._installed:
            return
        from vllm.model_executor.layers.attention.attention import Attention
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        run_after_init(Scheduler, self._bind_scheduler)
        self.hook_runner_class(GPUModelRunner)
        wrap_method(CudagraphDispatcher, "dispatch", self._dispatch_without_full)
        run_after_init(Attention, self._wrap_layer)
        self._pin_v1_runner_for_sparse()
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            self._install_cpu_isa_hook()
        from ucm.integration.vllm.compat import ascend

        ascend.install(self)  # vllm-ascend's runner overrides the step methods; no-op without vllm-ascend
        self._installed = True

    def check_engine(self, vllm_config: Any) -> None:
        if not getattr(vllm_config.model_config, "disable_cascade_attn", True):
            # cascade attention shares one prefix across the batch's requests; sparse rows differ per request
            raise UcmConfigError("disable_cascade_attn", False, "True (vLLM's default) with ucm_sparse_method")
        if vllm_config.use_v2_model_runner:
            raise UcmConfigError(
                "VLLM_USE_V2_MODEL_RUNNER", "1",
                "unset or 0 with ucm_sparse_method (the sparse hooks bind vLLM's V1 model runner)",
            )

    def key_views(self, kv_caches: Mapping[str, Any], vllm_config: Any) -> dict[str, torch.Tensor | AmxKeys]:
        model = vllm_config.model_config
        num_kv_heads = model.get_num_kv_heads(vllm_config.parallel_config)
        head_size = model.get_head_size()
        block_size = vllm_config.cache_config.block_size
        layers = vllm_config.compilation_config.static_forward_context
        views = {}
        for name, cache in kv_caches.items():
            layer = layers.get(name)
            backend = getattr(layer, "attn_backend", None)
            backend_name = backend.get_name() if backend is not None else "CPU_ATTN"
            isa = self.cpu_isa(layer, getattr(layer, "impl", None))
            if backend_name == "CPU_ATTN" and isa is not None:
                check_sparse_cpu_isa(isa, f"CPU attention kernel of {name}")
            views[name] = key_view(cache, block_size, num_kv_heads, head_size, backend_name, isa)
        return views

    def query_shape(self, vllm_config: Any) -> QueryShape | None:
        model = vllm_config.model_config
        # decode rows come first in vLLM's batch: a step decodes at most max_num_seqs requests
        return QueryShape(int(vllm_config.scheduler_config.max_num_seqs),
                          int(model.get_num_attention_heads(vllm_config.parallel_config)), int(model.get_head_size()),
                          model.dtype)

    def attention_backend_names(self, layer_names: Sequence[str]) -> dict[str, str]:
        try:
            from vllm.config import get_current_vllm_config

            context = get_current_vllm_config().compilation_config.static_forward_context
        except Exception:  # noqa: BLE001 - outside a vLLM config context the tag just omits the backend
            return {}
        names = {}
        for layer_name in layer_names:
            layer = context.get(layer_name)
            backend = getattr(layer, "attn_backend", None)
            if backend is None:
                continue
            names[layer_name] = backend.get_name() if hasattr(backend, "get_name") else backend.__name__
            isa = self.cpu_isa(layer, getattr(layer, "impl", None))  # CPU kernels pack K by ISA: other bytes
            if isa:
                names[layer_name] += f"/{isa}"
        return names

    # ------------------------------------------------------------------ helpers the wrappers use
    def worker_runtime(self) -> Any:
        """The sparse runtime of this worker's KV connector, or None (no connector, or a dense engine)."""
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        if not has_kv_transfer_group():
            return None
        return getattr(get_kv_transfer_group(), "sparse_runtime", None)

    def adapter_for(self, metadata: Any) -> MetadataAdapter:
        """The adapter of ``metadata``'s backend; a clear error for backends the hooks do not know."""
        name = type(metadata).__name__
        adapter = self._adapters.get(name)
        if adapter is None:
            raise UcmConfigError("attention backend metadata", name, sorted(self._adapters))
        return adapter

    def adapted(self, adapter: MetadataAdapter, metadata: Any, view: SparseAttentionView, layer: Any, impl: Any) -> Any:
        """``adapter.with_view(...)``, reused by the following layers of a step that attend the same view with
        the same metadata (the runtime hands out one view object per distinct table) and the same kernel shape."""
        shape = tuple(getattr(impl, n, None) for n in ("num_heads", "num_kv_heads", "head_size", "sliding_window"))
        last = self._last_adapted
        if last is not None and last[0] is metadata and last[1] is view and last[2] == shape:
            return last[3]
        new = adapter.with_view(metadata, view, layer, impl)
        self._last_adapted = (metadata, view, shape, new)
        return new

    def register_adapter(self, metadata_class_name: str, adapter: MetadataAdapter) -> None:
        """Make ``adapter`` handle metadata objects of that class name (e.g. vllm-ascend's, `compat.ascend`)."""
        self._adapters[metadata_class_name] = adapter

    def batch_rows(self, runner: Any) -> list[BatchRow]:
        """The step's requests in batch order, from the V1 runner's input batch."""
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        starts = runner.query_start_loc.np[: num_reqs + 1]
        return [
            BatchRow(
                req_id=req_id,
                num_prompt_tokens=int(batch.num_prompt_tokens[row]),
                num_computed_tokens=int(batch.num_computed_tokens_cpu[row]),
                num_scheduled_tokens=int(starts[row + 1] - starts[row]),
                block_ids=runner.requests[req_id].block_ids[0],
                query_start=int(starts[row]),
            )
            for row, req_id in enumerate(batch.req_ids[:num_reqs])
        ]

    def hook_runner_class(self, cls: type) -> None:
        """Wrap ``cls``'s step methods so a sparse worker's steps run between the runtime's begin and end (see the
        module docstring). A runner that overrides the early ones (vllm-ascend's) still gets the per-layer path:
        ``_model_forward`` begins any step not begun yet."""

        def make_execute(original: Callable[..., Any]) -> Callable[..., Any]:
            def execute_model(runner: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
                runtime = self.worker_runtime()
                if runtime is None:
                    return original(runner, scheduler_output, *args, **kwargs)
                self._stepping = (runner, scheduler_output)
                try:
                    return original(runner, scheduler_output, *args, **kwargs)
                finally:
                    self._stepping = None
                    if self._begun_early:  # begun, but the forward never ran (an error, an empty step)
                        self._begun_early = False
                        self._end_step(runtime)

            return execute_model

        def make_determine(original: Callable[..., Any]) -> Callable[..., Any]:
            def _determine_batch_execution_and_padding(runner: Any, *args: Any, **kwargs: Any) -> Any:
                stepping, self._stepping = self._stepping, None  # the step's first call (not a dummy run's)
                runtime = self.worker_runtime() if stepping is not None and stepping[0] is runner else None
                if runtime is None or runtime.in_step or runner.input_batch.num_reqs == 0:
                    return original(runner, *args, **kwargs)
                self._begin_early(runner, stepping[1], runtime)
                self._no_full_graph = runtime.needs_layer_hooks
                try:
                    return original(runner, *args, **kwargs)
                finally:
                    self._no_full_graph = False

            return _determine_batch_execution_and_padding

        def make_forward(original: Callable[..., Any]) -> Callable[..., Any]:
            def _model_forward(runner: Any, *args: Any, **kwargs: Any) -> Any:
                runtime = self.worker_runtime()
                if runtime is None or runner.input_batch.num_reqs == 0:
                    return original(runner, *args, **kwargs)
                if self._begun_early:
                    self._begun_early = False
                elif runtime.in_step:
                    return original(runner, *args, **kwargs)  # a nested forward of the same step
                else:
                    from vllm.forward_context import get_forward_context

                    if get_forward_context().attn_metadata is None:
                        return original(runner, *args, **kwargs)  # dummy / profiling run
                    runtime.begin_step(self.batch_rows(runner))
                runtime.forward_begin()  # every input copy of the step is queued by now
                try:
                    return original(runner, *args, **kwargs)
                finally:
                    self._end_step(runtime)

            return _model_forward

        wrap_method(cls, "execute_model", make_execute)
        wrap_method(cls, "_determine_batch_execution_and_padding", make_determine)
        wrap_method(cls, "_model_forward", make_forward)

    def _begin_early(self, runner: Any, scheduler_output: Any, runtime: Any) -> None:
        """Begin the step before vLLM builds its attention metadata, and write the step's view (if any) into the
        runner's block table and lengths; the scheduler's sparse metadata of the step is taken first (vLLM binds
        it to the connector only later, when the forward starts)."""
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        get_kv_transfer_group().prepare_sparse_step(getattr(scheduler_output, "kv_connector_metadata", None))
        runtime.begin_step(self.batch_rows(runner))
        self._begun_early = True
        num_reqs = runner.input_batch.num_reqs
        block_table = runner.input_batch.block_table[0].get_device_tensor(num_reqs)
        seq_lens = runner.seq_lens[:num_reqs]
        view = runtime.step_view(block_table, seq_lens)
        if view is not None:
            self._overwritten = (block_table, block_table.clone())
            block_table.copy_(view.block_table)
            seq_lens.copy_(view.seq_lens)  # recomputed by vLLM every step

    def _end_step(self, runtime: Any) -> None:
        try:
            runtime.end_step()
        finally:
            overwritten, self._overwritten = self._overwritten, None
            if overwritten is not None:
                overwritten[0].copy_(overwritten[1])

    def _dispatch_without_full(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def dispatch(dispatcher: Any, *args: Any, invalid_modes: Any = None, **kwargs: Any) -> Any:
            if self._no_full_graph:
                from vllm.config import CUDAGraphMode

                # the layer hooks run in this step: only piecewise graphs (or eager) leave them between the pieces
                invalid_modes = {CUDAGraphMode.FULL, *(invalid_modes or ())}
            return original(dispatcher, *args, invalid_modes=invalid_modes, **kwargs)

        return dispatch

    def _bind_scheduler(self, scheduler: Any) -> None:
        budget = getattr(getattr(scheduler, "connector", None), "sparse_budget", None)
        if budget is None:
            return
        manager = scheduler.kv_cache_manager
        budget.bind(V1SchedulerBlocks(manager))
        allocate_slots = manager.allocate_slots

        @functools.wraps(allocate_slots)
        def allocate_slots_with_budget(request: Any, num_new_tokens: int, *args: Any, **kwargs: Any) -> Any:
            if num_new_tokens > 0:
                budget.before_allocate(request, num_new_tokens)
            return allocate_slots(request, num_new_tokens, *args, **kwargs)

        # instance attribute on this engine's manager only: the budget must run before each allocation, and
        # vLLM offers no allocation callback
        manager.allocate_slots = allocate_slots_with_budget

    def _wrap_layer(self, layer: Any) -> None:
        impl = getattr(layer, "impl", None)
        if impl is None or isinstance(impl.forward, SparseAttentionForward):
            return
        # instance attribute: vLLM's attention ops call layer.impl.forward, the one point every backend shares
        impl.forward = SparseAttentionForward(layer.layer_name, impl.forward, self)

    def _pin_v1_runner_for_sparse(self) -> None:
        from vllm.config import VllmConfig

        current = VllmConfig.__dict__.get("use_v2_model_runner")
        if not isinstance(current, property) or getattr(current.fget, _MARK, False):
            return
        original = current.fget

        def use_v2_model_runner(config: Any) -> bool:
            if sparse_requested(config):
                from vllm import envs

                # an explicit VLLM_USE_V2_MODEL_RUNNER=1 is refused by check_engine with a clear message
                return bool(envs.VLLM_USE_V2_MODEL_RUNNER)
            return original(config)

        setattr(use_v2_model_runner, _MARK, True)
        VllmConfig.use_v2_model_runner = property(functools.wraps(original)(use_v2_model_runner))
