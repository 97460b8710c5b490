"""Plain-PyTorch reference of every block primitive of the device layer.

These functions are the ground truth of the backend-parity suite and the implementation used by backends that
have no faster kernel (CPU; NPU, where torch ops run on the device). They only use torch ops, so they run on
whatever device the tensors live on.

Conventions shared by all backends (see `ucm.device.backend.Backend` for the full contract):
- a *page tensor* holds one page per block along dim 0; a block's page (``t[i]``) must be contiguous.
  A layer's KV cache is one page tensor, or a (k, v) tuple of two.
- a *block buffer* is a uint8 tensor ``[n, bytes_per_block]``: row i holds block i's pages of every page
  tensor, concatenated in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ucm.device.selection import BlockSelection
from ucm.errors import UcmConfigError


def as_page_tensors(cache: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Flatten a layer cache (a tensor or a (k, v) tuple) or a list of them into page tensors."""
    if isinstance(cache, torch.Tensor):
        return [cache]
    pages: list[torch.Tensor] = []
    for item in cache:
        pages.extend(as_page_tensors(item))
    return pages


def page_nbytes(page: torch.Tensor) -> int:
    """Bytes of one block's page in a page tensor; raises when a page is not contiguous."""
    if page.dim() < 1:
        raise UcmConfigError("page tensor shape", tuple(page.shape), "at least one dimension (blocks along dim 0)")
    inner = page.shape[1:]
    expected = 1
    for size, stride in zip(reversed(inner), reversed(page.stride()[1:]), strict=True):
        if size != 1 and stride != expected:
            raise UcmConfigError(
                "page tensor strides", tuple(page.stride()), "each block's page contiguous (blocks along dim 0)"
            )
        expected *= size
    return expected * page.element_size()


def bytes_per_block(pages: Sequence[torch.Tensor]) -> int:
    """Row width of a block buffer for these page tensors."""
    return sum(page_nbytes(p) for p in pages)


def check_block_buffer(buf: torch.Tensor, pages: Sequence[torch.Tensor], min_rows: int, name: str) -> int:
    """Validate a block buffer for these page tensors; returns its row width (bytes per block)."""
    width = bytes_per_block(pages)
    if buf.dtype != torch.uint8 or buf.dim() != 2 or buf.shape[0] < min_rows or buf.shape[1] != width:
        raise UcmConfigError(
            name, f"{buf.dtype} {tuple(buf.shape)}", f"a torch.uint8 tensor of shape [>= {min_rows}, {width}]"
        )
    if buf.stride(1) != 1:
        raise UcmConfigError(f"{name} strides", tuple(buf.stride()), "contiguous rows (stride 1 along dim 1)")
    return width


def _min_rows(block_ids: torch.Tensor, rows: torch.Tensor | None) -> int:
    if rows is None:
        return block_ids.numel()
    if rows.numel() != block_ids.numel():
        raise UcmConfigError("rows", f"{rows.numel()} entries", f"one row per block id ({block_ids.numel()})")
    return int(rows.max()) + 1 if rows.numel() else 0


def gather_blocks(
    pages: Sequence[torch.Tensor], block_ids: torch.Tensor, out: torch.Tensor, rows: torch.Tensor | None = None
) -> None:
    """out[rows[i]] = bytes of block ``block_ids[i]`` of every page tensor, concatenated (rows default 0..n-1)."""
    n = block_ids.numel()
    check_block_buffer(out, pages, _min_rows(block_ids, rows), "gather_blocks out")
    offset = 0
    for page in pages:
        nbytes = page_nbytes(page)
        if n:
            data = page.index_select(0, block_ids.to(page.device)).reshape(n, -1).view(torch.uint8)
            if rows is None:
                out[:n, offset : offset + nbytes].copy_(data, non_blocking=True)
            else:
                out[:, offset : offset + nbytes].index_copy_(0, rows.to(out.device), data.to(out.device))
        offset += nbytes


