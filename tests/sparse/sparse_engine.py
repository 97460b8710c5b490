"""A miniature engine that drives `Esa` exactly like the vLLM hooks do (for the ESA worker/scheduler tests).

It owns a block pool, per-layer (k, v) paged caches ([num_blocks, block_size, num_kv_heads, head_dim], block 0
is the null block), applies the scheduler's `block_plan` (freed blocks are poisoned with NaN, as if another
request had reused them; a block filled in decode only once its dump is stored, as the connector's budget does),
dumps the prompt blocks of every layer to a real store after prefill and each block that fills in decode after
its step (except the positions in ``skip_dump``: failed dumps), and per step calls
execute_begin -> per layer attention_begin / KV write / attention / attention_finished -> execute_finished.
The ground truth K/V of every token is a pure function of (request, layer, position), so every block an
attention reads can be identified, and a recomputed (preempted) request writes the same values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ucm.device import get_backend
from ucm.sparse.attention import paged_decode_attention
from ucm.sparse.base import QueryShape, SparseBatch, SparseRequestStep, SparseStepStats, UcmSparseRole
from ucm.sparse.config import EsaConfig
from ucm.sparse.esa.esa import Esa
from ucm.store.base import BlockPages


@dataclass
class Req:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    seed: int
    num_computed_tokens: int = 0
    num_output: int = 0
    block_ids: list[int] = field(default_factory=list)
    resumed: bool = False
    stored: set[int] = field(default_factory=set)  # positions whose dump is in the store
    held: set[int] = field(default_factory=set)  # freed by the plan but kept: no stored copy

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output


@dataclass
class LayerRecord:
    """What one decode row of one layer attended: logical block positions (in table order) and the output."""

    positions: list[int]
    output: torch.Tensor
    _dense: Callable[[], torch.Tensor]

    @property
    def dense_output(self) -> torch.Tensor:
        """Dense attention over the request's true KV (computed when a test asks for it)."""
        return self._dense()


