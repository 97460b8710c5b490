"""Host-to-device block loads on the GPU's copy engines: the CUDA driver's batched memcpy (``cuMemcpyBatchAsync``,
CUDA 12.8 drivers and later), one driver call for every (block, page tensor) piece of a load.

Where a layer's page tensors are evenly spaced in device memory (vLLM's FLASH_ATTN cache: K and V are the two
halves of one allocation), a block's pages are one 2D copy instead (``cuMemcpy3DBatchAsync``, same drivers): the
source row holds them back to back, the destination one pitch apart. The driver's host time goes per copy, so this
halves it for a (k, v) layer; ``pitched=False`` (the CUDA backend's default ``UCM_DMA_COPY_SHAPE=1d``) keeps one copy
per page.

Why: the copy kernel (`ucm.kernels.block_copy`) reads pinned host memory from SMs and holds them for as long as
PCIe takes, so a load that runs beside the engine's forward (ESA's loads ahead) slows that forward. The copy
engines move the same bytes without SMs; one call takes the whole list of pieces (a ``cudaMemcpyAsync`` per piece
would cost a few microseconds of host time each).

The driver entry point is resolved once (`driver.entry_point`); without it `unavailable_reason` says why and the
backend keeps its copy kernel.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence

import numpy as np
import torch
from ucm.backends.cuda import driver

from ucm.device import reference
from ucm.errors import UcmConfigError

_log = logging.getLogger(__name__)
_ABI_VERSION = 12080  # the cuMemcpyBatchAsync ABI asked for: CUDA 12.8's, with its failIdx argument
#: CUmemcpySrcAccessOrder by name: "stream" reads the source in stream order; "any" lets the driver read it at any
#: time after the call (valid for a source nothing writes while the copy is pending: UcmDram's pinned rows)
SOURCE_ORDERS = {"stream": 1, "any": 3}
_FLAG_PREFER_OVERLAP = 1  # CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE: keep the copy off the SMs


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint), ("id", ctypes.c_int)]


class _CopyAttributes(ctypes.Structure):
    _fields_ = [
        ("src_access_order", ctypes.c_uint),
        ("src_loc_hint", _MemLocation),
        ("dst_loc_hint", _MemLocation),
        ("flags", ctypes.c_uint),
    ]


_BATCH_FN = ctypes.CFUNCTYPE(
    ctypes.c_int,  # CUresult
    ctypes.c_void_p,  # dsts
    ctypes.c_void_p,  # srcs
    ctypes.c_void_p,  # sizes
    ctypes.c_size_t,  # count
    ctypes.c_void_p,  # attrs
    ctypes.c_void_p,  # attrsIdxs
    ctypes.c_size_t,  # numAttrs
    ctypes.c_void_p,  # failIdx
    ctypes.c_void_p,  # stream
)

_BATCH_3D_FN = ctypes.CFUNCTYPE(
    ctypes.c_int,  # CUresult
    ctypes.c_size_t,  # numOps
    ctypes.c_void_p,  # opList
    ctypes.c_void_p,  # failIdx
    ctypes.c_ulonglong,  # flags (must be 0)
    ctypes.c_void_p,  # stream
)

#: CUDA_MEMCPY3D_BATCH_OP (112 bytes): the fields set here at their offsets; the rest stay zero (location hints,
#: layer heights: depth 1). Both operands are pointers (type 1); for pointer-to-pointer copies an element is a byte.
OP_DTYPE = np.dtype({
    "names": ["src_type", "src_ptr", "src_row", "dst_type", "dst_ptr", "dst_row", "width", "height", "depth",
              "src_access_order", "flags"],
    "formats": ["<u4", "<u8", "<u8", "<u4", "<u8", "<u8", "<u8", "<u8", "<u8", "<u4", "<u4"],
    "offsets": [0, 8, 16, 40, 48, 56, 80, 88, 96, 104, 108],
    "itemsize": 112,
})
_OPERAND_POINTER = 1
#: the largest row pitch given to a 2D copy (CUDA's 2D copies take pitches up to the device's maximum pitch, 2 GiB
#: on the GPUs we know): pages further apart go as 1D copies
MAX_PITCH = 2**31 - 1

_resolved: tuple[object | None, str | None] | None = None
_resolved_3d: tuple[object | None, str | None] | None = None
#: of `calls`, those of 2D copies
pitched_calls = 0
#: set when the driver refused a 2D copy: later loads go one copy per page (the reason, logged once)
pitched_refused: str | None = None
#: driver calls queued so far in this process (tests and benchmarks check which path a load took)
calls = 0
#: copies per driver call. The call costs host time per copy (on an H100, 10240 copies took 8.4 ms to queue,
#: bench/results/copy_overlap.md) and the copy engines may only start once it returns: a large load goes in calls
#: of this size, so the first ones move while the host queues the next
MAX_COPIES_PER_CALL = 2048


def _resolve() -> tuple[object | None, str | None]:
    global _resolved
    if _resolved is None:
        fn, reason = driver.entry_point("cuMemcpyBatchAsync", _ABI_VERSION, _BATCH_FN)
        _resolved = (fn, None if fn is not None else f"{reason}: a CUDA 12.8+ driver has it")
    return _resolved


def _resolve_3d() -> object | None:
    global _resolved_3d
    if _resolved_3d is None:
        _resolved_3d = driver.entry_point("cuMemcpy3DBatchAsync", _ABI_VERSION, _BATCH_3D_FN)
    return _resolved_3d[0]


def unavailable_reason() -> str | None:
    """None when the driver has the batched memcpy, else why not."""
    if not torch.cuda.is_available():
        return "torch reports no CUDA device"
    return _resolve()[1]


def _host_int64(t: torch.Tensor | None, name: str) -> np.ndarray | None:
    if t is None:
        return None
    if t.device.type != "cpu":
        raise UcmConfigError(f"{name} device", str(t.device), "host (cpu) indices for a copy-engine load")
    return t.reshape(-1).to(torch.int64).numpy()


def descriptors(
    src: torch.Tensor, pages: Sequence[torch.Tensor], ids: np.ndarray, rows: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (destination address, source address, bytes) of every piece of a `scatter_many` job: page tensor by
    page tensor, block by block; row ``rows[i]`` (default i) of ``src`` holds block ``ids[i]``'s pages concatenated
    in order. Pure address arithmetic on the tensors' pointers (tested on the host against the reference copy)."""
    n = ids.size
    row_starts = _addresses(src, rows if rows is not None else np.arange(n))
    dsts, srcs, sizes = [], [], []
    offset = 0
    for page in pages:
        nbytes = reference.page_nbytes(page)
        dsts.append(_addresses(page, ids))
        srcs.append(row_starts + np.uint64(offset))
        sizes.append(np.full(n, nbytes, dtype=np.uint64))
        offset += nbytes
    return tuple(np.ascontiguousarray(np.concatenate(a)) for a in (dsts, srcs, sizes))


