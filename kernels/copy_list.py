"""A list of copies (destination address, source address, bytes) in one launch: what the driver's batched memcpy
does on the copy engines, done by a few programs instead.

Why: the driver's batched memcpy costs host time per copy (a layer block is two copies, K and V), and ESA's loads
ahead at 32K x 8 are thousands of copies per step: the largest item of a host-bound step's profile
(bench/results/gpu_runs/profiles/esa-ahead-32Kx8-h200-9d14908.txt). Here the host's cost is filling a table and
one launch, whatever the number of copies. The programs read the source (pinned host memory) and the table itself
over PCIe (zero-copy): the table stays in the pinned buffer the caller gives, which must not change until the
launch's work is done (the caller records an event after it).

Addresses are unified (UVA) and expressed as word offsets from one anchor tensor (pointers made from raw ints lose
their alignment); the word is the widest, up to 8 bytes, that divides every address and size.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from ucm.errors import UcmConfigError

from ._triton import cdiv, tl, triton
from .block_copy import _CHUNK_BYTES, _MAX_CHUNK_PROGRAMS, _NUM_WARPS, _anchor


@triton.jit(do_not_specialize=["table", "num_copies"])
def _copy_list_kernel(
    table_anchor,  # int64 pointer the table's offset is expressed from
    # the table's first entry, in int64 words from table_anchor: [num_copies, 3] (dst, src, words). Typed int64 by
    # hand: Triton types an unannotated int by its value (i32 below 2**31, do_not_specialize or not), and the
    # distance from the pinned table to the device anchor can cross that between the warm-up's small buffers and
    # a large KV cache, so decode would compile a second variant (vLLM's JIT monitor saw one on an H100)
    table: tl.int64,
    anchor,  # word pointer every copy's addresses are expressed from
    num_copies,
    VEC: tl.constexpr,  # every offset and size is a multiple of VEC words
    CHUNK: tl.constexpr,
):
    offsets = tl.arange(0, CHUNK)
    for c in range(tl.program_id(0), num_copies, tl.num_programs(0)):
        entry = table_anchor + table + c * 3
        dst = anchor + tl.multiple_of(tl.load(entry), VEC)
        src = anchor + tl.multiple_of(tl.load(entry + 1), VEC)
        words = tl.multiple_of(tl.load(entry + 2), VEC)
        for start in range(tl.program_id(1).to(tl.int64) * CHUNK, words, tl.num_programs(1) * CHUNK):
            idx = start + offsets
            mask = idx < words
            tl.store(dst + idx, tl.load(src + idx, mask=mask), mask=mask)


def table_entries(count: int) -> int:
    """int64 entries a table for ``count`` copies takes (`copy_list`'s ``table`` needs at least this many)."""
    return 3 * count


def copy_list(
    base: torch.Tensor, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, table: torch.Tensor,
    *, max_programs: int | None = None,
) -> None:
    """Queue ``copy sizes[i] bytes from address srcs[i] to dsts[i]`` for every i on the current stream of
    ``base``'s device, one launch. ``base``: a tensor on the device the kernel runs on (the anchor); ``dsts`` /
    ``srcs`` / ``sizes``: uint64 arrays of unified addresses and byte counts (e.g.
    `ucm.backends.cuda.batch_dma.copy_list_of`); ``table``: a contiguous int64 host tensor, pinned where the
    device is a GPU, of at least `table_entries` entries, filled here and read by the kernel: the caller keeps it
    unchanged until this launch's work is done. ``max_programs``: at most this many programs along the copy axis
    (a load beside the engine's kernels takes a few SMs)."""
    n = int(dsts.size)
    if not (srcs.size == sizes.size == n):
        raise UcmConfigError("copy list", f"{n} / {srcs.size} / {sizes.size} entries", "as many sources and "
                             "sizes as destinations")
    if table.dtype != torch.int64 or not table.is_contiguous() or table.numel() < table_entries(n):
        raise UcmConfigError("copy list table", f"{table.dtype}, {table.numel()} entries",
                             f"a contiguous int64 tensor of >= {table_entries(n)} entries")
    if base.device.type != "cpu" and not table.is_pinned():
        raise UcmConfigError("copy list table", "pageable host memory", "pinned host memory (the kernel reads it)")
    if n == 0:
        return
    # the widest alignment shared by every address and size and by base (the data's anchor): 8-byte words,
    # 16-byte vectors; the table's anchor is base's first byte rounded down to 8 (`_anchor`; allocations are
    # aligned to more)
    align = math.gcd(16, base.data_ptr(), np.bitwise_or.reduce(np.concatenate([dsts, srcs, sizes])).item())
    word = min(align, 8)
    table_anchor, anchor = _anchor(base, 8), _anchor(base, word)
    if table.data_ptr() % 8:
        raise UcmConfigError("copy list table", f"address {table.data_ptr():#x}", "an 8-byte aligned tensor")
    entries = table[: table_entries(n)].numpy().reshape(n, 3)
    entries[:, 0] = (dsts.astype(np.int64) - anchor.data_ptr()) // word
    entries[:, 1] = (srcs.astype(np.int64) - anchor.data_ptr()) // word
    entries[:, 2] = sizes.astype(np.int64) // word
    chunk = _CHUNK_BYTES // word
    grid = (n if max_programs is None else max(1, min(n, max_programs)),
            min(cdiv(int(sizes.max()) // word, chunk), _MAX_CHUNK_PROGRAMS) or 1)
    with torch.cuda.device(base.device) if base.device.type == "cuda" else contextlib.nullcontext():
        _copy_list_kernel[grid](
            table_anchor, (table.data_ptr() - table_anchor.data_ptr()) // 8, anchor, n,
            VEC=align // word, CHUNK=chunk, num_warps=_NUM_WARPS,
        )
