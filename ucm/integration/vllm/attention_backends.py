"""What differs between vLLM attention backends for sparse attention: how a layer's metadata takes a sparse
block table, and where the K pages of a layer's KV cache are.

Called by `ucm.integration.vllm.attention_hooks` (per layer, per step: `adapter_for(...).with_view`), by the
connector's worker side when it registers the KV caches with the sparse algorithm (`key_views`), and by the
plugin (`install_cpu_layout_hook`). The sparse algorithm never sees vLLM types: it receives the engine's block
table and sequence lengths as tensors and returns a `ucm.sparse.SparseAttentionView`; this module turns that view
back into the backend's metadata object.

Backends:
- vLLM CPU (``CPUAttentionMetadata``): the kernel also reads a work partition (``scheduler_metadata``) computed
  from the sequence lengths, so it is recomputed for the sparse lengths. Its KV pages are packed per ISA; sparse
  engines use the "vec" packing, whose K a strided view can address (`CPU_SPARSE_ISA`).
- GPU backends with ``block_table`` / ``seq_lens`` / ``max_seq_len`` fields (FlashAttention, Triton): the
  ahead-of-time FA3 schedule is dropped (it was planned for the dense lengths) and cascade attention must be off.
- vllm-ascend (``AscendMetadata``): see `ucm.integration.vllm.ascend`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Mapping
from typing import Any

import torch

from ucm.errors import UcmConfigError
from ucm.sparse.base import SparseAttentionView


class MetadataAdapter:
    """Reads the dense block table / lengths of one backend's metadata and builds a copy with a sparse view."""

    def block_table(self, metadata: Any) -> torch.Tensor:
        return metadata.block_table

    def seq_lens(self, metadata: Any) -> torch.Tensor:
        return metadata.seq_lens

    def with_view(self, metadata: Any, view: SparseAttentionView, layer: Any, impl: Any) -> Any:
        """A copy of ``metadata`` whose attention reads ``view`` (``metadata`` itself is shared by all layers
        of the step and stays unchanged)."""
        raise NotImplementedError


class CpuMetadataAdapter(MetadataAdapter):
    """vLLM's CPU attention (``vllm.v1.attention.backends.cpu_attn``)."""

    def with_view(self, metadata: Any, view: SparseAttentionView, layer: Any, impl: Any) -> Any:
        from vllm import _custom_ops as ops
        from vllm import envs

        # The kernel splits work by the sequence lengths it is given: plan it for the sparse lengths.
        schedule = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=int(view.seq_lens.shape[0]),
            num_heads=impl.num_heads,
            num_kv_heads=impl.num_kv_heads,
            head_dim=impl.head_size,
            seq_lens=view.seq_lens,
            dtype=_model_dtype(layer, metadata),
            query_start_loc=metadata.query_start_loc,
            causal=metadata.causal,
            sliding_window_size=impl.sliding_window,
            isa=layer.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=metadata.dynamic_causal,
            kv_cache_dtype=impl.kv_cache_dtype,
        )
        return dataclasses.replace(
            metadata,
            block_table=view.block_table,
            seq_lens=view.seq_lens,
            max_seq_len=int(view.max_seq_len),
            scheduler_metadata=schedule,
        )


class PagedMetadataAdapter(MetadataAdapter):
    """GPU backends whose metadata names the paged inputs ``block_table``, ``seq_lens``, ``max_seq_len``."""

    def with_view(self, metadata: Any, view: SparseAttentionView, layer: Any, impl: Any) -> Any:
        changes: dict[str, Any] = {
            "block_table": view.block_table,
            "seq_lens": view.seq_lens,
            "max_seq_len": int(view.max_seq_len),
        }
        names = {f.name for f in dataclasses.fields(metadata)}
        if getattr(metadata, "use_cascade", False):
            # cascade attention shares a common prefix across requests: a sparse row breaks that assumption
            raise UcmConfigError("cascade attention", True, "disabled when a sparse method is active")
        if "scheduler_metadata" in names:
            changes["scheduler_metadata"] = None  # planned for the dense lengths; the kernel plans again
        return dataclasses.replace(metadata, **changes)


def _model_dtype(layer: Any, metadata: Any) -> torch.dtype:
    from vllm.config import get_current_vllm_config

    try:
        return get_current_vllm_config().model_config.dtype
    except Exception:  # outside a config context (unit tests): the layer's own dtype
        return getattr(layer, "dtype", torch.get_default_dtype())


_ADAPTERS: dict[str, MetadataAdapter] = {
    "CPUAttentionMetadata": CpuMetadataAdapter(),
    "FlashAttentionMetadata": PagedMetadataAdapter(),
    "TritonAttentionMetadata": PagedMetadataAdapter(),
}


