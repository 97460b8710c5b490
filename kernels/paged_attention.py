"""Triton decode attention over a paged KV cache (split-K "flash decoding"), dense or sparse by block table.

One query token per request attends to the first ``seq_lens[b]`` tokens its block-table row lists; a sparse
algorithm passes a shorter table (kept blocks only) and shorter lengths, a dense run the engine's table. Used by
the ESA benchmark (`bench/esa_step.py`) as the dense paged baseline and as the attention of the ESA step; in an
engine the engine's own attention kernel reads the sparse table instead. Reference: `ucm.sparse.attention.
paged_decode_attention` (plain PyTorch), checked in `tests/sparse/test_paged_attention_kernel.py`.

Layout: caches ``[num_blocks, block_size, num_kv_heads, head_dim]`` (any strides with head_dim contiguous);
each program handles one (request, KV head, split) for all query heads of that KV head's group, so every K/V
byte is read once per split; a second kernel merges the splits by their log-sum-exp.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _attend_tile(
    q, k_ptr, v_ptr, block, within, mask_t, kv_head,
    stride_kn, stride_kt, stride_kh, stride_vn, stride_vt, stride_vh, scale, m_i, l_i, acc,
    HEAD_DIM: tl.constexpr,
):
    """Online-softmax update of (m_i, l_i, acc) with one tile of tokens, each given as (physical block, offset)."""
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(
        k_ptr + block[:, None] * stride_kn + within[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
        mask=mask_t[:, None], other=0.0,
    )
    qk = tl.dot(q, tl.trans(k)) * scale
    qk = tl.where(mask_t[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_ptr + block[:, None] * stride_vn + within[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
        mask=mask_t[:, None], other=0.0,
    )
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _store_partial(
    part_ptr, lse_ptr, m_i, l_i, acc, b, heads, mask_g, split,
    NUM_SPLITS: tl.constexpr, NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Write one split's normalized output and log-sum-exp for the merge kernel (empty split: lse = -inf)."""
    offs_d = tl.arange(0, HEAD_DIM)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    base = (b * NUM_Q_HEADS + heads) * NUM_SPLITS + split
    tl.store(part_ptr + base[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask_g[:, None])
    tl.store(lse_ptr + base, lse, mask=mask_g)


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, part_ptr, lse_ptr,
    stride_qb, stride_qh,
    stride_kn, stride_kt, stride_kh,
    stride_vn, stride_vt, stride_vh,
    stride_tb,
    scale,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, NUM_SPLITS: tl.constexpr, NUM_Q_HEADS: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_T) * BLOCK_T
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

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
    for t0 in range(start, end, BLOCK_T):
        tok = t0 + offs_t
        mask_t = tok < end
        block = tl.load(row + tok // BLOCK_SIZE, mask=mask_t, other=0).to(tl.int64)
        within = tok % BLOCK_SIZE
        m_i, l_i, acc = _attend_tile(
            q, k_ptr, v_ptr, block, within, mask_t, kv_head,
            stride_kn, stride_kt, stride_kh, stride_vn, stride_vt, stride_vh, scale, m_i, l_i, acc, HEAD_DIM,
        )
    _store_partial(part_ptr, lse_ptr, m_i, l_i, acc, b, heads, mask_g, split, NUM_SPLITS, NUM_Q_HEADS, HEAD_DIM)


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, out_ptr, stride_ob, stride_oh, NUM_Q_HEADS: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    b = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    base = (b * NUM_Q_HEADS + head) * NUM_SPLITS
    lse = tl.load(lse_ptr + base + offs_s)
    top = tl.max(lse, 0)
    weight = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - top))
    weight = weight / tl.sum(weight, 0)
    parts = tl.load(part_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :])
    out = tl.sum(parts * weight[:, None], 0)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


def num_splits_for(batch: int, num_kv_heads: int, max_seq_len: int, block_t: int, num_sms: int) -> int:
    """Splits per (request, KV head): about four programs per SM, a power of two in [1, 64]."""
    want = max(1, math.ceil(4 * num_sms / max(1, batch * num_kv_heads)))
    want = min(want, max(1, math.ceil(max_seq_len / block_t)), 64)
    return 1 << (want - 1).bit_length()


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float | None = None,
    block_t: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention; same contract as `ucm.sparse.attention.paged_decode_attention` plus ``max_seq_len``
    (a host bound on seq_lens, used to size the split grid without a device sync). Every seq_len must be >= 1."""
    batch, num_q_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if query.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("head_dim must be contiguous in query and caches")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if num_splits is None:
        cuda = query.device.type == "cuda"  # CPU tensors: Triton's interpreter (tests)
        sms = torch.cuda.get_device_properties(query.device).multi_processor_count if cuda else 4
        num_splits = num_splits_for(batch, num_kv_heads, max_seq_len, block_t, sms)
    part = torch.empty(batch * num_q_heads * num_splits, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(batch * num_q_heads * num_splits, dtype=torch.float32, device=query.device)
    block_g = max(16, triton.next_power_of_2(group))
    _split_kernel[(batch, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_table, seq_lens, part, lse,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0),
        scale,
        BLOCK_SIZE=block_size, GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_T=block_t,
        NUM_SPLITS=num_splits, NUM_Q_HEADS=num_q_heads, num_warps=num_warps, num_stages=num_stages,
    )
    out = torch.empty_like(query)
    _merge_kernel[(batch, num_q_heads)](
        part, lse, out, out.stride(0), out.stride(1), NUM_Q_HEADS=num_q_heads, NUM_SPLITS=num_splits,
        HEAD_DIM=head_dim, num_warps=1,
    )
    return out
