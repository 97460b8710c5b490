"""CUDA driver entry points by name, through ``cuGetProcAddress`` (ctypes on ``libcuda.so.1``, no extra Python
package): the batched memcpy (`batch_dma`) and the stream memory operations (`stream_gate`) are driver calls that
torch does not expose."""

from __future__ import annotations

import ctypes
import threading

#: CU_GET_PROC_ADDRESS_LEGACY_STREAM: torch queues on the legacy default stream (handle 0); without this flag the
#: driver may hand out the per-thread-default-stream variant, for which handle 0 is another stream
_LEGACY_STREAM = 1
_lock = threading.Lock()
_driver: tuple[ctypes.CDLL | None, str | None] | None = None


def _library() -> tuple[ctypes.CDLL | None, str | None]:
    global _driver
    with _lock:
        if _driver is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
                get = lib.cuGetProcAddress_v2
            except (OSError, AttributeError) as exc:
                _driver = (None, f"no CUDA driver entry point lookup (libcuda.so.1 cuGetProcAddress_v2): {exc}")
            else:
                get.restype = ctypes.c_int
                get.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_uint64,
                                ctypes.c_void_p]
                _driver = (lib, None)
        return _driver


def entry_point(name: str, abi_version: int, prototype: type) -> tuple[object | None, str | None]:
    """(the driver function ``name`` in the ABI of CUDA ``abi_version`` (e.g. 12080 for 12.8) as ``prototype``,
    None) or (None, why it is not there)."""
    lib, reason = _library()
    if lib is None:
        return None, reason
    pointer, status = ctypes.c_void_p(), ctypes.c_int(0)
    err = lib.cuGetProcAddress_v2(name.encode(), ctypes.byref(pointer), abi_version, _LEGACY_STREAM,
                                  ctypes.byref(status))
    if err != 0 or not pointer.value:
        return None, f"cuGetProcAddress({name}) gave CUresult {err} (status {status.value})"
    return prototype(pointer.value), None
