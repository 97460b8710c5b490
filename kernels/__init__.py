"""Triton kernels behind the CUDA backend, one module per kernel, each next to its Python launcher.

- `block_copy.copy_blocks`: batched block gather/scatter between paged caches and a block buffer, one launch for
  a whole list of blocks of every page tensor (device memory, or pinned host memory accessed zero-copy).
- `copy_list.copy_list`: a list of (destination, source, bytes) copies in one launch (the background loads of a
  whole step: host time per launch, where the driver's batched memcpy takes it per copy).
- `block_means.block_means`: float32 mean of K per block and KV head.
- `block_scores.block_scores`: GQA-reduced score of every candidate block of every request (optionally also
  counting the scores' key bins for `topk_masked`).
- `topk_masked.topk_masked`: per-row top-k with ragged lengths and excluded entries, ascending indices.
- `paged_attention`, `sparse_paged_attention`: decode attention over a paged cache (the sparse path's kernels).

Called by `ucm.backends.cuda.CudaBackend` (and by the parity suite on CPU tensors under ``TRITON_INTERPRET=1``).
Semantics are those of `ucm.device.reference`. Importing this package needs neither a GPU nor triton; importing
a kernel module without triton raises `BackendUnavailableError` saying so (`_triton`).
"""

from __future__ import annotations

import importlib.util


def triton_unavailable_reason() -> str | None:
    """None when the kernel modules can be imported, else a sentence saying why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; CUDA builds of torch ship it)"
    return None


__all__ = ["triton_unavailable_reason"]
