"""Host-to-device block loads on the GPU's copy engines: the CUDA driver's batched memcpy (``cuMemcpyBatchAsync``,
CUDA 12.8 drivers and later), one driver call for every (block, page tensor) piece of a load.

One copy per page, not one 2D copy per block for a layer whose K and V are the halves of one allocation
(``cuMemcpy3DBatchAsync``): measured on an H200, the 2D copies took 5x the host time to queue and moved a third
of the bytes per second (bench/results/gpu_runs/copy_overlap_2d_h200_9d14908.md, made at the last tree that had
them).

Why: the copy kernel (`ucm.kernels.block_copy`) reads pinned host memory from SMs and holds them for as long as
PCIe takes, so a load that runs beside the engine's forward (ESA's loads ahead) slows that forward. The copy
engines move the same bytes without SMs; one call takes the whole list of pieces (a ``cudaMemcpyAsync`` per piece
would cost a few microseconds of host time each).

The driver entry point is resolved once (`driver.entry_point`); without it `unavailable_reason` says why and the
backend keeps its copy kernel.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np
import torch
from ucm.backends.cuda import driver

from ucm.device import reference
from ucm.errors import UcmConfigError

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

_resolved: tuple[object | None, str | None] | None = None
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


def scatter_many(
    jobs: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor], torch.Tensor, torch.Tensor | None]], background: bool,
    source_order: str = "stream",
) -> None:
    """Queue, for each (src, pages, block_ids, rows) job (e.g. every layer's load of a step), ``block block_ids[i]
    of every page tensor = row rows[i] of src`` (rows default 0..n-1) on the current stream of the pages' device:
    ``src`` pinned host memory, the ids and rows host tensors; calls of at most `MAX_COPIES_PER_CALL` copies.
    ``background``: ask the driver to keep the copies off the SMs (they overlap the engine's kernels);
    ``source_order``: a key of `SOURCE_ORDERS`. Every job is checked before anything is queued."""
    if source_order not in SOURCE_ORDERS:
        raise UcmConfigError("source_order", source_order, sorted(SOURCE_ORDERS))
    fn, reason = _resolve()
    if fn is None:
        raise RuntimeError(reason)
    dst_all, src_all, size_all = copy_list_of(jobs)
    if not dst_all.size:
        return
    stream = ctypes.c_void_p(torch.cuda.current_stream(jobs[0][1][0].device).cuda_stream)
    flags = _FLAG_PREFER_OVERLAP if background else 0
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


def copy_list_of(
    jobs: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor], torch.Tensor, torch.Tensor | None]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (destination, source, bytes) `descriptors` of every job of a `scatter_many` call, concatenated, after
    every job's checks (pinned source, host ids and rows in range): what the copy engines or the copy-list kernel
    (`ucm.kernels.copy_list`) are given."""
    checked = [(job, _job_ids(*job)) for job in jobs]
    pieces = [descriptors(job[0], job[1], ids, rows) for job, (ids, rows) in checked if ids is not None]
    if not pieces:
        return tuple(np.zeros(0, dtype=np.uint64) for _ in range(3))
    if len(pieces) == 1:
        return pieces[0]
    return tuple(np.ascontiguousarray(np.concatenate(a)) for a in zip(*pieces, strict=True))


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
    if pages[0].device.type != "cpu" and not src.is_pinned():  # a GPU reads only pinned host memory by address
        raise UcmConfigError("scatter_blocks src", "pageable host memory", "pinned host memory for a GPU load")
    if not n:
        return None
    limit = min(p.shape[0] for p in pages)
    if int(ids.min()) < 0 or int(ids.max()) >= limit:
        raise UcmConfigError("block_ids", f"range [{int(ids.min())}, {int(ids.max())}]", f"ids in [0, {limit})")
    if src_rows is not None and int(src_rows.min()) < 0:
        raise UcmConfigError("rows", f"minimum {int(src_rows.min())}", "rows >= 0")
    return ids, src_rows
