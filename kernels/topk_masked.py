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
from ._keys import key_bin, score_key
from ._triton import next_pow2, tl, triton

_MAX_SINGLE = 16384  # widest row kept in registers by one program (its counts fit the 16-bit fields below)
_CHUNK = 4096  # chunk of a longer row


_CAP = 128  # most keys of the threshold's bin ranked against each other; more: the bitwise search


def histogram_bits(width: int) -> int:
    """Key-bin bits of the scoring histogram for rows of `width` (about one bin per entry); 0: no histogram."""
    if not 0 < width <= _MAX_SINGLE:
        return 0
    return min(13, max(11, (width - 1).bit_length()))


def _num_warps(chunk: int) -> int:
    return max(4, min(16, chunk // 256))


@triton.jit
def _row_keys(row, stride_w, excl_row, stride_ew, idx, limit, HAS_EXCL: tl.constexpr):
    """Order-preserving int32 keys of float scores and the eligibility mask of entries idx."""
    eligible = idx < limit
    if HAS_EXCL:
        eligible = eligible & (tl.load(excl_row + idx * stride_ew, mask=eligible, other=1) == 0)
    vals = tl.load(row + idx * stride_w, mask=eligible, other=0.0).to(tl.float32)
    return score_key(vals), eligible


@triton.jit
def _count_at_least(key, eligible, threshold):
    return tl.sum((eligible & (key >= threshold.to(tl.int32))).to(tl.int32), axis=0)


@triton.jit
def _search_select(key, eligible, count):
    """The `count` largest eligible keys (ties: lowest index first) by a bitwise search for the threshold.

    The threshold is the largest t with at least `count` eligible keys >= t, decided two bits per pass from the
    top: three counts packed in 16-bit fields (rows up to `_MAX_SINGLE` entries), one reduction per pass.
    """
    prefix = tl.zeros([], tl.int64) - 2147483647 - 1
    for p in tl.static_range(16):
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
    return above | (ties & (tie_rank < need))


# sizes and row strides vary from call to call: specialized, each new value class would compile another variant
# inside an engine's decode steps (Triton specializes ints on == 1 and % 16)
@triton.jit(do_not_specialize=["width", "out_width", "k_value", "stride_sb", "stride_eb", "stride_ob"])
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
    hist,  # int32 [B, 2**HIST_BITS]: key-bin counts of the eligible entries (from the scoring kernel)
    stride_hb,
    scratch,  # int32 [2, B, CAP]: the threshold bin's keys, then whether each is taken
    HIST_BITS: tl.constexpr,
    CAP: tl.constexpr,
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
    if SINGLE:
        key, eligible = _row_keys(row, stride_sw, excl_row, stride_ew, offs, limit, HAS_EXCL)
        count = tl.minimum(k, tl.sum(eligible.to(tl.int64), axis=0))
        if HIST_BITS > 0:
            # The histogram names the bin holding the count-th largest key; every key of a higher bin is taken,
            # and the few keys of that bin are ranked against each other (no bitwise search over the row).
            bins = tl.arange(0, 1 << HIST_BITS)
            h = tl.load(hist + b * stride_hb + bins)
            at_least = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h  # keys in this bin or higher
            top_bin = tl.max(tl.where(at_least >= count, bins, -1), axis=0)
            need = count - tl.sum(tl.where(bins > top_bin, h, 0), axis=0)
            in_bin = tl.sum(tl.where(bins == top_bin, h, 0), axis=0)
            if in_bin <= CAP:
                kbin = key_bin(key, HIST_BITS)
                member = eligible & (kbin == top_bin)
                slot = tl.cumsum(member.to(tl.int32), axis=0) - 1
                keys_at = scratch + b * CAP
                taken_at = scratch + (tl.num_programs(0) + b) * CAP
                tl.store(keys_at + slot, key, mask=member)
                tl.debug_barrier()
                c = tl.arange(0, CAP)
                valid = c < in_bin
                ck = tl.load(keys_at + c, mask=valid, other=0)
                beats = (ck[None, :] > ck[:, None]) | ((ck[None, :] == ck[:, None]) & (c[None, :] < c[:, None]))
                rank = tl.sum((beats & valid[None, :]).to(tl.int32), axis=1)
                tl.store(taken_at + c, (valid & (rank < need)).to(tl.int32))
                tl.debug_barrier()
                taken = tl.load(taken_at + slot, mask=member, other=0)
                selected = (eligible & (kbin > top_bin)) | (member & (taken != 0))
            else:
                selected = _search_select(key, eligible, count)
        else:
            selected = _search_select(key, eligible, count)
        pos = tl.cumsum(selected.to(tl.int32), axis=0) - 1
        tl.store(out_row + pos, offs.to(tl.int64), mask=selected)
        tl.store(out_row + offs, tl.full([CHUNK], -1, tl.int64), mask=(offs >= count) & (offs < out_width))
    else:
        total = tl.zeros([], tl.int64)
        for start in range(0, width, CHUNK):
            _, eligible = _row_keys(row, stride_sw, excl_row, stride_ew, start + offs, limit, HAS_EXCL)
            total += tl.sum(eligible.to(tl.int64), axis=0)
        count = tl.minimum(k, total)
        # As `_search_select`, one bit per pass: each count is a pass over the row.
        prefix = tl.zeros([], tl.int64) - 2147483647 - 1
        for p in range(32):
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
) -> list[int] | None:
    """counts = min(k, eligible) computed on the host when every input is there (no synchronization)."""
    on_host = [t.device.type == "cpu" for t in (k, lengths, exclude) if isinstance(t, torch.Tensor)]
    if not all(on_host):
        return None
    eligible = [width] * batch if lengths is None else [min(max(n, 0), width) for n in lengths.tolist()]
    if exclude is not None:
        inside = torch.arange(width)[None, :] < torch.tensor(eligible)[:, None]
        excluded = (exclude.expand(batch, width) & inside).sum(1).tolist()
        eligible = [e - x for e, x in zip(eligible, excluded, strict=True)]
    k_rows = [k] * batch if isinstance(k, int) else torch.as_tensor(k).expand(batch).tolist()
    return [min(max(kr, 0), e) for kr, e in zip(k_rows, eligible, strict=True)]


def topk_masked(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    lengths: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
    *,
    cu_device: torch.Tensor | None = None,
    histogram: torch.Tensor | None = None,
    exclude_device: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices [B, K] ascending, -1 padded, counts [B])`` (see `reference.topk_masked`).

    When k, lengths and exclude are host tensors (or None / an int), the output width is computed on the host
    and the call never synchronizes; otherwise reading K = max(counts) does. Optional, from `block_scores` in
    the same selection: `cu_device`, the offsets whose differences are `lengths`, already on the device;
    `histogram`, the key-bin counts of the eligible scores (rows up to `_MAX_SINGLE` wide); `exclude_device`,
    `exclude` already on the device.
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
        out_width = max(host_counts) if batch else 0
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
    if exclude is not None:
        excl = (exclude_device if exclude_device is not None else to_device_async(exclude, device)).view(torch.uint8)
    else:
        excl = counts
    single = width <= _MAX_SINGLE
    use_hist = histogram is not None and single
    scratch = torch.empty(2 * batch * _CAP if use_hist else 1, dtype=torch.int32, device=device)
    chunk = next_pow2(max(width, 1)) if single else _CHUNK
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
        histogram if use_hist else scratch,
        histogram.stride(0) if use_hist else 0,
        scratch,
        HIST_BITS=histogram.shape[1].bit_length() - 1 if use_hist else 0,
        CAP=_CAP,
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
