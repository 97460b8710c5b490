"""Synthetic paged KV caches and decode queries shared by the sparse tests and the ESA benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ucm.device import Backend
from ucm.sparse.budget import window_layout
from ucm.sparse.config import EsaConfig


@dataclass
class PagedCase:
    """A batch of decode requests over one paged cache (block tables point at shuffled physical blocks)."""

    query: torch.Tensor  # [B, num_q_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_table: torch.Tensor  # int32 [B, width]
    seq_lens: torch.Tensor  # int32 [B]
    block_size: int
    needles: list[list[int]]  # per request: logical blocks planted to match the query


def make_case(
    seq_lens: list[int],
    block_size: int = 16,
    num_q_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    needles_per_request: int = 0,
    needle_lo: int = 1,
    structured: bool = False,
    topic_scale: float = 1.5,
    query_topics: int = 1,
    seed: int = 0,
) -> PagedCase:
    """Random K/V/query. ``needles_per_request`` blocks at random logical positions >= needle_lo get keys
    aligned with the request's query (the attention's heavy hitters). ``structured``: keys drift slowly with
    the position (a topic every 4 blocks, weight ``topic_scale``) and the query mixes ``query_topics`` topics, so
    the attention mass is concentrated, as in real text."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(seq_lens)
    blocks_per = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per) + 1  # block 0 stays unused, like an engine's null block
    width = max(blocks_per)
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1
    table = torch.zeros(batch, width, dtype=torch.int32)
    start = 0
    for b, n in enumerate(blocks_per):
        table[b, :n] = perm[start : start + n].to(torch.int32)
        start += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen)
    v_cache = torch.randn(shape, generator=gen)
    query = torch.randn(batch, num_q_heads, head_dim, generator=gen)
    group = num_q_heads // num_kv_heads
    if structured:
        topics = torch.randn(max(seq_lens) // (4 * block_size) + 2, num_kv_heads, head_dim, generator=gen)
        for b in range(batch):
            pages = table[b, : blocks_per[b]].long()
            for pos, page in enumerate(pages.tolist()):
                k_cache[page] = 0.5 * k_cache[page] + topic_scale * topics[pos // 4]
            chosen = torch.randint(len(topics), (query_topics,), generator=gen)
            mix = topics[chosen].sum(0)
            query[b] = 0.5 * query[b] + topic_scale * mix.repeat_interleave(group, 0)
    needles: list[list[int]] = []
    for b in range(batch):
        hi = blocks_per[b]
        choices = torch.randperm(max(hi - needle_lo, 0), generator=gen)[:needles_per_request] + needle_lo
        needles.append(sorted(choices.tolist()))
        grouped = query[b].reshape(num_kv_heads, group, head_dim).mean(1)
        direction = grouped / grouped.norm(dim=-1, keepdim=True)
        for pos in needles[b]:
            page = int(table[b, pos])
            k_cache[page] = 0.3 * k_cache[page] + 16.0 * direction[None]
    return PagedCase(
        query.to(device, dtype), k_cache.to(device, dtype), v_cache.to(device, dtype), table.to(device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device), block_size, needles,
    )


def candidate_reps(
    backend: Backend, case: PagedCase, config: EsaConfig
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, list[int]]:
    """Per request the block means of its candidate range (the prompt = all but the last token, as after
    prefill), packed. Returns (reps, cu_blocks, sink_end, local_start, k per request)."""
    reps, cu, local, ks = [], [0], [], []
    sink_end = 0
    for b, seq_len in enumerate(case.seq_lens.tolist()):
        layout = window_layout(seq_len - 1, case.block_size, config)
        sink_end = layout.sink_end
        ids = case.block_table[b, layout.sink_end : layout.local_start].long()
        reps.append(backend.block_means(case.k_cache, ids).to(case.k_cache.dtype))
        cu.append(cu[-1] + ids.numel())
        local.append(layout.local_start)
        ks.append(layout.num_work)
    device = case.k_cache.device
    return (
        torch.cat(reps), torch.tensor(cu, dtype=torch.int64, device=device), sink_end,
        torch.tensor(local, dtype=torch.int64, device=device), ks,
    )
