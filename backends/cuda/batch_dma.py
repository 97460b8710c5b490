"""Host-to-device block loads on the GPU's copy engines: the CUDA driver's batched memcpy (``cuMemcpyBatchAsync``,
CUDA 12.8 drivers and later), one driver call for every (block, page tensor) piece of a load.

Why: the copy kernel (`ucm.kernels.block_copy`) reads pinned host memory from SMs and holds them for as long as
PCIe takes, so a load that runs beside the engine's forward (ESA's loads ahead) slows that forward. The copy
engines move the same bytes without SMs; one call takes the whole list of pieces (a ``cudaMemcpyAsync`` per piece
would cost a few microseconds of host time each).

The driver entry point is resolved once through ``cuGetProcAddress`` (ctypes on ``libcuda.so.1``, no extra Python
package); without it `unavailable_reason` says why and the backend keeps its copy kernel.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Sequence

import numpy as np
import torch

from ucm.device import reference
from ucm.device.backend import CopyHandle
from ucm.errors import UcmConfigError

_ABI_VERSION = 12080  # the cuMemcpyBatchAsync ABI asked for: CUDA 12.8's, with its failIdx argument
_SRC_ORDER_STREAM = 1  # CU_MEMCPY_SRC_ACCESS_ORDER_STREAM: the source is read in stream order
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
        try:
            driver = ctypes.CDLL("libcuda.so.1")
            get = driver.cuGetProcAddress_v2
        except (OSError, AttributeError) as exc:
            _resolved = (None, f"no CUDA driver entry point lookup (libcuda.so.1 cuGetProcAddress_v2): {exc}")
            return _resolved
        get.restype = ctypes.c_int
        get.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_uint64,
                        ctypes.c_void_p]
        pointer, status = ctypes.c_void_p(), ctypes.c_int(0)
        err = get(b"cuMemcpyBatchAsync", ctypes.byref(pointer), _ABI_VERSION, 0, ctypes.byref(status))
        if err != 0 or not pointer.value:
            _resolved = (None, f"cuGetProcAddress(cuMemcpyBatchAsync) gave CUresult {err} (a CUDA 12.8+ driver has it)")
        else:
            _resolved = (_BATCH_FN(pointer.value), None)
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
    row_starts = np.uint64(src.data_ptr()) + (rows if rows is not None else np.arange(n)).astype(np.uint64) * np.uint64(
        src.stride(0) * src.element_size())
    dsts, srcs, sizes = [], [], []
    offset = 0
    for page in pages:
        nbytes = reference.page_nbytes(page)
        stride = page.stride(0) * page.element_size()
        dsts.append(np.uint64(page.data_ptr()) + ids.astype(np.uint64) * np.uint64(stride))
        srcs.append(row_starts + np.uint64(offset))
        sizes.append(np.full(n, nbytes, dtype=np.uint64))
        offset += nbytes
    return tuple(np.ascontiguousarray(np.concatenate(a)) for a in (dsts, srcs, sizes))


Job = tuple[torch.Tensor, Sequence[torch.Tensor], torch.Tensor, torch.Tensor | None]


def scatter_many(jobs: Sequence[Job], background: bool) -> None:
    """Queue, for each (src, pages, block_ids, rows) job (e.g. every layer's load of a step), ``block block_ids[i]
    of every page tensor = row rows[i] of src`` (rows default 0..n-1) on the current stream of the pages' device:
    ``src`` pinned host memory, the ids and rows host tensors; calls of at most `MAX_COPIES_PER_CALL` copies.
    ``background``: ask the driver to keep the copies off the SMs (they overlap the engine's kernels). Every job is
    checked before anything is queued."""
    pieces = _descriptors_of(jobs)
    if pieces is not None:
        _call(pieces, background, torch.cuda.current_stream(jobs[0][1][0].device).cuda_stream)


def submit_many(jobs: Sequence[Job], background: bool) -> CopyHandle | None:
    """`scatter_many`, with the driver calls made by the device's submit thread (`_Submitter`) instead of the
    caller: the caller only checks the jobs and builds their descriptors, and goes on while the driver takes the
    copies (its per-copy host time is the larger part of a load's). The copies run after the work queued so far on
    the current stream; the returned handle (None: nothing to copy) ends once they have, and raises a driver error
    from `done`/`wait`."""
    pieces = _descriptors_of(jobs)
    if pieces is None:
        return None
    device = jobs[0][1][0].device
    handle = _QueuedCopy(jobs, pieces, background, torch.cuda.current_stream(device))
    _submitter(device).put(handle)
    return handle


def _descriptors_of(jobs: Sequence[Job]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    fn, reason = _resolve()
    if fn is None:
        raise RuntimeError(reason)
    pieces = [_job_descriptors(*job) for job in jobs]
    pieces = [p for p in pieces if p is not None]
    if not pieces:
        return None
    return tuple(np.ascontiguousarray(np.concatenate(a)) if len(pieces) > 1 else a[0]
                 for a in zip(*pieces, strict=True))


def _call(pieces: tuple[np.ndarray, np.ndarray, np.ndarray], background: bool, stream: int) -> None:
    """The driver calls of one load's descriptors on ``stream`` (a raw CUDA stream handle)."""
    fn, _ = _resolve()
    dst_all, src_all, size_all = pieces
    attrs = _CopyAttributes(src_access_order=_SRC_ORDER_STREAM, flags=_FLAG_PREFER_OVERLAP if background else 0)
    attr_index, fail_index = ctypes.c_size_t(0), ctypes.c_size_t(0)
    global calls
    for start in range(0, dst_all.size, MAX_COPIES_PER_CALL):
        end = min(start + MAX_COPIES_PER_CALL, dst_all.size)
        # the driver reads the descriptor arrays during the call (ctypes lets other threads run meanwhile)
        err = fn(dst_all[start:].ctypes.data, src_all[start:].ctypes.data, size_all[start:].ctypes.data, end - start,
                 ctypes.addressof(attrs), ctypes.byref(attr_index), 1, ctypes.byref(fail_index),
                 ctypes.c_void_p(stream))
        calls += 1
        if err != 0:
            raise RuntimeError(
                f"cuMemcpyBatchAsync failed: CUresult {err} at copy {start + fail_index.value} of {dst_all.size}")


class _QueuedCopy(CopyHandle):
    """A load handed to a submit thread: ends once the thread has made its driver calls and they have run."""

    def __init__(self, jobs: Sequence[Job], pieces: tuple[np.ndarray, np.ndarray, np.ndarray], background: bool,
                 after: torch.cuda.Stream):
        super().__init__(None, (jobs,))
        self.pieces: tuple[np.ndarray, np.ndarray, np.ndarray] | None = pieces
        self.background = background
        self.after = torch.cuda.Event()
        self.after.record(after)  # the copies follow what the caller queued before them
        self.queued = threading.Event()
        self.error: BaseException | None = None

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"copy-engine load failed on the submit thread: {self.error}") from self.error

    def done(self) -> bool:
        if not self.queued.is_set():
            return False
        self._check()
        return super().done()

    def wait(self) -> None:
        self.queued.wait()
        self._check()
        super().wait()


class _Submitter:
    """One daemon thread per device making the driver calls of queued loads in order, on its own stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.queue: queue.SimpleQueue[_QueuedCopy] = queue.SimpleQueue()
        threading.Thread(target=self._run, name=f"ucm-dma-{device}", daemon=True).start()

    def put(self, handle: _QueuedCopy) -> None:
        self.queue.put(handle)

    def _run(self) -> None:
        torch.cuda.set_device(self.device)  # the driver calls need the device's context current on this thread
        while True:
            handle = self.queue.get()
            try:
                self.stream.wait_event(handle.after)
                _call(handle.pieces, handle.background, self.stream.cuda_stream)
            except BaseException as exc:  # reported to whoever waits on the handle
                handle.error = exc
            finally:
                done = torch.cuda.Event()
                done.record(self.stream)
                handle._event, handle.pieces = done, None
                handle.queued.set()


_submitters: dict[torch.device, _Submitter] = {}
_submitters_lock = threading.Lock()


def _submitter(device: torch.device) -> _Submitter:
    with _submitters_lock:
        if device not in _submitters:
            _submitters[device] = _Submitter(device)
        return _submitters[device]


def _job_descriptors(
    src: torch.Tensor, pages: Sequence[torch.Tensor], block_ids: torch.Tensor, rows: torch.Tensor | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """One job's descriptors after its checks (None: nothing to copy)."""
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
    return descriptors(src, pages, ids, src_rows)
