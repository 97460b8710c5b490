"""ESA's retrieval on the device: block representations and top-k selection, through `ucm.device` primitives.

Owned by the ESA worker (`ucm.sparse.esa.esa.Esa`); also used as is by the ESA step of the tests and benchmark.
Selection runs on a side stream after the work already queued (the query and the KV it reads), and its result is
copied to a host buffer on that stream, so reading it never waits for the model's own compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ucm.device import Backend, CopyHandle


@dataclass
class Retrieval:
    """A selection in flight: ``handle`` completes when ``host_indices`` (ascending, -1 padded) is valid."""

    handle: CopyHandle
    host_indices: torch.Tensor
    keepalive: tuple


class EsaRetriever:
    """Block representations and selection for one worker (one side stream)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.stream = backend.new_stream() if backend.device.type != "cpu" else None

    def representations(self, key_view: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """Mean K per listed (full) block and KV head, stored in the cache dtype: ``[n, num_kv_heads, head_dim]``.

        Queued on the current stream (it reads the KV the layer has just written)."""
        return self.backend.block_means(key_view, block_ids).to(key_view.dtype)

    def submit(self, query: torch.Tensor, reps: torch.Tensor, k: int) -> Retrieval:
        """Score ``reps`` with one token's ``query`` ``[num_q_heads, head_dim]`` (GQA) and pick the top ``k``."""
        backend = self.backend
        cu_blocks = torch.tensor([0, reps.shape[0]], dtype=torch.int64)  # on the host: no sync in top-k
        host = backend.alloc_pinned(8 * max(k, 1)).view(torch.int64)[: max(k, 1)]
        host.fill_(-1)
        if self.stream is not None:
            backend.wait_event(backend.record_event(), self.stream)
        with backend.use_stream(self.stream):
            indices, _ = backend.select_blocks(query[None], reps, cu_blocks, k)
            got = indices.shape[1]
            if got:
                host[:got].copy_(indices[0], non_blocking=True)
            event = backend.record_event(self.stream)
        return Retrieval(CopyHandle(event, (indices, cu_blocks)), host, (query, reps))

    def select(self, query: torch.Tensor, reps: torch.Tensor, k: int) -> list[int]:
        """Synchronous `submit` + `result` (tests, benchmark)."""
        return self.result(self.submit(query, reps, k))

    @staticmethod
    def result(retrieval: Retrieval) -> list[int]:
        """The selected candidate indices, ascending (waits for the side stream if it has not finished)."""
        retrieval.handle.wait()
        return [i for i in retrieval.host_indices.tolist() if i >= 0]
