"""One batched ESA decode step in resident mode, entirely on the device (no host round trip).

Two forms of the same step (scoring + top-k, then the kept blocks: sink blocks, selected blocks, then local
window + generated blocks, the partial last block last):
- `esa_decode_attention`: the attention reads the top-k output and the engine's block table directly
  (`Backend.sparse_decode_attention` over a `BlockSelection`, one fused kernel on CUDA); the step when the
  attention is ours (tests, benchmark `bench/esa_step.py`).
- `esa_sparse_tables`: materializes the sparse block table and sequence lengths, for an engine attention that
  only takes a table. The per-request worker pipeline (`ucm.sparse.esa.esa`) applies the same layout rule.
"""

from __future__ import annotations

import torch

from ucm.device import Backend, BlockSelection
from ucm.sparse.esa.retriever import select_blocks


def sparse_block_tables(
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selected: torch.Tensor,
    counts: torch.Tensor,
    sink_end: int,
    local_start: torch.Tensor,
    block_size: int,
    max_tail: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse rows = [0, sink_end) + (sink_end + selected[b, :counts[b]]) + [local_start[b], ceil(len / bs)).

    ``selected`` int64 ``[B, K]`` candidate indices (ascending, -1 padded, as `topk_masked` returns). Returns the
    int32 table ``[B, sink_end + K + max tail]`` (physical ids; padding repeats entry 0 and is never read) and
    the int32 sequence lengths (tokens in the kept blocks). ``max_tail``: a host bound on the blocks from
    local_start on (saves a device sync, e.g. inside a CUDA graph).
    """
    device = block_table.device
    seq_lens = seq_lens.to(device, torch.int64)
    counts = counts.to(device, torch.int64)
    local_start = local_start.to(device, torch.int64)
    total = (seq_lens + block_size - 1) // block_size
    tail = total - local_start
    width_k = selected.shape[1]
    if max_tail is None:
        max_tail = int(tail.max()) if seq_lens.numel() else 0
    width = sink_end + width_k + max_tail
    j = torch.arange(width, device=device)[None, :]
    if width_k:
        index = (j - sink_end).clamp(0, width_k - 1).expand(selected.shape[0], -1)
        picked = selected.to(device).gather(1, index) + sink_end
    else:
        picked = torch.zeros_like(j)
    after = local_start[:, None] + (j - sink_end - counts[:, None])
    pos = torch.where(j < sink_end, j, torch.where(j < sink_end + counts[:, None], picked, after))
    kept = sink_end + counts + tail
    pos = torch.where(j < kept[:, None], pos, torch.zeros_like(pos)).expand(block_table.shape[0], -1)
    table = block_table.gather(1, pos).to(torch.int32)
    lens = (kept - 1) * block_size + seq_lens - (total - 1) * block_size
    return table, lens.to(torch.int32)


def esa_sparse_tables(
    backend: Backend,
    query: torch.Tensor,
    reps: torch.Tensor,
    cu_blocks: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sink_end: int,
    local_start: torch.Tensor,
    k: int | torch.Tensor,
    block_size: int,
    max_tail: int | None = None,
    parts: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scoring + top-k (`Backend.select_blocks`) + `sparse_block_tables` for a batch of decode queries.

    ``reps`` packs request b's candidate representations in rows ``cu_blocks[b]:cu_blocks[b+1]`` (candidate c of
    request b is logical block ``sink_end + c``; ``parts`` rows per block, see `retriever.select_blocks`). Returns
    (table, lens, selected, counts)."""
    selected, counts = select_blocks(backend, query, reps, cu_blocks, k, parts)
    table, lens = sparse_block_tables(
        block_table, seq_lens, selected, counts, sink_end, local_start, block_size, max_tail
    )
    return table, lens, selected, counts


def esa_decode_attention(
    backend: Backend,
    query: torch.Tensor,
    reps: torch.Tensor,
    cu_blocks: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sink_end: int,
    local_start: torch.Tensor,
    k: int | torch.Tensor,
    max_seq_len: int | None = None,
    parts: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scoring + top-k (`Backend.select_blocks`) + attention over the kept blocks, no table in between.

    Same inputs as `esa_sparse_tables` plus the caches (``[num_blocks, block_size, num_kv_heads, head_dim]``);
    ``max_seq_len``: a host bound on the kept tokens. The attention reads a `BlockSelection` of the top-k output
    and the engine's table (``block_table``, ``selected`` and ``counts`` on the query's device; ``seq_lens`` and
    ``local_start`` are moved there). Returns (attention output, selected, counts); the output equals paged
    attention over `esa_sparse_tables`' table and lengths."""
    selected, counts = select_blocks(backend, query, reps, cu_blocks, k, parts)
    selection = BlockSelection(
        block_table, seq_lens.to(query.device), selected, counts, sink_end, local_start.to(query.device), max_seq_len
    )
    return backend.sparse_decode_attention(query, k_cache, v_cache, selection), selected, counts
