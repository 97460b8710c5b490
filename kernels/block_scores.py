"""Block scoring: the GQA-reduced score q·rep of every candidate block of every request, in one launch.

Called by `CudaBackend.block_scores` / `select_blocks` in decode (semantics: `ucm.device.reference.block_scores`).
A program scores BLOCK_N consecutive blocks of one request: it sums the query heads of each KV group once,
then reads the blocks' float32 representations as one tile (the only large read: a memory-bound matrix-vector
product; the tile is sized so short contexts still spread over every SM).
"""

from __future__ import annotations

import torch

from ucm.errors import UcmConfigError

from ._indices import to_device_int64
from ._keys import key_bin, score_key
from ._triton import cdiv, next_pow2, tl, triton

_TILE = 8192  # elements of one program's representation tile: BLOCK_N blocks x all KV heads x head dim


# sizes and row strides vary from call to call (see topk_masked: no variant per value class)
@triton.jit(do_not_specialize=["width", "stride_ob", "stride_eb"])
def _block_scores_kernel(
    query,
    stride_qb,
    stride_qh,
    stride_qd,
    reps,
    stride_rn,
    stride_rh,
    stride_rd,
    cu_blocks,
    out,
    stride_ob,
    width,
    head_dim,
    hist,  # int32 [B, 2**HIST_BITS], zeroed: counts of the eligible scores' key bins (only when HIST_BITS > 0)
    stride_hb,
    excl,  # uint8 [B, width]: excluded entries (only when HAS_EXCL)
    stride_eb,
    stride_ew,
    HIST_BITS: tl.constexpr,
    HAS_EXCL: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    first = tl.program_id(1) * BLOCK_N
    start = tl.load(cu_blocks + b)
    count = tl.load(cu_blocks + b + 1) - start
    j = first + tl.arange(0, BLOCK_N)
    block_mask = j < count
    # One flat axis over (KV head, dim), so a block's whole representation is one row of the tile.
    hd = tl.arange(0, BLOCK_H * BLOCK_D)
    head = hd // BLOCK_D
    dim = hd % BLOCK_D
    hd_mask = (head < NUM_KV_HEADS) & (dim < head_dim)
    score = tl.zeros([BLOCK_N], dtype=tl.float32)
    if first < count:
        q = tl.zeros([BLOCK_H * BLOCK_D], dtype=tl.float32)
        for g in tl.static_range(GROUP):  # sum the query heads of each KV group
            q_ptrs = query + b * stride_qb + (head * GROUP + g) * stride_qh + dim * stride_qd
            q += tl.load(q_ptrs, mask=hd_mask, other=0.0).to(tl.float32)
        rows = (start + j).to(tl.int64)
        r_ptrs = reps + rows[:, None] * stride_rn + (head * stride_rh + dim * stride_rd)[None, :]
        r = tl.load(r_ptrs, mask=block_mask[:, None] & hd_mask[None, :], other=0.0).to(tl.float32)
        score = tl.sum(r * q[None, :], axis=1)
        if HIST_BITS > 0:  # the top-k kernel finds the threshold's bin from this histogram instead of the row
            eligible = block_mask
            if HAS_EXCL:
                eligible = eligible & (tl.load(excl + b * stride_eb + j * stride_ew, mask=block_mask, other=1) == 0)
            bins = key_bin(score_key(score), HIST_BITS)
            tl.atomic_add(hist + b * stride_hb + bins, tl.full([BLOCK_N], 1, tl.int32), mask=eligible, sem="relaxed")
    score = tl.where(block_mask, score, float("-inf"))
    tl.store(out + b * stride_ob + j, score, mask=j < width)


def block_scores(
    query: torch.Tensor,
    reps: torch.Tensor,
    cu_blocks: torch.Tensor,
    *,
    cu_device: torch.Tensor | None = None,
    histogram: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 ``[B, max_blocks]`` scores padded with -inf (see `reference.block_scores`).

    With `cu_blocks` on the host the launch needs no synchronization; on the device, reading the width does.
    `cu_device` (optional): `cu_blocks` already copied to the device, int64. `histogram` (optional, for
    `topk_masked`): a zeroed int32 ``[B, 2**bits]`` device tensor that receives the key-bin counts of every
    eligible score (in range and not in `exclude`, a bool ``[B, max_blocks]`` device tensor).
    """
    if query.dim() != 3 or reps.dim() != 3:
        raise UcmConfigError(
            "query/reps shapes",
            (tuple(query.shape), tuple(reps.shape)),
            "[B, num_q_heads, head_dim] and [N, num_kv_heads, head_dim]",
        )
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads = reps.shape[1]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise UcmConfigError("num_q_heads", num_q_heads, f"a multiple of num_kv_heads={num_kv_heads}")
    if reps.shape[2] != head_dim:
        raise UcmConfigError("reps head_dim", reps.shape[2], f"the query head_dim {head_dim}")
    if cu_blocks.numel() != batch + 1:
        raise UcmConfigError("cu_blocks", f"{cu_blocks.numel()} entries", f"batch + 1 = {batch + 1}")
    device = reps.device
    if cu_blocks.device.type == "cpu":  # plain ints: a handful of offsets, cheaper than tensor ops
        offsets = cu_blocks.tolist()
        counts = [hi - lo for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)]
        if batch and (min(counts) < 0 or offsets[0] < 0 or offsets[-1] > reps.shape[0]):
            raise UcmConfigError("cu_blocks", offsets, f"non-decreasing offsets in [0, {reps.shape[0]}]")
        width = max(counts) if batch else 0
    else:
        width = int((cu_blocks[1:] - cu_blocks[:-1]).max()) if batch else 0
    out = torch.empty(batch, width, dtype=torch.float32, device=device)
    if batch == 0 or width == 0:
        return out
    (cu,) = to_device_int64([cu_device if cu_device is not None else cu_blocks], device)
    query = query.to(device)
    block_h, block_d = next_pow2(num_kv_heads), next_pow2(head_dim)
    block_n = max(1, min(16, _TILE // (block_h * block_d)))
    grid = (batch, cdiv(width, block_n))
    hist_bits = histogram.shape[1].bit_length() - 1 if histogram is not None else 0
    excl = exclude.expand(batch, width).view(torch.uint8) if exclude is not None else out
    _block_scores_kernel[grid](
        query,
        *query.stride(),
        reps,
        *reps.stride(),
        cu,
        out,
        out.stride(0),
        width,
        head_dim,
        histogram if histogram is not None else out,
        histogram.stride(0) if histogram is not None else 0,
        excl,
        excl.stride(0) if exclude is not None else 0,
        excl.stride(1) if exclude is not None else 0,
        HIST_BITS=hist_bits,
        HAS_EXCL=exclude is not None and histogram is not None,
        NUM_KV_HEADS=num_kv_heads,
        GROUP=num_q_heads // num_kv_heads,
        BLOCK_N=block_n,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out
