"""Holding a CUDA stream on the device until the host, or another stream, says go: the driver's stream memory
operations (``cuStreamWaitValue32`` / ``cuStreamWriteValue32``) on words of pinned host memory.

Why: a load queued at the end of a step (its host work hidden behind the step's queued forward) would otherwise
start when that forward ends, and the copy engines serve in queue order: the next step's input copies, queued a
few milliseconds later, would wait behind the whole load (bench/results/copy_overlap.md). Held, the load starts
once the next step's inputs have been copied (`StreamGate.open_after` on the compute stream, queued after them).

Each gate has its own word (a ring of `_SLOTS`) and its own value: the held stream waits until the word reaches
the value (a wrap-safe comparison), and every way of opening writes that same value, so opening twice, from the
host and from the device in any order, is harmless. A gate opens by itself after ``timeout_s`` (a watchdog
thread): a held stream never blocks a device-wide synchronize, a shutdown, a waiting host or an implicitly
synchronizing call (cudaMalloc, cudaHostAlloc, the first launch of a lazily loaded kernel: they wait for every
stream) for longer.
"""

from __future__ import annotations

import collections
import ctypes
import threading
import time

import numpy as np
import torch
from ucm.backends.cuda import driver

from ucm.device.backend import StreamGate

_ABI_VERSION = 12000
_WAIT_GEQ = 0  # CU_STREAM_WAIT_VALUE_GEQ: until (int32)(*addr - value) >= 0
_SLOTS = 4096
#: seconds after which a gate nobody opened opens itself (its loads then start early, never lost). Short, because
#: an implicitly synchronizing call (a cudaMalloc of the caching allocator, a pinned allocation) made while a gate
#: is held waits for it: measured in an engine with 1 s here, a step that grew the allocator took 1008 ms
HOLD_TIMEOUT_S = 0.05

_VALUE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint)
_lock = threading.Lock()
_resolved: tuple[tuple[object, object] | None, str | None] | None = None
_words: torch.Tensor | None = None  # the pinned ring; never freed (held streams may read it at any time)
_host: np.ndarray | None = None
_sequence = 0
#: gates opened by the watchdog so far in this process (the tests read it)
timed_out = 0


def _resolve() -> tuple[tuple[object, object] | None, str | None]:
    global _resolved
    if _resolved is None:
        wait, reason = driver.entry_point("cuStreamWaitValue32", _ABI_VERSION, _VALUE_FN)
        write, reason2 = driver.entry_point("cuStreamWriteValue32", _ABI_VERSION, _VALUE_FN)
        _resolved = ((wait, write), None) if wait and write else (None, reason or reason2)
    return _resolved


def unavailable_reason() -> str | None:
    """None when streams can be held here, else why not."""
    if not torch.cuda.is_available():
        return "torch reports no CUDA device"
    return _resolve()[1]


def _disable(reason: str) -> None:
    global _resolved
    _resolved = (None, reason)


_CU_STREAM_LEGACY = 1  # the legacy default stream named explicitly (torch's default stream has handle 0)


def _handle(stream: torch.Stream) -> int:
    with stream:
        return torch.cuda.current_stream().cuda_stream or _CU_STREAM_LEGACY


class CudaStreamGate(StreamGate):
    held = True

    def __init__(self, index: int, value: int, address: int, write: object):
        self._index, self._value, self._address, self._write = index, value, address, write

    @property
    def is_open(self) -> bool:
        # a wrap-safe comparison, as the device's wait makes: a later gate's value in the word also means open
        return _host is not None and ((int(_host[self._index]) - self._value) & 0xFFFFFFFF) < 0x80000000

    def open(self) -> None:
        assert _host is not None
        _host[self._index] = self._value

    def open_after(self, stream: torch.Stream) -> None:
        # on torch's default stream too (handle 0, named as the legacy stream): measured ordered after its work
        # (bench/results/gpu_runs/stream_gate_order_h100_992ef74.json)
        if self._write(_handle(stream), self._address, self._value, 0) != 0:
            self.open()  # the device-side write was refused: open now rather than late


class _Watchdog:
    """Opens each gate ``timeout`` seconds after it was made (deadlines come in order: one queue, one thread)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: collections.deque[tuple[float, CudaStreamGate]] = collections.deque()
        self._thread: threading.Thread | None = None

    def add(self, gate: CudaStreamGate, timeout_s: float) -> None:
        with self._cond:
            self._due.append((time.monotonic() + timeout_s, gate))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ucm-stream-gate", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        global timed_out
        with self._cond:
            while True:
                if not self._due:
                    self._cond.wait()
                    continue
                deadline, gate = self._due[0]
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._due.popleft()
                if not gate.is_open:
                    timed_out += 1
                gate.open()


_watchdog = _Watchdog()


def hold(stream: torch.Stream, timeout_s: float = HOLD_TIMEOUT_S) -> StreamGate:
    """Queue on ``stream`` a wait for a new gate (see the module docstring); an open `StreamGate` where the driver
    cannot hold streams (then `unavailable_reason` says why)."""
    global _words, _host, _sequence
    fns, _ = _resolve()
    if fns is None:
        return StreamGate()
    wait, write = fns
    with _lock:
        if _words is None:
            _words = torch.zeros(_SLOTS, dtype=torch.int32, pin_memory=True)
            _host = _words.numpy().view(np.uint32)
        _sequence = (_sequence + 1) & 0xFFFFFFFF or 1
        value, index = _sequence, _sequence % _SLOTS
    address = _words.data_ptr() + index * _words.element_size()
    err = wait(_handle(stream), address, value, _WAIT_GEQ)
    if err != 0:
        _disable(f"cuStreamWaitValue32 on pinned host memory gave CUresult {err} (stream memory operations off)")
        return StreamGate()
    gate = CudaStreamGate(index, value, address, write)
    _watchdog.add(gate, timeout_s)
    return gate