def _addresses(t: torch.Tensor, index: np.ndarray) -> np.ndarray:
    """The address of entry ``index[i]`` along dim 0 of ``t`` (a block's page, a buffer's row)."""
    return np.uint64(t.data_ptr()) + index.astype(np.uint64) * np.uint64(t.stride(0) * t.element_size())


def page_pitch(pages: Sequence[torch.Tensor]) -> int | None:
    """The distance in bytes between consecutive page tensors when they are evenly spaced views of one layout (same
    page size and block stride, page i at the first's address + i * pitch, pages not overlapping): a block's pages
    are then one 2D copy. None otherwise (one page tensor, or unequal ones)."""
    if len(pages) < 2:
        return None
    nbytes = reference.page_nbytes(pages[0])
    stride = pages[0].stride(0) * pages[0].element_size()
    pitch = pages[1].data_ptr() - pages[0].data_ptr()
    if not nbytes <= pitch <= MAX_PITCH:
        return None
    for i, page in enumerate(pages):
        if (reference.page_nbytes(page) != nbytes or page.stride(0) * page.element_size() != stride
                or page.data_ptr() != pages[0].data_ptr() + i * pitch):
            return None
    return pitch


def pitched_ops(
    src: torch.Tensor, pages: Sequence[torch.Tensor], ids: np.ndarray, rows: np.ndarray | None, pitch: int,
    source_order: int, flags: int,
) -> np.ndarray:
    """The 2D copy of every block of a `scatter_many` job whose pages are ``pitch`` bytes apart (`page_pitch`):
    ``len(pages)`` rows of one page each, packed in the source row, ``pitch`` apart in the destination."""
    n = ids.size
    nbytes = reference.page_nbytes(pages[0])
    ops = np.zeros(n, dtype=OP_DTYPE)
    ops["src_type"] = ops["dst_type"] = _OPERAND_POINTER
    ops["src_ptr"] = _addresses(src, rows if rows is not None else np.arange(n))
    ops["src_row"] = nbytes
    ops["dst_ptr"] = _addresses(pages[0], ids)
    ops["dst_row"] = pitch
    ops["width"], ops["height"], ops["depth"] = nbytes, len(pages), 1
    ops["src_access_order"], ops["flags"] = source_order, flags
    return ops


