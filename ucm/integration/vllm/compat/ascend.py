"""vllm-ascend adapter of the sparse hooks: its attention metadata, (k, v) caches and model runner.

Written against vllm-ascend's public code (``vllm_ascend/attention/attention_v1.py``,
``vllm_ascend/worker/model_runner_v1.py``); importable without vllm-ascend or torch_npu. `install` is called by
the release bindings (`compat.v1_engine.V1EngineBindings.install`): with vllm-ascend present it registers the
metadata adapter and wraps the NPU runner's step method.

What differs on Ascend:
- KV cache per layer is a tuple ``(k_cache, v_cache)``, each ``[num_blocks, block_size, num_kv_heads, head_size]``
  (block size 128): the K view the sparse algorithm needs is ``k_cache`` itself (`compat.v1_engine.key_view`).
- ``AscendMetadata`` names the table ``block_tables`` and carries the lengths three times: ``seq_lens`` (what the
  paged-attention kernels read as ``context_lens``), ``seq_lens_cpu`` (newer releases) and ``seq_lens_list`` (what
  the fused-infer kernel reads as ``actual_seq_lengths_kv``). All of them must describe the sparse view.
- ``NPUModelRunner`` overrides ``_model_forward``: the step hook wraps it too.
- ACL graphs replay decode attention with the metadata captured at graph-capture time, so sparse engines run
  eager there (the connector asks vLLM for piecewise graphs; use ``enforce_eager`` on Ascend).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
from typing import Any

import torch

from ucm.integration.vllm.compat.base import MetadataAdapter
from ucm.sparse.base import SparseAttentionView

logger = logging.getLogger(__name__)

#: The model runner module of vllm-ascend (v1 engine) and its class.
NPU_RUNNER = ("vllm_ascend.worker.model_runner_v1", "NPUModelRunner")


class AscendMetadataAdapter(MetadataAdapter):
    """``AscendMetadata``: sparse table in ``block_tables``, sparse lengths in every length field it has."""

    def block_table(self, metadata: Any) -> torch.Tensor:
        return metadata.block_tables

    def seq_lens(self, metadata: Any) -> torch.Tensor:
        return metadata.seq_lens

    def with_view(self, metadata: Any, view: SparseAttentionView, layer: Any, impl: Any) -> Any:
        if getattr(_forward_context(), "capturing", False):
            raise RuntimeError("sparse attention cannot be captured into an ACL graph: run with enforce_eager")
        lengths = view.seq_lens.to(metadata.seq_lens.device)
        changes: dict[str, Any] = {
            "block_tables": view.block_table.to(metadata.block_tables.device),
            "seq_lens": lengths,
        }
        names = {f.name for f in dataclasses.fields(metadata)}
        host = view.seq_lens.to("cpu")
        if "seq_lens_cpu" in names and metadata.seq_lens_cpu is not None:
            changes["seq_lens_cpu"] = host
        if "seq_lens_list" in names and metadata.seq_lens_list is not None:
            # the original list may be longer (padded rows of a graph batch): keep its tail
            tail = list(metadata.seq_lens_list[host.numel():])
            changes["seq_lens_list"] = host.tolist() + tail
        if "max_seq_len" in names:
            changes["max_seq_len"] = int(view.max_seq_len)
        return dataclasses.replace(metadata, **changes)


def _forward_context() -> Any:
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available
    except ImportError:
        return None
    return get_forward_context() if is_forward_context_available() else None


def vllm_ascend_available() -> bool:
    """True when vllm-ascend is installed in this environment (it is not imported)."""
    return importlib.util.find_spec("vllm_ascend") is not None


def install(bindings: Any) -> bool:
    """With vllm-ascend installed: register its metadata adapter with ``bindings`` (a
    `compat.v1_engine.V1EngineBindings`) and wrap its model runner's step; False when it is not installed."""
    if not vllm_ascend_available():
        return False
    bindings.register_adapter("AscendMetadata", AscendMetadataAdapter())
    module, name = NPU_RUNNER
    runner_cls = getattr(importlib.import_module(module), name)
    bindings.hook_runner_class(runner_cls)
    logger.debug("UCM sparse hooks installed on %s.%s", module, name)
    return True
