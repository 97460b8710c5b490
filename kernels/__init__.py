"""Triton kernels behind the CUDA backend, one module per kernel, each next to its Python launcher.

- `copy_blocks` (`block_copy`): batched block gather/scatter between paged caches and a block buffer, one launch
  for a whole list of blocks of every page tensor (device memory or pinned host memory, zero-copy).
- `block_means` (`block_means`): float32 mean of K per block and KV head.
- `block_scores` (`block_scores`): GQA-reduced score of every candidate block of every request.
- `topk_masked` (`topk_masked`): per-row top-k with ragged lengths and excluded entries, ascending indices.

Called by `ucm.backends.cuda.CudaBackend` (and by the parity suite on CPU tensors under ``TRITON_INTERPRET=1``).
Semantics are those of `ucm.device.reference`. This package imports without a GPU and without triton; the
launchers are loaded on first use and raise `BackendUnavailableError` when triton is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from ucm.errors import BackendUnavailableError

_LAUNCHERS = {
    "copy_blocks": "block_copy",
    "block_means": "block_means",
    "block_scores": "block_scores",
    "topk_masked": "topk_masked",
}

__all__ = ["triton_unavailable_reason", *_LAUNCHERS]


def triton_unavailable_reason() -> str | None:
    """None when the kernels can be loaded, else a sentence saying why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; CUDA builds of torch ship it)"
    return None


def __getattr__(name: str) -> Any:
    if name not in _LAUNCHERS:
        raise AttributeError(f"module 'ucm.kernels' has no attribute {name!r}")
    reason = triton_unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError("triton kernels", reason)
    launcher = getattr(importlib.import_module(f"ucm.kernels.{_LAUNCHERS[name]}"), name)
    globals()[name] = launcher
    return launcher