def scatter_many(
    jobs: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor], torch.Tensor, torch.Tensor | None]], background: bool,
    source_order: str = "stream", pitched: bool = False,
) -> None:
    """Queue, for each (src, pages, block_ids, rows) job (e.g. every layer's load of a step), ``block block_ids[i]
    of every page tensor = row rows[i] of src`` (rows default 0..n-1) on the current stream of the pages' device:
    ``src`` pinned host memory, the ids and rows host tensors; calls of at most `MAX_COPIES_PER_CALL` copies.
    ``background``: ask the driver to keep the copies off the SMs (they overlap the engine's kernels);
    ``source_order``: a key of `SOURCE_ORDERS`; ``pitched``: a block's evenly spaced pages in one 2D copy where
    every job's pages are (`page_pitch`). Every job is checked before anything is queued."""
    if source_order not in SOURCE_ORDERS:
        raise UcmConfigError("source_order", source_order, sorted(SOURCE_ORDERS))
    fn, reason = _resolve()
    if fn is None:
        raise RuntimeError(reason)
    checked = [(job, _job_ids(*job)) for job in jobs]
    checked = [(job, ids) for job, ids in checked if ids is not None]
    if not checked:
        return
    stream = ctypes.c_void_p(torch.cuda.current_stream(jobs[0][1][0].device).cuda_stream)
    flags = _FLAG_PREFER_OVERLAP if background else 0
    if pitched and pitched_refused is None and _resolve_3d() is not None:
        pitches = [page_pitch(job[1]) for job, _ in checked]
        if all(p is not None for p in pitches):
            ops = [pitched_ops(job[0], job[1], ids, rows, pitch, SOURCE_ORDERS[source_order], flags)
                   for (job, (ids, rows)), pitch in zip(checked, pitches, strict=True)]
            if _queue_pitched(np.concatenate(ops) if len(ops) > 1 else ops[0], len(checked[0][0][1]), stream):
                return
    pieces = [descriptors(job[0], job[1], ids, rows) for job, (ids, rows) in checked]
    dst_all, src_all, size_all = (np.ascontiguousarray(np.concatenate(a)) if len(pieces) > 1 else a[0]
                                  for a in zip(*pieces, strict=True))
    attrs = _CopyAttributes(src_access_order=SOURCE_ORDERS[source_order], flags=flags)
    attr_index, fail_index = ctypes.c_size_t(0), ctypes.c_size_t(0)
    global calls
    for start in range(0, dst_all.size, MAX_COPIES_PER_CALL):
        end = min(start + MAX_COPIES_PER_CALL, dst_all.size)
        # the driver reads the descriptor arrays during the call: they need not outlive it
        err = fn(dst_all[start:].ctypes.data, src_all[start:].ctypes.data, size_all[start:].ctypes.data, end - start,
                 ctypes.addressof(attrs), ctypes.byref(attr_index), 1, ctypes.byref(fail_index), stream)
        calls += 1
        if err != 0:
            raise RuntimeError(
                f"cuMemcpyBatchAsync failed: CUresult {err} at copy {start + fail_index.value} of {dst_all.size}")


def _queue_pitched(ops: np.ndarray, pages: int, stream: ctypes.c_void_p) -> bool:
    """Queue 2D copies in calls of about `MAX_COPIES_PER_CALL` pages. False when the driver refused one: 2D copies
    are then off for the process and the caller queues the whole load as 1D copies (whatever part of it went
    already is written again with the same bytes)."""
    global calls, pitched_calls, pitched_refused
    fn = _resolve_3d()
    per_call = max(1, MAX_COPIES_PER_CALL // pages)
    fail_index = ctypes.c_size_t(0)
    for start in range(0, ops.size, per_call):
        end = min(start + per_call, ops.size)
        err = fn(end - start, ops[start:].ctypes.data, ctypes.byref(fail_index), 0, stream)
        if err != 0:
            pitched_refused = (f"cuMemcpy3DBatchAsync refused a 2D block copy: CUresult {err} at copy "
                               f"{start + fail_index.value} of {ops.size}")
            _log.warning("%s; loads go one copy per page from now on", pitched_refused)
            return False
        calls += 1
        pitched_calls += 1
    return True


def _job_ids(
    src: torch.Tensor, pages: Sequence[torch.Tensor], block_ids: torch.Tensor, rows: torch.Tensor | None
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """One job's (block ids, source rows) as host arrays after its checks (None: nothing to copy)."""
    ids = _host_int64(block_ids, "block_ids")
    src_rows = _host_int64(rows, "rows")
    n = ids.size
    if src_rows is not None and src_rows.size != n:
        raise UcmConfigError("rows", f"{src_rows.size} entries", f"one row per block id ({n})")
    min_rows = n if src_rows is None else (int(src_rows.max()) + 1 if n else 0)
    reference.check_block_buffer(src, pages, min_rows, "scatter_blocks src")
    if not src.is_pinned():
        raise UcmConfigError("scatter_blocks src", "pageable host memory", "pinned host memory for a copy-engine load")
    if not n:
        return None
    limit = min(p.shape[0] for p in pages)
    if int(ids.min()) < 0 or int(ids.max()) >= limit:
        raise UcmConfigError("block_ids", f"range [{int(ids.min())}, {int(ids.max())}]", f"ids in [0, {limit})")
    if src_rows is not None and int(src_rows.min()) < 0:
        raise UcmConfigError("rows", f"minimum {int(src_rows.min())}", "rows >= 0")
    return ids, src_rows
