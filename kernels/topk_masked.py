"""Masked top-k: per row of a score matrix the k best eligible indices, in ascending order, in one launch.

Called by `CudaBackend.topk_masked` / `select_blocks` (semantics: `ucm.device.reference.topk_masked`). One program
per row finds the k-th largest score exactly by a bitwise search on order-preserving integer keys, two bits
per pass (a radix select; no sort), then writes the selected indices in index order with a prefix sum, so the
result is already ascending. Ties at the threshold are taken lowest index first. Rows up to `_MAX_SINGLE`
entries stay in registers; longer rows are streamed in chunks.
"""

from __future__ import annotations

import torch

from ucm.errors import UcmConfigError

from ._indices import to_device_async, to_device_int64
from ._triton import tl, triton

_MAX_SINGLE = 16384  # widest row kept in registers by one program (its counts fit the 16-bit fields below)
_CHUNK = 4096  # chunk of a longer row


def _num_warps(chunk: int) -> int:
    return max(4, min(16, chunk // 256))


@triton.jit
def _row_keys(row, stride_w, excl_row, stride_ew, idx, limit, HAS_EXCL: tl.constexpr):
    """Order-preserving int32 keys of float scores and the eligibility mask of entries idx."""
    eligible = idx < limit
    if HAS_EXCL:
        eligible = eligible & (tl.load(excl_row + idx * stride_ew, mask=eligible, other=1) == 0)
    vals = tl.load(row + idx * stride_w, mask=eligible, other=0.0).to(tl.float32)
    bits = vals.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF), eligible  # negative floats: flip the magnitude bits


@triton.jit
def _count_at_least(key, eligible, threshold):
    return tl.sum((eligible & (key >= threshold.to(tl.int32))).to(tl.int32), axis=0)


@triton.jit(do_not_specialize=["width", "out_width", "k_value"])
def _topk_masked_kernel(
    scores,
    stride_sb,
    stride_sw,
    width,
    k_rows,
    k_value,
    lengths,
    excl,
    stride_eb,
    stride_ew,
    out,
    stride_ob,
    out_width,
    counts,
    HAS_K_ROWS: tl.constexpr,
    LENGTHS: tl.constexpr,  # 0: none, 1: lengths[b], 2: offsets (cu_blocks): lengths[b + 1] - lengths[b]
    HAS_EXCL: tl.constexpr,
    SINGLE: tl.constexpr,
    CHUNK: tl.constexpr,
):
    b = tl.program_id(0)
    row = scores + b * stride_sb
    excl_row = excl + b * stride_eb
    out_row = out + b * stride_ob
    limit = tl.zeros([], tl.int64) + width
    if LENGTHS == 1:
        limit = tl.minimum(tl.load(lengths + b).to(tl.int64), limit)
    if LENGTHS == 2:
        limit = tl.minimum(tl.load(lengths + b + 1).to(tl.int64) - tl.load(lengths + b).to(tl.int64), limit)
    if HAS_K_ROWS:
        k = tl.maximum(tl.load(k_rows + b).to(tl.int64), 0)
    else:
        k = tl.maximum(tl.zeros([], tl.int64) + k_value, 0)
    offs = tl.arange(0, CHUNK)
    # The threshold is the largest t with at least `count` eligible keys >= t (the k-th largest key), decided
    # from the top bit down; thresholds are int64 scalars holding int32 key values.
    prefix = tl.zeros([], tl.int64) - 2147483647 - 1
    if SINGLE:
        key, eligible = _row_keys(row, stride_sw, excl_row, stride_ew, offs, limit, HAS_EXCL)
        count = tl.minimum(k, tl.sum(eligible.to(tl.int64), axis=0))
        for p in tl.static_range(16):  # two bits per pass: three counts packed in 16-bit fields, one reduction
            step = tl.full([], 1, tl.int64) << (30 - 2 * p)
            c1, c2, c3 = prefix + step, prefix + 2 * step, prefix + 3 * step
            packed = (
                (eligible & (key >= c1.to(tl.int32))).to(tl.int64)
                + ((eligible & (key >= c2.to(tl.int32))).to(tl.int64) << 16)
                + ((eligible & (key >= c3.to(tl.int32))).to(tl.int64) << 32)
            )
            hits = tl.sum(packed, axis=0)
            prefix = tl.where(
                ((hits >> 32) & 0xFFFF) >= count,
                c3,
                tl.where(((hits >> 16) & 0xFFFF) >= count, c2, tl.where((hits & 0xFFFF) >= count, c1, prefix)),
            )
        threshold = prefix.to(tl.int32)
        above = eligible & (key > threshold)
        ties = eligible & (key == threshold)
        need = count - tl.sum(above.to(tl.int64), axis=0)
        tie_rank = tl.cumsum(ties.to(tl.int32), axis=0) - 1
        selected = above | (ties & (tie_rank < need))
        pos = tl.cumsum(selected.to(tl.int32), axis=0) - 1
        tl.store(out_row + pos, offs.to(tl.int64), mask=selected)
        tl.store(out_row + offs, tl.full([CHUNK], -1, tl.int64), mask=(offs >= count) & (offs < out_width))
    else:
        total = tl.zeros([], tl.int64)
        for start in range(0, width, CHUNK):
            _, eligible = _row_keys(row, stride_sw, excl_row, stride_ew, start + offs, limit, HAS_EXCL)
            total += tl.sum(eligible.to(tl.int64), axis=0)
        count = tl.minimum(k, total)
        for p in range(32):  # one bit per pass: each count is a pass over the row
            cand = prefix + (tl.full([], 1, tl.int64) << (31 - p))
            hits = tl.zeros([], tl.int64)
            for start in range(0, width, CHUNK):
                key, eligible = _row_keys(row, stride_sw, excl_row, stride_ew, start + offs, limit, HAS_EXCL)
                hits += _count_at_least(key, eligible, cand)
            prefix = tl.where(hits >= count, cand, prefix)
        threshold = prefix.to(tl.int32)
        above_total = tl.zeros([], tl.int64)
        for start in range(0, width, CHUNK):
            key, eligible = _row_keys(row, stride_sw, excl_row, stride_ew, start + offs, limit, HAS_EXCL)
            above_total += tl.sum((eligible & (key > threshold)).to(tl.int64), axis=0)
        need = count - above_total
        written = tl.zeros([], tl.int64)
        ties_seen = tl.zeros([], tl.int64)
        for start in range(0, width, CHUNK):
            idx = start + offs
            key, eligible = _row_keys(row, stride_sw, excl_row, stride_ew, idx, limit, HAS_EXCL)
            above = eligible & (key > threshold)
            ties = eligible & (key == threshold)
            tie_rank = ties_seen + tl.cumsum(ties.to(tl.int32), axis=0) - 1
            selected = above | (ties & (tie_rank < need))
            pos = written + tl.cumsum(selected.to(tl.int32), axis=0) - 1
            tl.store(out_row + pos, idx.to(tl.int64), mask=selected)
            written += tl.sum(selected.to(tl.int64), axis=0)
            ties_seen += tl.sum(ties.to(tl.int64), axis=0)
        for start in range(0, out_width, CHUNK):
            idx = start + offs
            tl.store(out_row + idx, tl.full([CHUNK], -1, tl.int64), mask=(idx >= count) & (idx < out_width))
    tl.store(counts + b, count)


def _host_counts(
    batch: int, width: int, k: int | torch.Tensor, lengths: torch.Tensor | None, exclude: torch.Tensor | None
) -> torch.Tensor | None:
    """counts = min(k, eligible) computed on the host when every input is there (no synchronization)."""
    on_host = [t.device.type == "cpu" for t in (k, lengths, exclude) if isinstance(t, torch.Tensor)]
    if not all(on_host):
        return None
    eligible = torch.full((batch,), width, dtype=torch.int64)
    if lengths is not None:
        eligible = lengths.to(torch.int64).clamp(0, width)
    if exclude is not None:
        inside = torch.arange(width)[None, :] < eligible[:, None]
        eligible = eligible - (exclude.expand(batch, width) & inside).sum(1)
    k_rows = torch.as_tensor(k, dtype=torch.int64).expand(batch).clamp(min=0)
    return torch.minimum(k_rows, eligible)


def topk_masked(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    lengths: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
    *,
    cu_device: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices [B, K] ascending, -1 padded, counts [B])`` (see `reference.topk_masked`).

    When k, lengths and exclude are host tensors (or None / an int), the output width is computed on the host
    and the call never synchronizes; otherwise reading K = max(counts) does. `cu_device` (optional): the
    offsets whose differences are `lengths`, already on the device (saves a copy when scoring made them).
    """
    if scores.dim() != 2:
        raise UcmConfigError("scores shape", tuple(scores.shape), "[batch, width]")
    batch, width = scores.shape
    device = scores.device
    if lengths is not None and lengths.numel() != batch:
        raise UcmConfigError("lengths", f"{lengths.numel()} entries", f"one per row ({batch})")
    if isinstance(k, torch.Tensor) and k.numel() not in (1, batch):
        raise UcmConfigError("k", f"{k.numel()} entries", f"an int or one per row ({batch})")
    if exclude is not None:
        if exclude.dtype != torch.bool or exclude.dim() != 2 or exclude.shape[1] != width:
            raise UcmConfigError("exclude", f"{exclude.dtype} {tuple(exclude.shape)}", f"bool [{batch}, {width}]")
        exclude = exclude.expand(batch, width)
    host_counts = _host_counts(batch, width, k, lengths, exclude)
    if host_counts is not None:
        out_width = int(host_counts.max()) if batch else 0
    elif isinstance(k, int):
        out_width = max(0, min(k, width))
    else:
        out_width = width
    out = torch.empty(batch, out_width, dtype=torch.int64, device=device)
    counts = torch.empty(batch, dtype=torch.int64, device=device)
    if batch == 0:
        return out, counts
    k_rows = k.reshape(-1).expand(batch) if isinstance(k, torch.Tensor) else []
    length_src = [] if lengths is None or cu_device is not None else lengths
    k_dev, len_dev = to_device_int64([k_rows, length_src], device)
    if cu_device is not None and lengths is not None:
        len_dev, lengths_mode = cu_device, 2
    else:
        lengths_mode = 0 if lengths is None else 1
    excl = to_device_async(exclude, device).view(torch.uint8) if exclude is not None else counts
    single = width <= _MAX_SINGLE
    chunk = triton.next_power_of_2(max(width, 1)) if single else _CHUNK
    _topk_masked_kernel[(batch,)](
        scores,
        *scores.stride(),
        width,
        k_dev,
        k if isinstance(k, int) else 0,
        len_dev,
        excl,
        excl.stride(0) if exclude is not None else 0,
        excl.stride(1) if exclude is not None else 0,
        out,
        out.stride(0),
        out_width,
        counts,
        HAS_K_ROWS=isinstance(k, torch.Tensor),
        LENGTHS=lengths_mode,
        HAS_EXCL=exclude is not None,
        SINGLE=single,
        CHUNK=chunk,
        num_warps=_num_warps(chunk),
    )
    if host_counts is None:
        out = out[:, : int(counts.max())]
    return out, counts
