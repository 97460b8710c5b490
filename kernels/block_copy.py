"""Batched block copy: one Triton launch moves a list of blocks of every page tensor to or from a block buffer.

Called by `CudaBackend._gather` / `_scatter` (semantics: `ucm.device.reference.gather_blocks` / `scatter_blocks`).
Every page tensor and the buffer are addressed through a small table of raw addresses, so one launch covers all
layers, K and V. Addresses are unified (UVA): the buffer may be device memory or pinned host memory, in which
case the kernel reads/writes host memory directly over PCIe (zero-copy, no staging buffer, no per-block DMA).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

from ucm.device.reference import check_block_buffer, page_nbytes
from ucm.errors import UcmConfigError

from ._indices import to_device_int64
from ._triton import cdiv, tl, triton

_CHUNK_BYTES = 8192  # bytes one program moves per step: enough loads in flight to hide PCIe latency
_NUM_WARPS = 4
_MAX_CHUNK_PROGRAMS = 65535  # grid limit of axis 1
_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


# the buffer offset, its row width and the job counts vary from call to call: not specialized, so one variant per
# direction and layout serves every call (alignment is given by VEC)
@triton.jit(do_not_specialize=["buf", "buf_row_words", "num_pages", "num_jobs"])
def _copy_blocks_kernel(
    anchor,  # word pointer every address is expressed from (word offsets; pointers made from raw ints lose alignment)
    desc,  # int64 [num_pages, 5] in words from anchor: page tensor, block stride, page words, row offset; num blocks
    ids,  # int64 [n] block ids
    rows,  # int64 [n] buffer rows (only read when HAS_ROWS)
    buf,  # buffer row 0, in words from anchor
    buf_row_words,
    num_pages,
    num_jobs,
    HAS_ROWS: tl.constexpr,
    TO_BUFFER: tl.constexpr,
    VEC: tl.constexpr,  # every offset and size is a multiple of VEC words: lets loads/stores be 16 bytes wide
    CHUNK: tl.constexpr,
):
    # jobs are (block, page tensor) pairs; a program takes every num_programs(0)-th (one each on a full grid)
    for job in range(tl.program_id(0), num_jobs, tl.num_programs(0)):
        i = job // num_pages
        p = job % num_pages
        block = tl.load(ids + i)
        if HAS_ROWS:
            row = tl.load(rows + i)
        else:
            row = i.to(tl.int64)
        page_base = tl.load(desc + p * 5)
        block_stride = tl.load(desc + p * 5 + 1)
        words = tl.multiple_of(tl.load(desc + p * 5 + 2), VEC)
        row_offset = tl.load(desc + p * 5 + 3)
        num_blocks = tl.load(desc + p * 5 + 4)
        # Device-resident ids are not checked on the host (that would synchronize): out-of-range ids copy nothing.
        if (block >= 0) & (block < num_blocks):
            page = anchor + tl.multiple_of(page_base + block * block_stride, VEC)
            row_ptr = anchor + tl.multiple_of(buf + row * buf_row_words + row_offset, VEC)
            offsets = tl.arange(0, CHUNK)
            for start in range(tl.program_id(1).to(tl.int64) * CHUNK, words, tl.num_programs(1) * CHUNK):
                idx = start + offsets
                mask = idx < words
                if TO_BUFFER:
                    tl.store(row_ptr + idx, tl.load(page + idx, mask=mask), mask=mask)
                else:
                    tl.store(page + idx, tl.load(row_ptr + idx, mask=mask), mask=mask)


def _anchor(t: torch.Tensor, word: int) -> torch.Tensor:
    """A one-word tensor aliasing the first byte of `t`: the base pointer the kernel offsets from."""
    dtype = _WORD_DTYPES[word]
    anchor = torch.empty(0, dtype=dtype, device=t.device)
    anchor.set_(t.untyped_storage(), t.storage_offset() * t.element_size() // word, (1,), (1,))
    return anchor


def _check_ids(block_ids: torch.Tensor, rows: torch.Tensor | None, pages: Sequence[torch.Tensor], buf_rows: int):
    """Bounds checks that need no synchronization (host tensors); returns the buffer rows the call needs."""
    if block_ids.dim() != 1:
        raise UcmConfigError("block_ids shape", tuple(block_ids.shape), "a 1-D tensor of block ids")
    n = block_ids.numel()
    if block_ids.device.type == "cpu" and n:
        lo, hi = int(block_ids.min()), int(block_ids.max())
        limit = min(p.shape[0] for p in pages)
        if lo < 0 or hi >= limit:
            raise UcmConfigError("block_ids", f"range [{lo}, {hi}]", f"ids in [0, {limit})")
    if rows is None:
        return n
    if rows.numel() != n:
        raise UcmConfigError("rows", f"{rows.numel()} entries", f"one row per block id ({n})")
    if not n:
        return 0
    if rows.device.type != "cpu":
        rows = rows.cpu()  # a bound check on the buffer cannot be skipped: a bad row would corrupt memory
    lo, hi = int(rows.min()), int(rows.max())
    if lo < 0:
        raise UcmConfigError("rows", f"range [{lo}, {hi}]", f"rows in [0, {buf_rows})")
    return hi + 1


def copy_blocks(
    pages: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    buf: torch.Tensor,
    rows: torch.Tensor | None = None,
    *,
    to_buffer: bool,
    max_programs: int | None = None,
) -> None:
    """Gather (``to_buffer``) ``buf[rows[i]] = block block_ids[i] of every page tensor`` or scatter it back.

    All page tensors must live on one device; ``buf`` (uint8 ``[rows, bytes_per_block]``) on that device or in
    pinned host memory. Queued on the current stream of the pages' device. ``max_programs``: at most this many
    programs along the (block, page) axis, each looping over its share: a copy that runs beside the engine's
    kernels on a few SMs instead of flooding every SM with programs that wait on PCIe.
    """
    if not pages:
        raise UcmConfigError("page tensors", "an empty list", "at least one page tensor")
    device = pages[0].device
    if any(p.device != device for p in pages):
        raise UcmConfigError("page tensor devices", sorted({str(p.device) for p in pages}), "one device")
    name = "gather_blocks out" if to_buffer else "scatter_blocks src"
    min_rows = _check_ids(block_ids, rows, pages, buf.shape[0] if buf.dim() == 2 else 0)
    width = check_block_buffer(buf, pages, min_rows, name)
    if buf.device != device and not (device.type != "cpu" and buf.device.type == "cpu" and buf.is_pinned()):
        raise UcmConfigError(f"{name} device", str(buf.device), f"{device} or pinned host memory")
    n = block_ids.numel()
    if n == 0 or width == 0:
        return

    table: list[list[int]] = []
    offset = 0
    for page in pages:
        nbytes = page_nbytes(page)
        table.append([page.data_ptr(), page.stride(0) * page.element_size(), nbytes, offset, page.shape[0]])
        offset += nbytes
    buf_row_bytes = buf.stride(0) * buf.element_size() if buf.shape[0] > 1 else width
    # The widest alignment shared by every address, stride, size and offset: 8-byte words, 16-byte vectors.
    base = pages[0].data_ptr()
    align = math.gcd(16, buf.data_ptr(), buf_row_bytes, *(v for entry in table for v in entry[:4]))
    word = min(align, 8)
    for entry in table:
        entry[0] = (entry[0] - base) // word
        entry[1:4] = [v // word for v in entry[1:4]]
    desc, ids, row_ids = to_device_int64(
        [[v for entry in table for v in entry], block_ids, rows if rows is not None else []], device
    )
    chunk = _CHUNK_BYTES // word
    max_words = max(entry[2] for entry in table)
    jobs = n * len(pages)
    grid = (jobs if max_programs is None else max(1, min(jobs, max_programs)),
            min(cdiv(max_words, chunk), _MAX_CHUNK_PROGRAMS))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _copy_blocks_kernel[grid](
            _anchor(pages[0], word),
            desc,
            ids,
            row_ids if rows is not None else ids,
            (buf.data_ptr() - base) // word,
            buf_row_bytes // word,
            len(pages),
            jobs,
            HAS_ROWS=rows is not None,
            TO_BUFFER=to_buffer,
            VEC=align // word,
            CHUNK=chunk,
            num_warps=_NUM_WARPS,
        )

