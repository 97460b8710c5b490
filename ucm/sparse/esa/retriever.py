"""ESA's retrieval on the device: block representations and top-k selection, through `ucm.device` primitives.

Owned by the ESA worker (`ucm.sparse.esa.esa.Esa`); also used as is by the ESA step of the tests and benchmark.
Selection runs on a side stream after the work already queued (the query and the KV it reads), and its result is
copied to a host buffer on that stream, so reading it never waits for the model's own compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate, pairwise

import numpy as np
import torch

from ucm.device import Backend, CopyHandle
from ucm.sparse.base import PackedKeys


@dataclass
class Retrieval:
    """A selection in flight: ``handle`` completes when ``host_indices`` (ascending, -1 padded) is valid."""

    handle: CopyHandle
    host_indices: torch.Tensor
    keepalive: tuple


class BatchRetrieval:
    """One selection in flight for several requests of one layer (one scoring + top-k launch for all of them).

    Row ``r`` belongs to the r-th request submitted; `row` waits for the side stream once and reads the host copy."""

    def __init__(self, handle: CopyHandle, host_indices: torch.Tensor, keepalive: tuple):
        self.handle = handle
        self.host_indices = host_indices  # [B, K] int64 pinned, -1 padded
        self.keepalive = keepalive
        self._rows: list[list[int]] | None = None
        self._arrays: np.ndarray | None = None

    def row(self, r: int) -> list[int]:
        """Request r's selected candidate indices, ascending."""
        if self._rows is None:
            self.handle.wait()
            self._rows = [[i for i in row if i >= 0] for row in self.host_indices.tolist()]
        return self._rows[r]

    def array(self, r: int) -> np.ndarray:
        """`row` as an int64 array (a copy)."""
        if self._arrays is None:
            self.handle.wait()
            self._arrays = self.host_indices.numpy().copy()
        row = self._arrays[r]
        return row[row >= 0]


