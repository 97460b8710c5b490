"""Triton decode attention over an ESA selection of a paged KV cache, reading the selection itself.

Called by `CudaBackend.sparse_decode_attention` (semantics: `ucm.device.reference.sparse_decode_attention`), i.e.
by the batched resident-mode ESA step (`ucm.sparse.esa.step.esa_decode_attention`) and its benchmark. Request b
attends to its logical blocks ``[0, sink_end)``, then ``sink_end + selected[b, :counts[b]]`` (the top-k output:
candidate indices, ascending, -1 padded), then ``[local_start[b], ceil(seq_lens[b] / block_size))``; the
engine's block table maps them to physical blocks inside the kernel. No sparse block table is materialized: the
selection goes straight from the top-k kernel into this one.

Same split-K scheme as `kernels/paged_attention.py` (one program per (request, KV head, split) for all query
heads of the group, so every K/V byte is read once; its merge kernel combines the splits by log-sum-exp). The
split walks the *kept* tokens; per tile it resolves kept block -> logical block -> physical block (two small
cached loads) before the K/V loads.
"""

from __future__ import annotations

import math

import torch

from ucm.device.selection import BlockSelection
from ucm.errors import UcmConfigError

from ._triton import tl, triton
from .paged_attention import _attend_tile, _merge_kernel, _store_partial, num_splits_for


@triton.jit
def _sparse_split_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, sel_ptr, counts_ptr, local_ptr, part_ptr, lse_ptr,
    stride_qb, stride_qh,
    stride_kn, stride_kt, stride_kh,
    stride_vn, stride_vt, stride_vh,
    stride_tb, stride_sb,
    sink_end, scale,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, NUM_SPLITS: tl.constexpr, NUM_Q_HEADS: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b).to(tl.int64)
    count = tl.load(counts_ptr + b).to(tl.int64)
    local_start = tl.load(local_ptr + b).to(tl.int64)
    # kept blocks = sink + selected + [local_start, total): every dropped block is a full one
    kept_len = seq_len - (local_start - sink_end - count) * BLOCK_SIZE
    chunk = tl.cdiv(tl.cdiv(kept_len, NUM_SPLITS), BLOCK_T) * BLOCK_T
    start = split * chunk
    end = tl.minimum(start + chunk, kept_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t = tl.arange(0, BLOCK_T)
    heads = kv_head * GROUP + offs_g
    mask_g = offs_g < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_g[:, None], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    row = table_ptr + b.to(tl.int64) * stride_tb
    sel_row = sel_ptr + b.to(tl.int64) * stride_sb
    for t0 in range(start, end, BLOCK_T):
        tok = t0 + offs_t
        mask_t = tok < end
        kept = tok // BLOCK_SIZE
        within = tok % BLOCK_SIZE
        s = kept - sink_end  # position in the selection; past `count` it walks the local window
        in_sel = (s >= 0) & (s < count)
        cand = tl.load(sel_row + s, mask=mask_t & in_sel, other=0)
        logical = tl.where(s < 0, kept, tl.where(in_sel, sink_end + cand, local_start + s - count))
        block = tl.load(row + logical, mask=mask_t, other=0).to(tl.int64)
        m_i, l_i, acc = _attend_tile(
            q, k_ptr, v_ptr, block, within, mask_t, kv_head,
            stride_kn, stride_kt, stride_kh, stride_vn, stride_vt, stride_vh, scale, m_i, l_i, acc, HEAD_DIM,
        )
    _store_partial(part_ptr, lse_ptr, m_i, l_i, acc, b, heads, mask_g, split, NUM_SPLITS, NUM_Q_HEADS, HEAD_DIM)


def sparse_paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    selection: BlockSelection,
    scale: float | None = None,
    block_t: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention of ``query`` ``[B, num_q_heads, head_dim]`` over each request's ESA-kept blocks.

    ``selection`` (`ucm.device.BlockSelection`) carries the engine's (full, dense) ``block_table`` and
    ``seq_lens``, the top-k output ``selected`` / ``counts``, ``sink_end`` and ``local_start`` (``sink_end <=
    local_start[b] <= ceil(seq_lens[b] / block_size) - 1``, not checked here: that would sync); its
    ``max_seq_len``, a host bound on the kept tokens, sizes the split grid without a device sync (default: the
    table's width in tokens). Never synchronizes with the device; the selection must be on the query's device.
    """
    if query.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        shapes = (tuple(query.shape), tuple(k_cache.shape), tuple(v_cache.shape))
        allowed = "[B, num_q_heads, head_dim] and two equal [num_blocks, block_size, num_kv_heads, head_dim]"
        raise UcmConfigError("query/cache shapes", shapes, allowed)
    batch, num_q_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_q_heads % num_kv_heads or k_cache.shape[3] != head_dim:
        raise UcmConfigError("num_q_heads/head_dim", (num_q_heads, head_dim),
                             f"a multiple of num_kv_heads={num_kv_heads} and the cache head_dim {k_cache.shape[3]}")
    selection.check_query(query)
    if selection.device != query.device:
        raise UcmConfigError("selection device", str(selection.device), f"the query's device {query.device}")
    if query.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise UcmConfigError("head_dim stride", (query.stride(2), k_cache.stride(3)), "1 (contiguous head_dim)")
    block_table, seq_lens, selected = selection.block_table, selection.seq_lens, selection.selected
    counts, local_start, sink_end = selection.counts, selection.local_start, selection.sink_end
    max_seq_len = selection.max_seq_len
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if max_seq_len is None:
        max_seq_len = block_table.shape[1] * block_size
    if num_splits is None:
        cuda = query.device.type == "cuda"  # CPU tensors: Triton's interpreter (tests)
        sms = torch.cuda.get_device_properties(query.device).multi_processor_count if cuda else 4
        num_splits = num_splits_for(batch, num_kv_heads, max_seq_len, block_t, sms)
    part = torch.empty(batch * num_q_heads * num_splits, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(batch * num_q_heads * num_splits, dtype=torch.float32, device=query.device)
    if selected.shape[1] == 0:  # nothing selected anywhere: a valid pointer that is never read
        selected = counts.view(batch, 1)
    elif selected.stride(1) != 1:
        selected = selected.contiguous()
    group = num_q_heads // num_kv_heads
    _sparse_split_kernel[(batch, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_table, seq_lens, selected, counts, local_start, part, lse,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0), selected.stride(0),
        sink_end, scale,
        BLOCK_SIZE=block_size, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_T=block_t, NUM_SPLITS=num_splits, NUM_Q_HEADS=num_q_heads, num_warps=num_warps, num_stages=num_stages,
    )
    out = torch.empty_like(query)
    _merge_kernel[(batch, num_q_heads)](
        part, lse, out, out.stride(0), out.stride(1), NUM_Q_HEADS=num_q_heads, NUM_SPLITS=num_splits,
        HEAD_DIM=head_dim, num_warps=1,
    )
    return out
