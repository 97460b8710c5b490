"""The one place `ucm.kernels` imports triton: without it, using a kernel raises one clear typed error."""

from __future__ import annotations

from ucm.kernels import triton_unavailable_reason

from ucm.errors import BackendUnavailableError

_reason = triton_unavailable_reason()
if _reason is not None:
    raise BackendUnavailableError("triton kernels", _reason)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = ["cdiv", "next_pow2", "tl", "triton"]


def cdiv(a: int, b: int) -> int:
    """Ceiling division on host ints (triton.cdiv is a constexpr function: slow to call from Python)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()