def register_adapter(metadata_class_name: str, adapter: MetadataAdapter) -> None:
    """Make ``adapter`` handle metadata objects of that class name (used by `ucm.integration.vllm.ascend`)."""
    _ADAPTERS[metadata_class_name] = adapter


def adapter_for(metadata: Any) -> MetadataAdapter:
    """The adapter of ``metadata``'s backend; a clear error for backends the hooks do not know."""
    name = type(metadata).__name__
    adapter = _ADAPTERS.get(name)
    if adapter is None:
        if name.startswith("Ascend"):
            importlib.import_module("ucm.integration.vllm.ascend")  # registers its adapters on import
            adapter = _ADAPTERS.get(name)
        if adapter is None:
            raise UcmConfigError("attention backend metadata", name, sorted(_ADAPTERS))
    return adapter


#: The CPU attention kernel layout the sparse hooks read K from. vLLM's CPU kernels pack a block's K per KV head
#: by ISA: "vec" stores it transposed, ``[head_size, block_size]`` (V follows as ``[block_size, head_size]``), a
#: layout a strided view can express; "amx" interleaves pairs of head dims across tokens, which no view can, so
#: sparse engines run the vec kernel (`install_cpu_layout_hook`).
CPU_SPARSE_ISA = "vec"


def key_view(
    kv_cache: Any, block_size: int, num_kv_heads: int, head_size: int, backend: str = "CPU_ATTN"
) -> torch.Tensor:
    """The K pages of one layer's cache as ``[num_blocks, block_size, num_kv_heads, head_size]`` (a view, no copy).

    - (k, v) tuple (vllm-ascend): k already has that shape.
    - ``CPU_ATTN``, ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` filled by the vec kernel: per
      (block, head) the K part is stored ``[head_size, block_size]``.
    - other backends: ``[2, num_blocks, block_size, num_kv_heads, head_size]`` (K first), or the 4-D logical
      ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` view whose strides address K as ``[..., :head]``.
    """
    if isinstance(kv_cache, (tuple, list)):
        k = kv_cache[0]
        _check_shape(k, (block_size, num_kv_heads, head_size), "k cache")
        return k
    logical = (num_kv_heads, block_size, 2 * head_size)
    if kv_cache.dim() == 4 and tuple(kv_cache.shape[1:]) == logical:
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


def _check_shape(t: torch.Tensor, tail: tuple[int, ...], what: str) -> None:
    if t.dim() != 4 or tuple(t.shape[1:]) != tail:
        raise UcmConfigError(f"{what} shape", tuple(t.shape), f"[num_blocks, {', '.join(map(str, tail))}]")


def key_views(kv_caches: Mapping[str, Any], vllm_config: Any) -> dict[str, torch.Tensor]:
    """`key_view` of every layer cache of an engine (what ``UcmSparseBase.register_kv_caches`` takes)."""
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
        isa = getattr(layer, "isa", None)
        if backend_name == "CPU_ATTN" and isa is not None and isa != CPU_SPARSE_ISA:
            raise UcmConfigError(f"CPU attention kernel of {name}", isa, f"{CPU_SPARSE_ISA!r} for sparse attention")
        views[name] = key_view(cache, block_size, num_kv_heads, head_size, backend_name)
    return views


def sparse_requested(vllm_config: Any) -> bool:
    """True when the engine's KV connector config asks for a sparse method."""
    kv = getattr(vllm_config, "kv_transfer_config", None)
    extra = getattr(kv, "kv_connector_extra_config", None) or {}
    return bool(extra.get("ucm_sparse_method"))


def install_cpu_layout_hook() -> None:
    """Make CPU attention of sparse engines use the `CPU_SPARSE_ISA` kernel (idempotent; dense engines keep
    vLLM's choice). Every write and read of the KV cache goes through the builder's ISA, so switching it
    before the first forward keeps the cache consistent; only the kernel speed differs."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder

    if getattr(CPUAttentionMetadataBuilder.__init__, "_ucm_sparse_hook", False):
        return
    original = CPUAttentionMetadataBuilder.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if self.isa != CPU_SPARSE_ISA and sparse_requested(self.vllm_config):
            if self.isa != "amx":
                raise UcmConfigError("CPU attention kernel", self.isa, f"{CPU_SPARSE_ISA!r} or 'amx' (x86) for sparse")
            self.isa = CPU_SPARSE_ISA
            self._set_isa_to_layers(self.layer_names)

    __init__._ucm_sparse_hook = True  # type: ignore[attr-defined]
    CPUAttentionMetadataBuilder.__init__ = __init__
