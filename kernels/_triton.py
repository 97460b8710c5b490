"""The one place `ucm.kernels` imports triton: without it, using a kernel raises one clear typed error."""

from __future__ import annotations

from ucm.kernels import triton_unavailable_reason

from ucm.errors import BackendUnavailableError

_reason = triton_unavailable_reason()
if _reason is not None:
    raise BackendUnavailableError("triton kernels", _reason)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = ["tl", "triton"]