def block_representations(
    backend: Backend, key_view: torch.Tensor | PackedKeys, block_ids: torch.Tensor, parts: int = 1
) -> torch.Tensor:
    """float32 means of K over each of ``parts`` near-equal token slices of every listed block (slice j: tokens
    ``[j * B // parts, (j + 1) * B // parts)``): ``[n * parts, kvh, d]``.

    ``key_view`` ``[num_blocks, B, kvh, d]`` (any strides); a slice of the token dimension is again such a view,
    so every backend's `block_means` serves (``parts`` launches, once per request and layer). `PackedKeys` are
    gathered into such a tensor first."""
    if not isinstance(key_view, torch.Tensor):  # PackedKeys
        key_view = key_view.read_blocks(block_ids)
        block_ids = torch.arange(key_view.shape[0], device=key_view.device)
    if parts == 1:
        return backend.block_means(key_view, block_ids)
    bounds = [j * key_view.shape[1] // parts for j in range(parts + 1)]
    means = [backend.block_means(key_view[:, a:b], block_ids) for a, b in pairwise(bounds)]
    return torch.stack(means, 1).flatten(0, 1)


#: bytes of representations packed into one selection launch (see `EsaRetriever.submit_batch`)
PACK_BYTES = 256 << 20


def _pack_groups(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` groups of items whose sizes sum to at most `limit` (an item larger: alone)."""
    groups: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            groups.append((start, i))
            start, total = i, 0
        total += size
    if sizes:
        groups.append((start, len(sizes)))
    return groups


def select_blocks(
    backend: Backend, query: torch.Tensor, reps: torch.Tensor, cu_blocks: torch.Tensor, k: int | torch.Tensor,
    parts: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`Backend.select_blocks` over blocks of ``parts`` representations each: a block scores as its best part.

    ``cu_blocks`` counts blocks (request b owns representation rows ``cu_blocks[b] * parts ...``). One part per
    block is the backend's own (possibly fused) selection."""
    if parts == 1:
        return backend.select_blocks(query, reps, cu_blocks, k)
    scores = backend.block_scores(query, reps, cu_blocks * parts)  # [B, max_blocks * parts], -inf padded
    best = scores.view(scores.shape[0], -1, parts).amax(-1)
    lengths = cu_blocks[1:] - cu_blocks[:-1]  # where cu_blocks is (the host: top-k needs no sync for it)
    return backend.topk_masked(best, k, lengths)


def attention_mass(
    query: torch.Tensor, key_view: torch.Tensor | PackedKeys, block_ids: torch.Tensor, chunk_blocks: int = 512
) -> torch.Tensor:
    """float32 ``[n]``: the attention mass the queries ``[w, num_q_heads, d]`` (GQA) pay to each listed block of
    ``key_view`` ``[num_blocks, B, kvh, d]``, softmax over the keys of all listed blocks with scale 1/sqrt(d),
    summed over queries and heads. Chunked over blocks (a log-sum-exp per block and chunk), so memory stays at
    ``w * heads * chunk_blocks * B`` floats whatever the prompt's length. Plain torch: every backend runs it."""
    w, heads, d = query.shape
    kvh = key_view.shape[2]
    q = query.float().view(w, kvh, heads // kvh, d) * d**-0.5
    lse = []
    for start in range(0, block_ids.numel(), chunk_blocks):
        ids = block_ids[start : start + chunk_blocks]
        if isinstance(key_view, torch.Tensor):
            keys = key_view.index_select(0, ids.to(key_view.device))
        else:  # PackedKeys
            keys = key_view.read_blocks(ids)
        logits = torch.einsum("wkgd,nbkd->wkgnb", q, keys.float())  # [w, kvh, groups, n, B]
        lse.append(torch.logsumexp(logits, dim=-1))
    block_lse = torch.cat(lse, dim=-1)  # [w, kvh, groups, n]
    total = torch.logsumexp(block_lse, dim=-1, keepdim=True)
    return torch.exp(block_lse - total).sum((0, 1, 2))


class EsaRetriever:
    """Block representations and selection for one worker (one side stream)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.stream = backend.new_stream() if backend.device.type != "cpu" else None

    def representations(
        self, key_view: torch.Tensor | PackedKeys, block_ids: torch.Tensor, parts: int = 1
    ) -> torch.Tensor:
        """Mean K per listed (full) block, part and KV head, in the cache dtype: ``[n * parts, num_kv_heads,
        head_dim]`` (block i's parts are rows ``i * parts ... i * parts + parts - 1``; see `block_representations`).

        Queued on the current stream (it reads the KV the layer has just written)."""
        return block_representations(self.backend, key_view, block_ids, parts).to(key_view.dtype)

    def submit(self, query: torch.Tensor, reps: torch.Tensor, k: int, parts: int = 1) -> Retrieval:
        """Score ``reps`` (``parts`` rows per block) with one token's ``query`` ``[num_q_heads, head_dim]`` (GQA)
        and pick the top ``k`` blocks."""
        backend = self.backend
        cu_blocks = torch.tensor([0, reps.shape[0] // parts], dtype=torch.int64)  # on the host: no sync in top-k
        host = backend.alloc_pinned(8 * max(k, 1)).view(torch.int64)[: max(k, 1)]
        host.fill_(-1)
        if self.stream is not None:
            backend.wait_event(backend.record_event(), self.stream)
        with backend.use_stream(self.stream):
            indices, _ = select_blocks(backend, query[None], reps, cu_blocks, k, parts)
            got = indices.shape[1]
            if got:
                host[:got].copy_(indices[0], non_blocking=True)
            event = backend.record_event(self.stream)
        return Retrieval(CopyHandle(event, (indices, cu_blocks)), host, (query, reps))

    def submit_batch(
        self, queries: torch.Tensor, reps: list[torch.Tensor], ks: list[int], parts: int = 1
    ) -> BatchRetrieval:
        """`submit` for several requests of one layer at once: ``queries`` ``[B, num_q_heads, head_dim]``, request
        b's representations ``reps[b]`` and its ``ks[b]``. Block counts and k stay on the host (no sync).

        The representations are packed into one tensor per launch, at most `PACK_BYTES` each (beyond one
        request's), each freed once launched: the copy is device memory outside the engine's KV budget (all layers
        of four 128K requests would be 2 GiB, held until the consume step)."""
        backend = self.backend
        if self.stream is not None:
            backend.wait_event(backend.record_event(), self.stream)
        picked: list[torch.Tensor] = []
        keep: list[tuple] = []
        with backend.use_stream(self.stream):
            for start, end in _pack_groups([r.numel() * r.element_size() for r in reps], PACK_BYTES):
                group = reps[start:end]
                cu_blocks = torch.tensor([0, *accumulate(r.shape[0] // parts for r in group)],
                                         dtype=torch.int64)
                k_rows = torch.tensor(ks[start:end], dtype=torch.int64)
                packed = group[0] if len(group) == 1 else torch.cat(group)
                indices, _ = select_blocks(backend, queries[start:end], packed, cu_blocks, k_rows, parts)
                picked.append(indices)
                # `packed` is not kept: made on the side stream, its memory is reused only by later work on that
                # stream (the next group's copy), after this launch; holding it until the consume step would keep
                # every group's copy alive
                keep.append((indices, cu_blocks, k_rows))
                del packed
            got = max(i.shape[1] for i in picked)  # max(min(k_b, blocks_b)): known on the host, no sync
            host = backend.alloc_pinned(8 * len(reps) * max(got, 1)).view(torch.int64).view(len(reps), max(got, 1))
            if got:
                if len(picked) > 1:
                    picked = [torch.nn.functional.pad(i, (0, got - i.shape[1]), value=-1) for i in picked]
                host.copy_(picked[0] if len(picked) == 1 else torch.cat(picked), non_blocking=True)
            else:
                host.fill_(-1)
            event = backend.record_event(self.stream)
        return BatchRetrieval(CopyHandle(event, (picked, keep)), host, (queries, reps))

    def submit_attention(
        self, queries: list[torch.Tensor], key_view: torch.Tensor | PackedKeys, block_ids: list[torch.Tensor],
        candidates: list[tuple[int, int]], ks: list[int],
    ) -> BatchRetrieval:
        """The initial selection by attention (`attention_mass`) for several requests of one layer: request b's
        queries ``queries[b]`` ``[w_b, heads, d]`` over its blocks ``block_ids[b]``; its candidates are the listed
        blocks ``candidates[b] = (start, end)`` and it keeps the ``ks[b]`` of most mass (indices from ``start``,
        ascending, as `submit_batch` returns them)."""
        backend = self.backend
        if self.stream is not None:
            backend.wait_event(backend.record_event(), self.stream)
        width = max([min(k, end - start) for k, (start, end) in zip(ks, candidates, strict=True)] + [1])
        host = backend.alloc_pinned(8 * len(ks) * width).view(torch.int64).view(len(ks), width)
        rows = []  # every row -1 padded to `width`: their copy fills the whole host buffer
        with backend.use_stream(self.stream):
            for query, ids, (start, end), k in zip(queries, block_ids, candidates, ks, strict=True):
                k = min(k, end - start)
                row = torch.full((width,), -1, dtype=torch.int64, device=query.device)
                if k > 0:
                    mass = attention_mass(query, key_view, ids)[start:end]
                    row[:k] = mass.topk(k).indices.sort().values
                rows.append(row)
            picked = torch.stack(rows)
            host.copy_(picked, non_blocking=True)
            event = backend.record_event(self.stream)
        return BatchRetrieval(CopyHandle(event, (picked,)), host, (queries, block_ids))

    def select(self, query: torch.Tensor, reps: torch.Tensor, k: int, parts: int = 1) -> list[int]:
        """Synchronous `submit` + `result` (tests, benchmark)."""
        return self.result(self.submit(query, reps, k, parts))

    @staticmethod
    def result(retrieval: Retrieval) -> list[int]:
        """The selected candidate indices, ascending (waits for the side stream if it has not finished)."""
        retrieval.handle.wait()
        return [i for i in retrieval.host_indices.tolist() if i >= 0]