class MiniEngine:
    def __init__(
        self,
        config: EsaConfig,
        *,
        offload: bool,
        store=None,
        num_layers: int = 3,
        num_blocks: int = 256,
        block_size: int = 4,
        num_q_heads: int = 4,
        num_kv_heads: int = 2,
        head_dim: int = 16,
        needle_scale: float = 0.0,
        skip_dump: set[int] | None = None,
        needle_blocks: list[int] | None = None,
        stage_queries: bool = False,
        stage_rows: int = 16,
        backend=None,
    ):
        self.bs, self.hq, self.hkv, self.d = block_size, num_q_heads, num_kv_heads, head_dim
        self.num_layers = num_layers
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(num_layers)]
        self.free = list(range(num_blocks - 1, 0, -1))
        self.store = store
        self.needle_scale = needle_scale
        self.skip_dump = skip_dump or set()
        self.needle_blocks = needle_blocks
        self.scheduler = Esa(config, UcmSparseRole.SCHEDULER, block_size, offload=offload)
        self.worker = Esa(config, UcmSparseRole.WORKER, block_size, backend=backend or get_backend("cpu"),
                          store=store, offload=offload)
        self.layer_names = [f"model.layers.{i}.attn" for i in range(num_layers)]
        # stage_queries: the engine copies each layer's query rows into the worker's stage, as vLLM's attention hook
        # does (`SparseWorkerRuntime.stage_query`): ESA then runs its retrieval cycle at step boundaries
        shape = QueryShape(stage_rows, num_q_heads, head_dim, torch.float32) if stage_queries else None
        self.stage_queries = stage_queries
        self.worker.register_kv_caches(dict(zip(self.layer_names, self.caches, strict=True)), query_shape=shape)
        self.reqs: dict[str, Req] = {}
        self._truth: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.history: list[dict[str, list[LayerRecord]]] = []
        self.dumps: list[tuple[Req, list[int], object]] = []  # decode dumps in flight: (request, positions, task)
        self.stats: list[SparseStepStats] = []

    # ------------------------------------------------------------------ ground truth
    def direction(self, req: Req, layer: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(req.seed * 1000 + layer)
        u = torch.randn(self.hkv, self.d, generator=gen)
        return u / u.norm(dim=-1, keepdim=True)

    def needles(self, req: Req) -> list[int]:
        """Logical blocks planted to match the request's query direction (middle of the candidate range, or
        ``needle_blocks``: generated blocks may be needles too)."""
        if self.needle_blocks is not None:
            return list(self.needle_blocks)
        blocks = req.num_prompt_tokens // self.bs
        return [blocks // 3, blocks // 2 + 1]

    def truth(self, req: Req, layer: int, positions: range) -> tuple[torch.Tensor, torch.Tensor]:
        """True K and V of these token positions (memoized per request and layer)."""
        key = (req.seed, layer)
        k_all, v_all = self._truth.get(key, (torch.empty(0, self.hkv, self.d), torch.empty(0, self.hkv, self.d)))
        if positions.stop > k_all.shape[0]:
            k_new, v_new = self._make_truth(req, layer, range(k_all.shape[0], positions.stop))
            k_all, v_all = torch.cat([k_all, k_new]), torch.cat([v_all, v_new])
            self._truth[key] = (k_all, v_all)
        return k_all[positions.start : positions.stop], v_all[positions.start : positions.stop]

    def _make_truth(self, req: Req, layer: int, positions: range) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = [], []
        for pos in positions:
            gen = torch.Generator().manual_seed(hash((req.seed, layer, pos)) % (2**31))
            keys.append(torch.randn(self.hkv, self.d, generator=gen))
            values.append(torch.randn(self.hkv, self.d, generator=gen))
        k, v = torch.stack(keys), torch.stack(values)
        if self.needle_scale:
            for i, pos in enumerate(positions):
                if pos // self.bs in self.needles(req) and (self.needle_blocks or pos < req.num_prompt_tokens):
                    k[i] = 0.2 * k[i] + self.needle_scale * self.direction(req, layer)
        return k, v

    def query(self, req: Req, layer: int, pos: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(hash((req.seed, layer, pos, 7)) % (2**31))
        q = torch.randn(self.hq, self.d, generator=gen)
        if self.needle_scale:
            q = 0.3 * q + 3.0 * self.direction(req, layer).repeat_interleave(self.hq // self.hkv, 0)
        return q

    def hashes(self, req: Req, blocks: int | None = None) -> list[str]:
        """Store ids of the first ``blocks`` blocks (default: the full prompt blocks)."""
        count = req.num_prompt_tokens // self.bs if blocks is None else blocks
        return [f"{req.seed:08x}{pos:024x}" for pos in range(count)]

    # ------------------------------------------------------------------ engine
    def add(self, req_id: str, prompt: int, max_tokens: int = 40, seed: int | None = None) -> Req:
        req = Req(req_id, prompt, max_tokens, seed if seed is not None else len(self.reqs) + 1)
        self.reqs[req_id] = req
        self.scheduler.request_begin(req)
        return req

    def preempt(self, req_id: str) -> None:
        req = self.reqs[req_id]
        for block in req.block_ids:
            self._release(block)
        req.block_ids, req.num_computed_tokens, req.resumed = [], 0, True

    def finish(self, req_id: str) -> None:
        req = self.reqs.pop(req_id)
        for block in req.block_ids:
            self._release(block)
        self.scheduler.request_finished(req_id)
        self.worker.request_finished(req_id)

    def _release(self, block: int) -> None:
        if block:
            for k, v in self.caches:
                k[block].fill_(float("nan"))
                v[block].fill_(float("nan"))
            self.free.append(block)

    def step(self, req_ids: list[str] | None = None) -> dict[str, list[LayerRecord]]:
        reqs = [self.reqs[r] for r in (req_ids or list(self.reqs))]
        for req, positions, task in [d for d in self.dumps if d[2].done()]:  # confirmed dumps (the connector's)
            self.dumps.remove((req, positions, task))
            failed = set(task.failed_ids)
            req.stored.update(p for p in positions if self.hashes(req, p + 1)[p] not in failed)
        steps, start = [], 0
        for req in reqs:  # scheduler: budget, then allocation of new blocks
            num_new = req.num_tokens - req.num_computed_tokens
            plan = self.scheduler.block_plan(req, num_new)
            while len(req.block_ids) < plan.num_total_blocks:
                req.block_ids.append(self.free.pop())
            req.held = set()
            for pos in plan.freed_positions:
                if pos >= plan.decode_blocks_from and pos not in req.stored:
                    req.held.add(pos)  # filled in decode, no stored copy: stays resident
                    continue
                self._release(req.block_ids[pos])
                req.block_ids[pos] = 0
            assert sum(1 for b in req.block_ids if b) == plan.num_blocks + len(req.held)
            named = max(req.num_prompt_tokens, req.num_computed_tokens) // self.bs
            steps.append(SparseRequestStep(req.request_id, req.num_prompt_tokens, req.num_computed_tokens, num_new,
                                           list(req.block_ids), start,
                                           self.hashes(req, named) if self.store is not None else None, req.resumed))
            start += num_new
        batch = SparseBatch(steps, self.bs)
        width = max(len(r.block_ids) for r in reqs)
        table = torch.tensor([r.block_ids + [0] * (width - len(r.block_ids)) for r in reqs], dtype=torch.int32)
        seq_lens = torch.tensor([s.seq_len for s in steps], dtype=torch.int32)
        self.worker.execute_begin(batch)
        self.worker.forward_begin()  # the step's inputs are queued (vLLM's model-runner hook)
        records: dict[str, list[LayerRecord]] = {r.request_id: [] for r in reqs}
        for layer, name in enumerate(self.layer_names):
            k_cache, v_cache = self.caches[layer]
            query = torch.cat([
                torch.stack([self.query(r, layer, p) for p in range(s.num_computed_tokens, s.seq_len)])
                for r, s in zip(reqs, steps, strict=True)
            ])
            stage = self.worker.query_stage(name) if self.stage_queries else None
            if stage is not None:
                n = min(stage.shape[0], query.shape[0])
                stage[:n].copy_(query[:n])
            view = self.worker.attention_begin(name, query, None, None, self.caches[layer], table, seq_lens)
            for r, s in zip(reqs, steps, strict=True):  # the KV write of this step (inside vLLM's attention)
                k_new, v_new = self.truth(r, layer, range(s.num_computed_tokens, s.seq_len))
                for i, pos in enumerate(range(s.num_computed_tokens, s.seq_len)):
                    k_cache[r.block_ids[pos // self.bs], pos % self.bs] = k_new[i]
                    v_cache[r.block_ids[pos // self.bs], pos % self.bs] = v_new[i]
            use_table = view.block_table if view is not None else table
            use_lens = view.seq_lens if view is not None else seq_lens
            for row, (r, s) in enumerate(zip(reqs, steps, strict=True)):
                if s.num_scheduled_tokens != 1:
                    continue
                q = query[s.query_start : s.query_start + 1]
                out = paged_decode_attention(q, k_cache, v_cache, use_table[row : row + 1], use_lens[row : row + 1])
                positions = self._identify(r, layer, use_table[row], int(use_lens[row]), s.seq_len)
                tk, tv = self.truth(r, layer, range(s.seq_len))

                def dense(q=q, tk=tk, tv=tv, n=s.seq_len) -> torch.Tensor:
                    table1 = torch.zeros(1, 1, dtype=torch.int32)
                    return paged_decode_attention(q, tk[None], tv[None], table1, torch.tensor([n]))[0]

                records[r.request_id].append(LayerRecord(positions, out[0], dense))
            self.worker.attention_finished(name, query, None, None, None, self.caches[layer])
        for r, s in zip(reqs, steps, strict=True):  # the connector's dumps (all layers): prompt, then decode blocks
            if self.store is None:
                continue
            if s.finishes_prefill:
                positions = range(r.num_prompt_tokens // self.bs)
            elif s.is_decode:
                positions = range(max(r.num_prompt_tokens // self.bs, s.num_computed_tokens // self.bs),
                                  s.seq_len // self.bs)
            else:
                continue
            keep = [p for p in positions if p not in self.skip_dump and p not in r.stored]
            if keep:
                slots = torch.tensor([r.block_ids[p] for p in keep], dtype=torch.int64)
                ids = self.hashes(r, s.seq_len // self.bs)
                task = self.store.dump([ids[p] for p in keep], BlockPages(list(self.caches), slots))
                if s.finishes_prefill:
                    task.wait()
                    r.stored.update(keep)
                else:  # asynchronous: stored once confirmed (polled at a later step)
                    self.dumps.append((r, keep, task))
        self.stats.append(self.worker.execute_finished())
        for r, s in zip(reqs, steps, strict=True):
            r.num_computed_tokens = s.seq_len
            r.num_output = max(r.num_output, s.seq_len + 1 - r.num_prompt_tokens)
            r.resumed = False
        self.history.append(records)
        return records

    def _identify(self, req: Req, layer: int, row: torch.Tensor, length: int, seq_len: int) -> list[int]:
        """Logical position of every block a table row lists; asserts each holds exactly its true KV."""
        n = -(-length // self.bs)
        tk, tv = self.truth(req, layer, range(seq_len))
        k_cache, v_cache = self.caches[layer]
        by_content = {}
        for p in range(-(-seq_len // self.bs)):
            span = slice(p * self.bs, (p + 1) * self.bs)
            by_content[(tk[span].numpy().tobytes(), tv[span].numpy().tobytes())] = p
        positions = []
        for i, block in enumerate(row[:n].tolist()):
            valid = self.bs if i < n - 1 else length - (n - 1) * self.bs
            if i == n - 1:  # the block being written: compare its valid tokens with the request's last block
                last = -(-seq_len // self.bs) - 1
                span = slice(last * self.bs, last * self.bs + valid)
                assert torch.equal(k_cache[block, :valid], tk[span]) and torch.equal(v_cache[block, :valid], tv[span])
                positions.append(last)
                continue
            got = (k_cache[block].numpy().tobytes(), v_cache[block].numpy().tobytes())
            assert got in by_content, f"{req.request_id} layer {layer}: block {block} holds no block of it (garbage)"
            positions.append(by_content[got])
        assert len(set(positions)) == len(positions), positions
        return positions
