"""NVIDIA CUDA backend: torch.cuda streams/events (via the generic `Backend`) plus Triton kernels from
`ucm.kernels` for the block primitives. Importable without a GPU; constructing it then fails with the reason.

Host <-> device block copies: loads from pinned host memory go to the copy engines by default (`batch_dma`: the
driver's batched memcpy, one call per load, no SMs taken from the engine's kernels); the copy kernel reads/writes
pinned host memory directly (zero-copy over PCIe, one launch) for gathers and for loads the copy engines cannot
take (device-resident ids, no batched memcpy in the driver, ``host_copy = "zero_copy"``). Pageable host buffers
cannot be reached from a kernel: those are gathered into a device staging buffer and moved with one DMA
(``host_copy = "staged"`` sends pinned buffers that way too; it needs a device buffer as large as the transfer).
Tensors that are not on a CUDA device fall back to the reference ops.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ucm import kernels
from ucm.device import reference
from ucm.device.backend import Backend, StreamGate
from ucm.device.selection import BlockSelection
from ucm.errors import UcmConfigError

# The kernel modules import triton; load them on first use so this module imports anywhere.


def _copy_blocks(*args, **kwargs) -> None:
    from ucm.kernels.block_copy import copy_blocks

    copy_blocks(*args, **kwargs)


def _on_cuda(*tensors: torch.Tensor | None) -> bool:
    return all(t.is_cuda for t in tensors if t is not None)


def _by_address(src: torch.Tensor, block_ids: torch.Tensor, rows: torch.Tensor | None) -> bool:
    """A load the host can describe as address lists (copy engines, copy-list kernel): a pinned host source with
    host ids and rows (device-resident ones would have to be read back first: that waits for the device)."""
    return (src.device.type == "cpu" and src.is_pinned() and block_ids.device.type == "cpu"
            and (rows is None or rows.device.type == "cpu"))


#: programs along the (block, page) axis of a background copy kernel, used when the copy engines cannot take the
#: load (each also splits a page in 8 KiB chunks): on an H100 / H200 (132 SMs) a few of the SMs;
#: UCM_BACKGROUND_PROGRAMS in the environment sets it, for comparing widths in an engine
BACKGROUND_PROGRAMS = 16


def background_programs(environ: dict[str, str] | None = None) -> int:
    """The background copy kernel's program count: ``UCM_BACKGROUND_PROGRAMS`` (an integer in [1, 1024]) or
    `BACKGROUND_PROGRAMS`."""
    value = (os.environ if environ is None else environ).get("UCM_BACKGROUND_PROGRAMS")
    if value is None:
        return BACKGROUND_PROGRAMS
    try:
        programs = int(value)
    except ValueError:
        programs = 0
    if not 1 <= programs <= 1024:
        raise UcmConfigError("UCM_BACKGROUND_PROGRAMS", value, "an integer in [1, 1024]")
    return programs


def env_choice(name: str, default: str, allowed: Sequence[str], environ: dict[str, str] | None = None) -> str:
    """The value of environment variable ``name`` (``default`` when unset), one of ``allowed``."""
    value = (os.environ if environ is None else environ).get(name, default)
    if value not in allowed:
        raise UcmConfigError(name, value, sorted(allowed))
    return value


def _dma_reason() -> str | None:
    from ucm.backends.cuda import batch_dma

    return batch_dma.unavailable_reason()


class CudaBackend(Backend):
    name = "cuda"
    device_type = "cuda"
    # "dma": loads from pinned buffers on the copy engines (where they can take them, else as "zero_copy"), gathers
    # as "zero_copy"; "zero_copy": the kernel accesses pinned host buffers directly; "staged": device gather + one
    # DMA. Loads default to the copy engines: 1.6x the kernel's rate and no SMs taken from a forward they overlap
    # (bench/results/copy_overlap.md)
    host_copy: str = "dma"
    # background loads: "dma" on the copy engines when they can take it (else the kernel), "kernel" every job of a
    # load in one launch of the copy-list kernel on BACKGROUND_PROGRAMS programs (host time per launch, not per
    # copy; it reads host memory from those SMs beside the engine's kernels); UCM_BACKGROUND_COPY in the
    # environment sets it
    background_copy: str = "dma"
    # the copy engines' source access order (`batch_dma.SOURCE_ORDERS`): "stream", or "any" (the driver may read the
    # pinned rows at any time after the call: they do not change while a load is pending); UCM_DMA_SOURCE_ORDER in
    # the environment sets it, for comparing the two in an engine
    dma_source_order: str = "stream"

    def __init__(self, device_index: int | None = None):
        super().__init__(device_index)
        from ucm.backends.cuda import batch_dma

        cls = type(self)
        self.dma_source_order = env_choice("UCM_DMA_SOURCE_ORDER", cls.dma_source_order, list(batch_dma.SOURCE_ORDERS))
        self.background_copy = env_choice("UCM_BACKGROUND_COPY", cls.background_copy, ["dma", "kernel"])
        self.background_programs = background_programs()
        self._copy_tables = None  # pinned tables of the copy-list kernel, made at its first launch

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not torch.cuda.is_available():
            return "torch reports no CUDA device (torch.cuda.is_available() is False)"
        return kernels.triton_unavailable_reason()

    def hold_stream(self, stream: torch.Stream) -> StreamGate:
        """Held on the device by the driver's stream memory operations (`stream_gate`); open where the driver
        refuses them."""
        from ucm.backends.cuda import stream_gate

        return stream_gate.hold(stream)

    # ------------------------------------------------------------------ 4. batched block gather / scatter
    def _direct(self, buf: torch.Tensor) -> bool:
        """True when the copy kernel can address `buf` itself (device memory, or pinned host in zero-copy mode)."""
        return buf.is_cuda or (self.host_copy in ("zero_copy", "dma") and buf.is_pinned())

    def _copy_engines(
        self, src: torch.Tensor, block_ids: torch.Tensor, rows: torch.Tensor | None, background: bool
    ) -> bool:
        """Whether a load goes to the copy engines: asked for (``background_copy`` for loads ahead, else
        ``host_copy``) and possible: `_by_address`, a driver that has the batched memcpy and a stream other than the
        legacy default one (which the batched memcpy refuses)."""
        wanted = (self.background_copy if background else self.host_copy) == "dma"
        return (wanted and _by_address(src, block_ids, rows) and _dma_reason() is None
                and torch.cuda.current_stream().cuda_stream != 0)

    def _gather(
        self, pages: list[torch.Tensor], block_ids: torch.Tensor, out: torch.Tensor, rows: torch.Tensor | None
    ) -> None:
        if not _on_cuda(*pages):
            return super()._gather(pages, block_ids, out, rows)
        if self._direct(out):
            return _copy_blocks(pages, block_ids, out, rows, to_buffer=True)
        n = block_ids.numel()
        min_rows = n if rows is None else (int(rows.max()) + 1 if n else 0)
        width = reference.check_block_buffer(out, pages, min_rows, "gather_blocks out")
        staging = torch.empty(n, width, dtype=torch.uint8, device=pages[0].device)
        _copy_blocks(pages, block_ids, staging, to_buffer=True)
        if rows is None:
            out[:n].copy_(staging, non_blocking=out.is_pinned())
        else:
            out.index_copy_(0, rows.cpu(), staging.cpu())

    def _scatter(
        self, src: torch.Tensor, pages: list[torch.Tensor], block_ids: torch.Tensor, rows: torch.Tensor | None,
        background: bool = False,
    ) -> None:
        if not _on_cuda(*pages):
            return super()._scatter(src, pages, block_ids, rows)
        if self._copy_engines(src, block_ids, rows, background):
            from ucm.backends.cuda import batch_dma

            return batch_dma.scatter_many([(src, pages, block_ids, rows)], background, self.dma_source_order)
        if self._direct(src):
            # a background load reading host memory leaves most SMs to the engine's kernels (one program per
            # block and page would occupy every SM for as long as PCIe takes)
            limit = self.background_programs if background else None
            return _copy_blocks(pages, block_ids, src, rows, to_buffer=False, max_programs=limit)
        n = block_ids.numel()
        min_rows = n if rows is None else (int(rows.max()) + 1 if n else 0)
        reference.check_block_buffer(src, pages, min_rows, "scatter_blocks src")
        chunk = src[:n] if rows is None else src.index_select(0, rows.to(src.device))
        staging = chunk.to(pages[0].device, non_blocking=chunk.is_pinned())
        _copy_blocks(pages, block_ids, staging, to_buffer=False)

    def _scatter_many(
        self, jobs: list[tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor | None]], background: bool
    ) -> None:
        """Every job on the copy engines together (batched-memcpy calls of at most `batch_dma.MAX_COPIES_PER_CALL`
        copies) when each of them can go there; background loads, where ``background_copy`` is "kernel", as one
        launch of the copy-list kernel (host cost per launch, not per copy); else one by one."""
        if jobs and all(_on_cuda(*pages) and self._copy_engines(src, ids, rows, background)
                        for src, pages, ids, rows in jobs):
            from ucm.backends.cuda import batch_dma

            return batch_dma.scatter_many(jobs, background, self.dma_source_order)
        if jobs and background and self.background_copy == "kernel" and all(
                _on_cuda(*pages) and _by_address(src, ids, rows) for src, pages, ids, rows in jobs):
            return self._scatter_listed(jobs)
        return super()._scatter_many(jobs, background)

    def _scatter_listed(
        self, jobs: list[tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor | None]]
    ) -> None:
        """The jobs' copies (one per block and page) as one copy-list launch on `background_programs` programs."""
        from ucm.backends.cuda import batch_dma
        from ucm.kernels.copy_list import copy_list, table_entries

        dsts, srcs, sizes = batch_dma.copy_list_of(jobs)
        if not dsts.size:
            return
        if self._copy_tables is None:
            from ucm.backends.cuda.copy_tables import CopyTables

            self._copy_tables = CopyTables()
        table = self._copy_tables.take(table_entries(dsts.size))
        try:
            copy_list(jobs[0][1][0], dsts, srcs, sizes, table, max_programs=self.background_programs)
        finally:  # a launch that failed before queuing anything leaves the table free once the stream gets here
            self._copy_tables.give_back(table, self.record_event())

    # ------------------------------------------------------------------ 5-7. top-k, representations, scoring
    def topk_masked(
        self,
        scores: torch.Tensor,
        k: int | torch.Tensor,
        lengths: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not scores.is_cuda:
            return super().topk_masked(scores, k, lengths, exclude)
        from ucm.kernels.topk_masked import topk_masked

        return topk_masked(scores, k, lengths, exclude)

    def block_means(
        self, k_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not k_cache.is_cuda:
            return super().block_means(k_cache, block_ids, num_tokens)
        from ucm.kernels.block_means import block_means

        return block_means(k_cache, block_ids, num_tokens)

    def block_scores(self, query: torch.Tensor, reps: torch.Tensor, cu_blocks: torch.Tensor) -> torch.Tensor:
        if not reps.is_cuda:
            return super().block_scores(query, reps, cu_blocks)
        from ucm.kernels.block_scores import block_scores

        return block_scores(query, reps, cu_blocks)

    def select_blocks(
        self,
        query: torch.Tensor,
        reps: torch.Tensor,
        cu_blocks: torch.Tensor,
        k: int | torch.Tensor,
        exclude: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scoring + top-k, two launches, no synchronization when `cu_blocks`, `k`, `exclude` are on the host.

        Scoring also counts the scores' key bins, so top-k finds the threshold's bin without scanning the row.
        """
        if not reps.is_cuda:
            return super().select_blocks(query, reps, cu_blocks, k, exclude)
        from ucm.kernels._indices import to_device_async, to_device_int64
        from ucm.kernels.block_scores import block_scores
        from ucm.kernels.topk_masked import histogram_bits, topk_masked

        device = reps.device
        (cu_device,) = to_device_int64([cu_blocks], device)  # one copy serves both launches
        lengths = cu_blocks[1:] - cu_blocks[:-1]  # stays where cu_blocks is: on the host, no sync in top-k
        histogram = exclude_device = None
        if cu_blocks.device.type == "cpu" and lengths.numel():
            bits = histogram_bits(int(lengths.max()))
            if bits:  # scoring counts key bins, so top-k ranks only the threshold's bin
                histogram = torch.zeros(lengths.numel(), 1 << bits, dtype=torch.int32, device=device)
        if exclude is not None:
            exclude_device = to_device_async(exclude, device)
        scores = block_scores(
            query, reps, cu_blocks, cu_device=cu_device, histogram=histogram, exclude=exclude_device
        )
        return topk_masked(
            scores, k, lengths, exclude, cu_device=cu_device, histogram=histogram, exclude_device=exclude_device
        )

    def sparse_decode_attention(
        self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, selection: BlockSelection
    ) -> torch.Tensor:
        """One launch (+ split merge) reading the selection and the engine's table; no sync."""
        if not k_cache.is_cuda:
            return super().sparse_decode_attention(query, k_cache, v_cache, selection)
        from ucm.kernels.sparse_paged_attention import sparse_paged_decode_attention

        return sparse_paged_decode_attention(query, k_cache, v_cache, selection)


__all__ = ["CudaBackend"]