def scatter_blocks(
    src: torch.Tensor, pages: Sequence[torch.Tensor], block_ids: torch.Tensor, rows: torch.Tensor | None = None
) -> None:
    """Block ``block_ids[i]`` of every page tensor = row ``rows[i]`` of ``src`` (block ids must be distinct)."""
    n = block_ids.numel()
    check_block_buffer(src, pages, _min_rows(block_ids, rows), "scatter_blocks src")
    offset = 0
    for page in pages:
        nbytes = page_nbytes(page)
        if n:
            cols = src[:, offset : offset + nbytes]  # select this page's columns only, not whole rows per page
            chunk = cols[:n] if rows is None else cols.index_select(0, rows.to(src.device))
            data = chunk.to(page.device, non_blocking=True).contiguous()
            page.index_copy_(0, block_ids.to(page.device), data.view(page.dtype).view(n, *page.shape[1:]))
        offset += nbytes


def move_blocks(pages: Sequence[torch.Tensor], src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """Block ``dst_ids[i]`` of every page tensor = block ``src_ids[i]`` of the same page tensor (the two id sets
    disjoint, ``dst_ids`` distinct)."""
    if src_ids.numel() != dst_ids.numel():
        raise UcmConfigError("move_blocks dst_ids", tuple(dst_ids.shape), f"as many ids as src_ids ({src_ids.numel()})")
    if not src_ids.numel():
        return
    for page in pages:
        src, dst = src_ids.to(page.device), dst_ids.to(page.device)
        page.index_copy_(0, dst, page.index_select(0, src))


def topk_masked(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    lengths: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the indices of the ``k`` highest scores among its eligible entries.

    Entry j of row b is eligible when ``j < lengths[b]`` and not ``exclude[b, j]``. Returns ``(indices, counts)``:
    ``indices`` is int64 ``[B, K]`` with K = max(counts), each row's selection in ascending index order and padded
    with -1; ``counts[b] = min(k_b, eligible_b)`` (k larger than the row returns the whole row, k = 0 nothing).
    """
    batch, width = scores.shape
    device = scores.device
    eligible = torch.ones(batch, width, dtype=torch.bool, device=device)
    if lengths is not None:
        eligible &= torch.arange(width, device=device)[None, :] < lengths.to(device)[:, None]
    if exclude is not None:
        eligible &= ~exclude.to(device)
    k_rows = torch.as_tensor(k, dtype=torch.int64, device=device).expand(batch).clamp(min=0)
    counts = torch.minimum(k_rows, eligible.sum(1))
    top_k = int(counts.max()) if batch else 0
    if top_k == 0:
        return torch.empty(batch, 0, dtype=torch.int64, device=device), counts
    masked = scores.float().masked_fill(~eligible, float("-inf"))
    top = masked.topk(top_k, dim=1).indices
    keep = torch.arange(top_k, device=device)[None, :] < counts[:, None]
    top = torch.where(keep, top, torch.full_like(top, width)).sort(dim=1).values
    return top.masked_fill(top == width, -1), counts


def block_means(
    k_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of K over each listed block's valid tokens, per KV head, accumulated in float32.

    ``k_cache`` is ``[num_blocks, block_size, num_kv_heads, head_dim]`` with any strides (permute other layouts
    into this view). ``num_tokens[i]`` (default: block_size) is how many leading tokens of block i are valid.
    Returns float32 ``[n, num_kv_heads, head_dim]``; a block with 0 valid tokens has a zero mean.
    """
    block_size = k_cache.shape[1]
    keys = k_cache.index_select(0, block_ids.to(k_cache.device)).float()
    if num_tokens is None:
        return keys.mean(1)
    num_tokens = num_tokens.to(k_cache.device)
    valid = torch.arange(block_size, device=k_cache.device)[None, :] < num_tokens[:, None]
    total = (keys * valid[:, :, None, None]).sum(1)
    return total / num_tokens.clamp(min=1).to(torch.float32)[:, None, None]


def block_scores(query: torch.Tensor, reps: torch.Tensor, cu_blocks: torch.Tensor) -> torch.Tensor:
    """Score of every candidate block of every request for the current decode query.

    ``query`` ``[B, num_q_heads, head_dim]``; ``reps`` float32 ``[N, num_kv_heads, head_dim]`` packs the block
    representations of all requests, request b owning rows ``cu_blocks[b]:cu_blocks[b+1]``. Query head h reads KV
    head ``h // (num_q_heads // num_kv_heads)`` (vLLM's GQA order). The score of a block sums q·rep over the query
    heads of each KV group and over the groups, because one block table (so one selection) serves all heads.
    Returns float32 ``[B, max_blocks]``, padded with -inf.
    """
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads = reps.shape[1]
    if num_q_heads % num_kv_heads:
        raise UcmConfigError("num_q_heads", num_q_heads, f"a multiple of num_kv_heads={num_kv_heads}")
    cu_blocks = cu_blocks.to(reps.device, torch.int64)
    counts = cu_blocks[1:] - cu_blocks[:-1]
    width = int(counts.max()) if batch else 0
    out = torch.full((batch, width), float("-inf"), dtype=torch.float32, device=reps.device)
    if reps.shape[0] == 0:
        return out
    grouped = query.float().reshape(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim).sum(2)
    owner = torch.repeat_interleave(torch.arange(batch, device=reps.device), counts)
    scores = (grouped.to(reps.device)[owner] * reps[: owner.numel()].float()).sum((1, 2))
    out[owner, torch.arange(owner.numel(), device=reps.device) - cu_blocks[owner]] = scores
    return out


def sparse_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    selection: BlockSelection,
    scale: float | None = None,
) -> torch.Tensor:
    """Decode attention of each request over its sparse selection of a paged cache (float32 softmax).

    Request b attends to its logical blocks ``[0, sink_end)``, ``sink_end + selected[b, :counts[b]]`` (candidate
    indices as `topk_masked` returns them), then ``[local_start[b], ceil(seq_lens[b] / block_size))``, mapped to
    physical blocks by ``block_table[b]`` (all fields of ``selection``, see `BlockSelection`); the last block holds
    the partial tail. ``query`` ``[B, num_q_heads, head_dim]``, caches ``[num_blocks, block_size, num_kv_heads,
    head_dim]``; query head h reads KV head ``h // (num_q_heads // num_kv_heads)``. Returns ``[B, num_q_heads,
    head_dim]`` in the query dtype. Reads the selection on the host (synchronizes); ``max_seq_len`` is unused.
    """
    selection.check_query(query)
    batch, num_q_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_q_heads % num_kv_heads:
        raise UcmConfigError("num_q_heads", num_q_heads, f"a multiple of num_kv_heads={num_kv_heads}")
    scale = head_dim**-0.5 if scale is None else scale
    sink_end = selection.sink_end
    block_table, seq_lens, selected = selection.block_table, selection.seq_lens, selection.selected
    counts, local_start = selection.counts, selection.local_start
    out = torch.empty_like(query)
    for b in range(batch):
        seq_len, count, local = int(seq_lens[b]), int(counts[b]), int(local_start[b])
        total = -(-seq_len // block_size)
        if not sink_end <= local < total:
            raise UcmConfigError("local_start", local, f"in [sink_end={sink_end}, {total}) for request {b}")
        logical = torch.cat([torch.arange(sink_end), sink_end + selected[b, :count].cpu().long(),
                             torch.arange(local, total)])
        pages = block_table[b].cpu().long()[logical].to(k_cache.device)
        kept = len(logical) * block_size - (total * block_size - seq_len)
        keys = k_cache[pages].reshape(-1, num_kv_heads, head_dim)[:kept].float()
        values = v_cache[pages].reshape(-1, num_kv_heads, head_dim)[:kept].float()
        group = num_q_heads // num_kv_heads
        logits = torch.einsum("hd,thd->ht", query[b].float(), keys.repeat_interleave(group, 1)) * scale
        probs = logits.softmax(-1)
        out[b] = torch.einsum("ht,thd->hd", probs, values.repeat_interleave(group, 1)).to(query.dtype)
    return out
