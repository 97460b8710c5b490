"""The device-abstraction contract: one `Backend` per accelerator kind.

Everything above this layer (stores, sparse algorithms, the vLLM connector) talks to a `Backend` only.
Streams and events use PyTorch's device-generic API (`torch.Stream`, `torch.Event`, `torch.accelerator`), so
CUDA and Ascend (PrivateUse1 "npu") share this code; a backend subclass overrides only what truly differs
(faster kernels, pinned-memory or event quirks). The block primitives default to `ucm.device.reference`.

Who calls what:
- stores: `gather_blocks` / `scatter_blocks` on a side stream, pinned buffers, `CopyHandle` polling;
- sparse algorithms: `hold_stream` for loads ahead that must not start before the next step's inputs,
  `block_means` after prefill, `select_blocks` (= `block_scores` + `topk_masked`) in decode,
  `sparse_decode_attention` (attention straight over a `BlockSelection`, resident mode: no sparse table).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch

from ucm.device import reference
from ucm.device.selection import BlockSelection
from ucm.errors import BackendUnavailableError

Cache = torch.Tensor | Sequence[torch.Tensor]


class CopyHandle:
    """An asynchronous operation in flight. Keep it until `done()`: it keeps its tensors alive."""

    def __init__(self, event: Any | None = None, keepalive: tuple = ()):
        self._event = event
        self._keepalive = keepalive

    def done(self) -> bool:
        """True once the work has finished on the device (non-blocking)."""
        if self._event is None or self._event.query():
            self._keepalive = ()
            return True
        return False

    def wait(self) -> None:
        """Block the calling thread until the work has finished."""
        if self._event is not None:
            self._event.synchronize()
        self._keepalive = ()


class StreamGate:
    """What `Backend.hold_stream` returns: the work queued on the held stream after it waits, on the device, until
    the gate opens. `open_after(stream)` opens it once the work queued so far on ``stream`` has run (a device-side
    write: no host wait), `open()` at once from the host. Both may be called any number of times, in any order.
    A backend that cannot hold a stream on the device returns this base class: always open, ``held`` False."""

    held: bool = False

    @property
    def is_open(self) -> bool:
        """Whether the gate has been opened (by any way, its timeout included)."""
        return True

    def open(self) -> None:
        """Open now (from the host)."""

    def open_after(self, stream: torch.Stream) -> None:
        """Open once the work queued so far on ``stream`` has run."""


class Backend:
    """One accelerator kind. Subclasses set `name`, `device_type` and may override any primitive."""

    name: ClassVar[str] = ""
    device_type: ClassVar[str] = ""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when this backend can run here, else a sentence saying why not."""
        return None

    def __init__(self, device_index: int | None = None):
        reason = self.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(self.name, reason)
        if device_index is None:
            device_index = torch.accelerator.current_device_index()
        self.device = torch.device(self.device_type, device_index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device})"

    # ------------------------------------------------------------------ 1. streams and events
    def new_stream(self) -> torch.Stream:
        """A new side stream on this device."""
        return torch.Stream(device=self.device)

    def current_stream(self) -> torch.Stream:
        """The stream compute is currently queued on."""
        return torch.accelerator.current_stream(self.device)

    @contextlib.contextmanager
    def use_stream(self, stream: torch.Stream | None) -> Iterator[None]:
        """Queue the work of the `with` body on `stream` (None: the current stream)."""
        if stream is None:
            yield
            return
        with stream:
            yield

    def record_event(self, stream: torch.Stream | None = None) -> Any:
        """An event marking all work queued so far on `stream` (default: current stream)."""
        event = torch.Event(device=self.device)
        event.record(stream if stream is not None else self.current_stream())
        return event

    def wait_event(self, event: Any, stream: torch.Stream | None = None) -> None:
        """Make `stream` (default: current) wait, on the device, for `event`."""
        (stream if stream is not None else self.current_stream()).wait_event(event)

    def hold_stream(self, stream: torch.Stream) -> StreamGate:
        """Make the work queued on ``stream`` from now on wait, on the device, until the returned gate opens. Why:
        a copy queued early (its host work done while the device is busy) may have to start only after work not
        queued yet (the next step's input copies, which the copy engines would otherwise serve after it). A held
        stream opens by itself after a backend-defined timeout, so a device-wide synchronize never waits forever.
        Default: nothing held (an open gate)."""
        return StreamGate()

    def synchronize(self) -> None:
        """Block until all work on this device has finished."""
        torch.accelerator.synchronize(self.device)

    # ------------------------------------------------------------------ 2. pinned host memory
    def alloc_pinned(self, nbytes: int) -> torch.Tensor:
        """A page-locked host uint8 buffer of `nbytes` (use `PinnedBufferPool` to reuse them)."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    # ------------------------------------------------------------------ 3. asynchronous copies
    def _ordered_side(self, stream: torch.Stream | None) -> contextlib.AbstractContextManager:
        """Enter `stream` after making it wait for the work already queued on the current stream."""
        if stream is not None:
            self.wait_event(self.record_event(), stream)
        return self.use_stream(stream)

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: torch.Stream | None = None) -> CopyHandle:
        """dst.copy_(src) for any H2D / D2H / D2D pair, queued on `stream` after the current stream's work."""
        with self._ordered_side(stream):
            dst.copy_(src, non_blocking=True)
            event = self.record_event(stream)
        return CopyHandle(event, (dst, src))

    # ------------------------------------------------------------------ 4. batched block gather / scatter
    def gather_blocks(
        self,
        cache: Cache,
        block_ids: torch.Tensor,
        out: torch.Tensor,
        rows: torch.Tensor | None = None,
        stream: torch.Stream | None = None,
    ) -> CopyHandle:
        """Copy a list of blocks out of a paged cache into a block buffer, as one batched operation.

        `cache` is a page tensor, a (k, v) tuple or a list of layers (see `ucm.device.reference`); `out` is a
        uint8 ``[rows, bytes_per_block]`` buffer on the host (pinned) or a device. Row ``rows[i]`` (default i)
        receives block ``block_ids[i]``. Queued on `stream` after the current stream's work; wait on the
        handle before reading `out`.
        """
        pages = reference.as_page_tensors(cache)
        with self._ordered_side(stream):
            self._gather(pages, block_ids, out, rows)
            event = self.record_event(stream)
        return CopyHandle(event, (pages, block_ids, out, rows))

    def scatter_blocks(
        self,
        src: torch.Tensor,
        cache: Cache,
        block_ids: torch.Tensor,
        rows: torch.Tensor | None = None,
        stream: torch.Stream | None = None,
        background: bool = False,
    ) -> CopyHandle:
        """Copy row ``rows[i]`` (default i) of a block buffer into block ``block_ids[i]`` (ids distinct).

        ``background``: a copy that runs beside the engine's compute and may take its time (loads ahead of their
        use): a backend keeps it from competing with that compute (CUDA: a copy kernel on a few SMs)."""
        pages = reference.as_page_tensors(cache)
        with self._ordered_side(stream):
            self._scatter(src, pages, block_ids, rows, background)
            event = self.record_event(stream)
        return CopyHandle(event, (pages, block_ids, src, rows))

    def scatter_blocks_many(
        self,
        jobs: Sequence[tuple[torch.Tensor, Cache, torch.Tensor, torch.Tensor | None]],
        stream: torch.Stream | None = None,
        background: bool = False,
    ) -> CopyHandle:
        """`scatter_blocks` of several (src, cache, block_ids, rows) jobs as one operation (e.g. every layer's load
        of a step: each layer's cache and its own ids and rows), queued on `stream` after the current stream's
        work; a backend may issue them in one call."""
        flat = [(src, reference.as_page_tensors(cache), ids, rows) for src, cache, ids, rows in jobs]
        with self._ordered_side(stream):
            self._scatter_many(flat, background)
            event = self.record_event(stream)
        return CopyHandle(event, (flat,))

    def _scatter_many(
        self, jobs: list[tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor | None]], background: bool
    ) -> None:
        for src, pages, ids, rows in jobs:
            self._scatter(src, pages, ids, rows, background)

    def move_blocks(
        self, cache: Cache, src_ids: torch.Tensor, dst_ids: torch.Tensor, stream: torch.Stream | None = None
    ) -> CopyHandle:
        """Copy block ``src_ids[i]`` of a paged cache onto its block ``dst_ids[i]`` (same device; the id sets
        disjoint, ``dst_ids`` distinct), as one batched operation queued after the current stream's work."""
        pages = reference.as_page_tensors(cache)
        with self._ordered_side(stream):
            reference.move_blocks(pages, src_ids, dst_ids)
            event = self.record_event(stream)
        return CopyHandle(event, (pages, src_ids, dst_ids))

    def _gather(
        self, pages: list[torch.Tensor], block_ids: torch.Tensor, out: torch.Tensor, rows: torch.Tensor | None
    ) -> None:
        reference.gather_blocks(pages, block_ids, out, rows)

    def _scatter(
        self, src: torch.Tensor, pages: list[torch.Tensor], block_ids: torch.Tensor, rows: torch.Tensor | None,
        background: bool = False,
    ) -> None:
        reference.scatter_blocks(src, pages, block_ids, rows)

    # ------------------------------------------------------------------ 5-7. top-k, representations, scoring
    def topk_masked(
        self,
        scores: torch.Tensor,
        k: int | torch.Tensor,
        lengths: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row the k best eligible indices, ascending, -1 padded; see `reference.topk_masked`."""
        return reference.topk_masked(scores, k, lengths, exclude)

    def block_means(
        self, k_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float32 mean of K per block and KV head; see `reference.block_means`."""
        return reference.block_means(k_cache, block_ids, num_tokens)

    def block_scores(self, query: torch.Tensor, reps: torch.Tensor, cu_blocks: torch.Tensor) -> torch.Tensor:
        """GQA-reduced score of every block of every request; see `reference.block_scores`."""
        return reference.block_scores(query, reps, cu_blocks)

    def select_blocks(
        self,
        query: torch.Tensor,
        reps: torch.Tensor,
        cu_blocks: torch.Tensor,
        k: int | torch.Tensor,
        exclude: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scoring + top-k in one call (a backend may fuse them): the k best candidate blocks per request."""
        scores = self.block_scores(query, reps, cu_blocks)
        lengths = cu_blocks[1:] - cu_blocks[:-1]
        return self.topk_masked(scores, k, lengths.to(scores.device), exclude)

    # ------------------------------------------------------------------ 8. attention over a selection
    def sparse_decode_attention(
        self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, selection: BlockSelection
    ) -> torch.Tensor:
        """Decode attention of ``query`` ``[B, num_q_heads, head_dim]`` over each request's kept blocks.

        ``selection`` (a `BlockSelection`, validated when built) names the blocks: sink + selected + local window
        of the engine's table; caches ``[num_blocks, block_size, num_kv_heads, head_dim]``. Returns
        ``[B, num_q_heads, head_dim]`` in the query dtype; semantics: `reference.sparse_decode_attention`."""
        return reference.sparse_decode_attention(query, k_cache, v_cache, selection)
