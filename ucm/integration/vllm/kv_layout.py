"""How vLLM's registered KV caches map to store rows: layer order, page tensors, and a layout tag.

Called once per worker by the connector's `register_kv_caches`. A stored block is one vLLM block of every layer
of the worker: the row is each layer's page (``cache[block]``) concatenated in model layer order (the device
layer's block-buffer convention). Pages are moved as raw bytes, so two engines may exchange blocks only when
their pages have the same physical layout; the tag computed here (attention backend, dtype, page shape and the
physical order of its dimensions) goes into the block namespace so different layouts never share ids.

Each page tensor is re-viewed in its physical dimension order (a logical view with permuted strides becomes a
view whose pages are contiguous), so a row is the page's bytes as they lie in memory.

Accepted per-layer caches (vLLM 0.32 and the layouts of earlier releases / vllm-ascend):
- one tensor ``[num_blocks, ...]`` (vLLM 0.32: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, a view
  whose physical order differs by backend);
- one tensor ``[2, num_blocks, ...]`` (K and V stacked in front: split into a (k, v) pair of page tensors);
- a (k, v) tuple/list of ``[num_blocks, ...]`` tensors (vllm-ascend).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ucm.device.reference import page_nbytes
from ucm.errors import UcmConfigError


@dataclasses.dataclass(frozen=True)
class KvLayout:
    layer_names: tuple[str, ...]
    caches: tuple[Any, ...]  # per layer: a page tensor or a (k, v) tuple of page tensors
    page_bytes: tuple[int, ...]  # per layer, bytes of one block
    num_blocks: int
    tag: str

    @property
    def bytes_per_block(self) -> int:
        return sum(self.page_bytes)

    def row_offset(self, layer_name: str) -> int:
        """Byte offset of `layer_name`'s page inside a stored row."""
        index = self.layer_names.index(layer_name)
        return sum(self.page_bytes[:index])

    def as_dict(self) -> dict[str, Any]:
        """Layer name -> cache, in row order (what the sparse algorithm registers)."""
        return dict(zip(self.layer_names, self.caches, strict=True))


def _dim_order(t: torch.Tensor) -> str:
    """Physical order of the dimensions after dim 0, outermost first (e.g. '0123' = contiguous)."""
    inner = list(range(1, t.dim()))
    order = sorted(inner, key=lambda d: (-t.stride(d), d))
    return "".join(str(d - 1) for d in order)


def _physical(t: torch.Tensor) -> torch.Tensor:
    """`t` with its dims after dim 0 permuted into memory order, so a page is contiguous when its bytes are.

    vLLM 0.32 hands out a logical view whose strides follow the backend's physical order; rows are moved as raw
    bytes in that physical order (the tag records it), which is also the fastest copy."""
    order = sorted(range(1, t.dim()), key=lambda d: (-t.stride(d), d))
    return t.permute(0, *order)


def _logical_pages(name: str, cache: Any, num_blocks: int) -> tuple[str, list[torch.Tensor]]:
    """("t", [tensor]) or ("kv", [k, v]): the layer's page tensors as vLLM registered them (blocks along dim 0)."""
    if isinstance(cache, torch.Tensor):
        if cache.dim() >= 2 and cache.shape[0] == num_blocks:
            return "t", [cache]
        if cache.dim() >= 3 and cache.shape[0] == 2 and cache.shape[1] == num_blocks:
            return "kv", [cache[0], cache[1]]
    elif isinstance(cache, Sequence) and len(cache) > 0 and all(isinstance(c, torch.Tensor) for c in cache):
        if all(c.dim() >= 2 and c.shape[0] == num_blocks for c in cache):
            return "kv", list(cache)
    shape = tuple(cache.shape) if isinstance(cache, torch.Tensor) else type(cache).__name__
    raise UcmConfigError(
        f"KV cache layout of layer {name}",
        shape,
        f"a tensor [num_blocks={num_blocks}, ...], a tensor [2, {num_blocks}, ...] or a (k, v) tuple of "
        f"[{num_blocks}, ...] tensors",
    )


def detect_layout(
    kv_caches: Mapping[str, Any],
    layer_order: Sequence[str],
    num_blocks: int,
    attn_backend_names: Mapping[str, str] | None = None,
) -> KvLayout:
    """Build the `KvLayout` of the registered caches, layers in `layer_order` (vLLM's KV cache group order)."""
    missing = [n for n in layer_order if n not in kv_caches]
    if missing:
        raise UcmConfigError("registered KV caches", sorted(kv_caches), f"every layer of the KV group: {missing}")
    caches, page_bytes, signatures = [], [], []
    for name in layer_order:
        kind, logical = _logical_pages(name, kv_caches[name], num_blocks)
        pages = [_physical(t) for t in logical]
        caches.append(pages[0] if kind == "t" else tuple(pages))
        page_bytes.append(sum(page_nbytes(p) for p in pages))  # raises when a block's page is not contiguous
        backend = (attn_backend_names or {}).get(name, "?")
        parts = [f"{str(t.dtype).replace('torch.', '')}{list(t.shape[1:])}o{_dim_order(t)}" for t in logical]
        signatures.append(f"{backend}/{kind}/" + "+".join(parts))
    # One tag for the whole row: layers usually share a signature; list the distinct ones in order otherwise.
    distinct = list(dict.fromkeys(signatures))
    tag = distinct[0] if len(distinct) == 1 else "|".join(signatures)
    return KvLayout(tuple(layer_order), tuple(caches), tuple(page_bytes), num_blocks, tag)
