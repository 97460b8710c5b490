"""Block representations: float32 mean of K over each listed block's valid tokens, per KV head.

Called by `CudaBackend.block_means` after prefill (semantics: `ucm.device.reference.block_means`). One program
per (block, KV head) reads the block's K tokens through the cache's strides, so any layout permuted into the
``[num_blocks, block_size, num_kv_heads, head_dim]`` view works without a copy.
"""

from __future__ import annotations

import torch

from ucm.errors import UcmConfigError

from ._indices import to_device_int64
from ._triton import next_pow2, tl, triton


@triton.jit(do_not_specialize=["block_size"])
def _block_means_kernel(
    k_cache,
    stride_block,
    stride_token,
    stride_head,
    stride_dim,
    ids,
    num_tokens,
    out,
    stride_out_block,
    stride_out_head,
    num_blocks,
    block_size,
    head_dim,
    HAS_NUM_TOKENS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    head = tl.program_id(1)
    block = tl.load(ids + i)
    if HAS_NUM_TOKENS:
        count = tl.load(num_tokens + i)
    else:
        count = block_size.to(tl.int64)
    valid = tl.minimum(count, block_size)
    # Device-resident ids are not checked on the host (that would synchronize): out-of-range ids read nothing.
    valid = tl.where((block >= 0) & (block < num_blocks), valid, 0)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    base = k_cache + block * stride_block + head * stride_head
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for t0 in range(0, block_size, BLOCK_T):
        tokens = t0 + tl.arange(0, BLOCK_T)
        mask = (tokens < valid)[:, None] & dim_mask[None, :]
        ptrs = base + tokens[:, None] * stride_token + dims[None, :] * stride_dim
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / tl.maximum(count, 1).to(tl.float32)
    tl.store(out + i * stride_out_block + head * stride_out_head + dims, mean, mask=dim_mask)


def block_means(
    k_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 ``[n, num_kv_heads, head_dim]`` mean of K per listed block (see `reference.block_means`)."""
    if k_cache.dim() != 4:
        raise UcmConfigError("k_cache shape", tuple(k_cache.shape), "[num_blocks, block_size, num_kv_heads, head_dim]")
    num_blocks, block_size, num_heads, head_dim = k_cache.shape
    n = block_ids.numel()
    if num_tokens is not None and num_tokens.numel() != n:
        raise UcmConfigError("num_tokens", f"{num_tokens.numel()} entries", f"one per block id ({n})")
    if block_ids.device.type == "cpu" and n:
        lo, hi = int(block_ids.min()), int(block_ids.max())
        if lo < 0 or hi >= num_blocks:
            raise UcmConfigError("block_ids", f"range [{lo}, {hi}]", f"ids in [0, {num_blocks})")
    device = k_cache.device
    out = torch.empty(n, num_heads, head_dim, dtype=torch.float32, device=device)
    if n == 0 or num_heads == 0 or head_dim == 0:
        return out.zero_()
    ids, counts = to_device_int64([block_ids, num_tokens if num_tokens is not None else []], device)
    block_d = next_pow2(head_dim)
    block_t = max(1, min(next_pow2(block_size), 4096 // block_d))
    _block_means_kernel[(n, num_heads)](
        k_cache,
        *k_cache.stride(),
        ids,
        counts if num_tokens is not None else ids,
        out,
        out.stride(0),
        out.stride(1),
        num_blocks,
        block_size,
        head_dim,
        HAS_NUM_TOKENS=num_tokens is not None,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out
