"""The implementations the parity suite compares with `ucm.device.reference`.

Every backend registered with `ucm.device.registry` (built-in and out-of-tree), plus "triton-interpret": the
`ucm.kernels` launchers on CPU tensors under Triton's interpreter, behind the CPU backend's streams and events, so
kernel logic is checked on machines without a GPU.
"""

from __future__ import annotations

import os

import torch

from ucm import kernels
from ucm.device.backend import Backend
from ucm.device.cpu import CpuBackend
from ucm.device.registry import backend_class, get_backend, registered_backends

INTERPRET = "triton-interpret"
IMPLEMENTATIONS = [*sorted(registered_backends()), INTERPRET]


class TritonInterpretBackend(CpuBackend):
    """The CPU backend with every block primitive replaced by its Triton kernel (interpreted)."""

    name = INTERPRET

    def _gather(self, pages, block_ids, out, rows):  # noqa: ANN001
        from ucm.kernels.block_copy import copy_blocks

        copy_blocks(pages, block_ids, out, rows, to_buffer=True)

    def _scatter(self, src, pages, block_ids, rows, background=False):  # noqa: ANN001
        from ucm.kernels.block_copy import copy_blocks

        copy_blocks(pages, block_ids, src, rows, to_buffer=False, max_programs=3 if background else None)

    def _scatter_many(self, jobs, background):  # noqa: ANN001
        """As `CudaBackend._scatter_listed` for background loads (its "kernel" choice): one copy-list launch."""
        if not background:
            return super()._scatter_many(jobs, background)
        from ucm.backends.cuda.batch_dma import copy_list_of
        from ucm.kernels.copy_list import copy_list, table_entries

        dsts, srcs, sizes = copy_list_of(jobs)
        table = torch.empty(table_entries(dsts.size), dtype=torch.int64)
        copy_list(jobs[0][1][0], dsts, srcs, sizes, table, max_programs=3)

    def topk_masked(self, scores, k, lengths=None, exclude=None):  # noqa: ANN001
        from ucm.kernels.topk_masked import topk_masked

        return topk_masked(scores, k, lengths, exclude)

    def block_means(self, k_cache, block_ids, num_tokens=None):  # noqa: ANN001
        from ucm.kernels.block_means import block_means

        return block_means(k_cache, block_ids, num_tokens)

    def block_scores(self, query, reps, cu_blocks):  # noqa: ANN001
        from ucm.kernels.block_scores import block_scores

        return block_scores(query, reps, cu_blocks)

    def select_blocks(self, query, reps, cu_blocks, k, exclude=None):  # noqa: ANN001
        """As `CudaBackend.select_blocks`: one offsets tensor serves both launches."""
        from ucm.kernels.block_scores import block_scores
        from ucm.kernels.topk_masked import histogram_bits, topk_masked

        cu_device = cu_blocks.to(torch.int64).clone()
        lengths = cu_blocks[1:] - cu_blocks[:-1]
        bits = histogram_bits(int(lengths.max())) if lengths.numel() else 0
        histogram = torch.zeros(lengths.numel(), 1 << bits, dtype=torch.int32) if bits else None
        scores = block_scores(query, reps, cu_blocks, cu_device=cu_device, histogram=histogram, exclude=exclude)
        return topk_masked(scores, k, lengths, exclude, cu_device=cu_device, histogram=histogram)


def _interpret_unavailable_reason() -> str | None:
    reason = kernels.triton_unavailable_reason()
    if reason is not None:
        return reason
    if torch.cuda.is_available():
        return "a CUDA device is present: the kernels run compiled in the 'cuda' cases"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "triton was imported before tests/parity/conftest.py could set TRITON_INTERPRET=1 (run it alone)"
    from triton.runtime.interpreter import InterpretedFunction
    from ucm.kernels import block_copy

    if not isinstance(block_copy._copy_blocks_kernel, InterpretedFunction):
        return "ucm.kernels was imported before TRITON_INTERPRET=1 was set (run tests/parity alone)"
    return None


_CACHE: dict[str, tuple[Backend | None, str | None]] = {}


def make_impl(name: str) -> tuple[Backend | None, str | None]:
    """(backend, None) when `name` can run here, else (None, the reason it cannot)."""
    if name not in _CACHE:
        if name == INTERPRET:
            reason = _interpret_unavailable_reason()
            _CACHE[name] = (TritonInterpretBackend() if reason is None else None, reason)
        else:
            try:
                reason = backend_class(name).unavailable_reason()
                _CACHE[name] = (get_backend(name) if reason is None else None, reason)
            except Exception as err:  # an out-of-tree backend that fails to import is reported, not fatal
                _CACHE[name] = (None, f"could not load: {err!r}")
    return _CACHE[name]


# ---------------------------------------------------------------------------------------------- test data helpers
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Largest accepted deviation (rtol, atol) per input dtype: a backend may accumulate in the input's precision.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Random values of `dtype` (uniform bytes for integer dtypes) created on the CPU, then moved."""
    if dtype.is_floating_point:
        t = torch.randn(shape)
    else:
        t = torch.randint(0, 256, shape)
    return t.to(dtype).to(device)


def host_buffer(impl: Backend, kind: str, rows: int, width: int) -> torch.Tensor:
    """A uint8 [rows, width] block buffer: 'pinned' host, 'pageable' host or 'device' memory."""
    if kind == "pinned":
        return impl.alloc_pinned(rows * width).view(rows, width)
    if kind == "pageable":
        return torch.empty(rows, width, dtype=torch.uint8)
    return torch.empty(rows, width, dtype=torch.uint8, device=impl.device)
