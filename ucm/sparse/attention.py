"""Plain-PyTorch decode attention over a paged KV cache: the reference sparse attention is checked against.

In an engine the attention itself is the engine's (a sparse algorithm only hands it another block table and
sequence lengths); this reference is what the sparse tests, the ESA recall benchmark and the GPU parity checks
compare with, on any device.
"""

from __future__ import annotations

import math

import torch


def gather_tokens(cache: torch.Tensor, block_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` tokens addressed by one block-table row: ``[seq_len, num_kv_heads, head_dim]``.

    ``cache`` is ``[num_blocks, block_size, num_kv_heads, head_dim]`` (any strides)."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    pages = cache.index_select(0, block_row[:num_blocks].to(cache.device, torch.int64))
    return pages.reshape(num_blocks * block_size, *cache.shape[2:])[:seq_len]


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode token per request attending to the tokens its block-table row lists (float32 softmax).

    ``query`` ``[B, num_q_heads, head_dim]``; caches ``[num_blocks, block_size, num_kv_heads, head_dim]``;
    ``block_table`` ``[B, width]`` (row b: physical blocks in token order, the first ceil(seq_lens[b] / block_size)
    read); query head h reads KV head ``h // (num_q_heads // num_kv_heads)``. Returns ``[B, num_q_heads,
    head_dim]`` in the query dtype.
    """
    batch, num_q_heads, head_dim = query.shape
    group = num_q_heads // k_cache.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty_like(query)
    for b, seq_len in enumerate(seq_lens.tolist()):
        keys = gather_tokens(k_cache, block_table[b], seq_len).float().repeat_interleave(group, dim=1)
        values = gather_tokens(v_cache, block_table[b], seq_len).float().repeat_interleave(group, dim=1)
        logits = torch.einsum("hd,thd->ht", query[b].float(), keys) * scale
        out[b] = torch.einsum("ht,thd->hd", logits.softmax(-1), values).to(query.dtype)
    return out


def attention_mass(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    block_row: torch.Tensor,
    seq_len: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense softmax mass of each logical block of one request, summed over query heads / num_q_heads.

    ``query`` ``[num_q_heads, head_dim]``. Returns float32 ``[num_blocks]`` summing to 1 (recall metric)."""
    num_q_heads, head_dim = query.shape
    group = num_q_heads // k_cache.shape[2]
    block_size = k_cache.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    keys = gather_tokens(k_cache, block_row, seq_len).float().repeat_interleave(group, dim=1)
    probs = (torch.einsum("hd,thd->ht", query.float(), keys) * scale).softmax(-1).mean(0)
    num_blocks = -(-seq_len // block_size)
    padded = torch.zeros(num_blocks * block_size, dtype=torch.float32, device=probs.device)
    padded[:seq_len] = probs
    return padded.view(num_blocks, block_size).sum(1)
