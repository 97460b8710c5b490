"""ESA's host time per decode step at an engine's shape, without the engine: where the hooks' Python goes.

On the GPU, ESA at 32K x 8 is host-bound (`bench/results/gpu_e2e_notes.md`): the hooks' host time per step is
about the step interval. The GPU is scarce; this reproduces the hooks' host work on the CPU at the same shape
(requests, context, layers, block size, ESA's defaults in boundary mode: queries staged, the retrieval cycle at
step edges, loads ahead) with the real `Esa` worker and scheduler and a real `UcmDram`, but pages of a few bytes
(one KV head of ``--head-dim``), so the copies cost little and ESA's own host work stands out. It drives the
worker as vLLM's hooks do (`execute_begin`, `step_view`, `forward_begin`, the per-layer hooks where the step needs
them, `execute_finished`) and the scheduler's budget (`block_plan`), and reports per decode step:

- host ms before the forward (`execute_begin`, `step_view`, the layer hooks, `forward_begin`) and after it
  (`execute_finished`: loads ahead, selections), their median and mean, and the consume steps' mean;
- with ``--breakdown``, the wall time per step inside each of ESA's phases and the store's load call (nested:
  a phase's time includes the ones it calls), measured without a profiler's overhead;
- with ``--profile``, the functions with the most own time (cProfile over the decode steps; it slows Python).

The copies are the CPU backend's (plain torch copies), not the GPU's driver calls: compare trees with it, not
with the GPU's absolute numbers.

    .venv/bin/python bench/esa_host_steps.py --requests 8 --context 32768 --steps 60 --profile \
        --out bench/results/esa_host_steps.json
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import platform
import pstats
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ucm.device import get_backend
from ucm.device.backend import Backend
from ucm.sparse.base import QueryShape, SparseBatch, SparseRequestStep, UcmSparseRole
from ucm.sparse.config import EsaConfig
from ucm.sparse.esa.esa import Esa
from ucm.store import create_store
from ucm.store.base import BlockPages
from ucm.store.dram import DramStore

#: (class, method) whose wall time `--breakdown` sums per step: ESA's retrieval cycle at the step edges (submit,
#: consume, loads ahead), what they call per (request, layer), the store's pinned loads and the device copies
BREAKDOWN = [(Esa, "_boundary_submit"), (Esa, "_consume_pending"), (Esa, "_consume_plan"), (Esa, "_prefetch"),
             (Esa, "_load_layers"), (Esa, "_delta"), (Esa, "_take_prefetch"), (Esa, "_wait_loads"),
             (Esa, "_view"), (DramStore, "load_pinned_layers"), (Backend, "scatter_blocks_many"),
             (Backend, "move_blocks")]


def time_methods(spent: dict[str, float]) -> None:
    """Wrap each `BREAKDOWN` method so that its wall time adds up in ``spent`` (this process only)."""
    for cls, name in BREAKDOWN:
        method = getattr(cls, name)

        @functools.wraps(method)
        def timed(*args, _method=method, _key=f"{cls.__name__}.{name}", **kwargs):
            started = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[_key] = spent.get(_key, 0.0) + time.perf_counter() - started

        setattr(cls, name, timed)


@dataclass
class _Request:
    request_id: str
    num_prompt_tokens: int
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    stored: set[int] = field(default_factory=set)

    @property
    def num_tokens(self) -> int:
        return max(self.num_prompt_tokens, self.num_computed_tokens + 1)


class HostSteps:
    """The worker and scheduler of one engine, its block pool and per-layer (k, v) caches, a UcmDram."""

    def __init__(self, args: argparse.Namespace):
        self.bs, self.layers = args.block_size, args.layers
        self.heads, self.d = args.q_heads, args.head_dim
        per_request = -(-(args.context + args.steps + args.block_size) // args.block_size) + 1
        num_blocks = args.requests * per_request + 2
        shape = (num_blocks, self.bs, 1, self.d)
        gen = torch.Generator().manual_seed(0)
        self.caches = [tuple(torch.randn((2, *shape), generator=gen).unbind(0)) for _ in range(self.layers)]
        self.free = list(range(num_blocks - 1, 0, -1))
        row = self.layers * 2 * self.bs * self.d * 4
        backend = get_backend("cpu")
        self.store = create_store("UcmDram", {"kv_block_size": row, "max_cache_size": (num_blocks + 8) * row},
                                  backend)
        config = EsaConfig(**args.esa)
        self.scheduler = Esa(config, UcmSparseRole.SCHEDULER, self.bs, offload=True)
        self.worker = Esa(config, UcmSparseRole.WORKER, self.bs, backend=backend, store=self.store, offload=True)
        self.names = [f"model.layers.{i}.attn" for i in range(self.layers)]
        self.worker.register_kv_caches(dict(zip(self.names, self.caches, strict=True)),
                                       query_shape=QueryShape(args.requests, self.heads, self.d, torch.float32))
        # a query of its own per request and step, around a fixed direction: ``query_noise`` sets how much of
        # the selection changes from one retrieval to the next (the churn that the loads follow)
        self.gen, self.noise = gen, args.query_noise
        self.base = torch.randn(args.requests, self.heads, self.d, generator=gen)
        self._names: dict[str, list[str]] = {}
        self.requests = [_Request(f"r{i}", args.context) for i in range(args.requests)]
        for req in self.requests:
            self.scheduler.request_begin(req)

    def _ids(self, req: _Request, blocks: int) -> list[str]:
        """Store ids of the request's first ``blocks`` blocks (one list per request, extended as it grows)."""
        ids = self._names.setdefault(req.request_id, [])
        while len(ids) < blocks:
            ids.append(f"{int(req.request_id[1:]):08x}{len(ids):024x}")
        return ids[:blocks]

    def step(self) -> dict:
        """One engine step of every request: host ms before the forward and after it, whether the hooks ran per
        layer, ESA's counters of the step."""
        steps, start = [], 0
        for req in self.requests:
            num_new = req.num_tokens - req.num_computed_tokens
            plan = self.scheduler.block_plan(req, num_new)
            while len(req.block_ids) < plan.num_total_blocks:
                req.block_ids.append(self.free.pop())
            for pos in plan.freed_positions:
                if pos >= plan.decode_blocks_from and pos not in req.stored:
                    continue  # filled in decode, no stored copy yet: stays resident
                if req.block_ids[pos]:
                    self.free.append(req.block_ids[pos])
                    req.block_ids[pos] = 0
            named = max(req.num_prompt_tokens, req.num_computed_tokens) // self.bs
            steps.append(SparseRequestStep(req.request_id, req.num_prompt_tokens, req.num_computed_tokens, num_new,
                                           list(req.block_ids), start, self._ids(req, named)))
            start += num_new
        batch = SparseBatch(steps, self.bs)
        width = max(len(r.block_ids) for r in self.requests)
        table = torch.tensor([r.block_ids + [0] * (width - len(r.block_ids)) for r in self.requests],
                             dtype=torch.int32)
        seq_lens = torch.tensor([s.seq_len for s in steps], dtype=torch.int32)
        started = time.perf_counter()
        self.worker.execute_begin(batch)
        view = self.worker.step_view(table, seq_lens)
        per_layer = view is None
        queries = self.base + self.noise * torch.randn(self.base.shape, generator=self.gen)
        n = len(steps)
        if per_layer:  # every token of the step gets one of the requests' queries
            query = queries[torch.arange(sum(s.num_scheduled_tokens for s in steps)) % n]
        for name, cache in zip(self.names, self.caches, strict=True):
            stage = self.worker.query_stage(name)
            if stage is not None:  # the engine's attention hook copies the step's query rows there
                stage[:n].copy_(queries[:n])
            if per_layer:
                self.worker.attention_begin(name, query, None, None, cache, table, seq_lens)
                self.worker.attention_finished(name, query, None, None, None, cache)
        self.worker.forward_begin()
        before = time.perf_counter() - started
        self._dump(steps)
        started = time.perf_counter()
        stats = self.worker.execute_finished()
        after = time.perf_counter() - started
        for req, s in zip(self.requests, steps, strict=True):
            req.num_computed_tokens = s.seq_len
        return {"before_ms": 1e3 * before, "after_ms": 1e3 * after, "per_layer": per_layer,
                "layer_blocks_loaded": stats.blocks_loaded, "of_which_ahead": stats.blocks_prefetched,
                "retrievals": stats.retrievals, "resident_share": round(stats.resident_blocks / stats.full_blocks, 4)
                if stats.full_blocks else None}

    def _dump(self, steps: list[SparseRequestStep]) -> None:
        """The connector's dumps: the prompt's blocks after the prefill (waited), each block that fills in decode."""
        for req, s in zip(self.requests, steps, strict=True):
            if s.finishes_prefill:
                positions = range(req.num_prompt_tokens // self.bs)
            else:
                positions = range(s.num_computed_tokens // self.bs, s.seq_len // self.bs)
            keep = [p for p in positions if p not in req.stored]
            if keep:
                ids = self._ids(req, s.seq_len // self.bs)
                slots = torch.tensor([req.block_ids[p] for p in keep], dtype=torch.int64)
                self.store.dump([ids[p] for p in keep], BlockPages(list(self.caches), slots)).wait()
                req.stored.update(keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--q-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=8)
    parser.add_argument("--query-noise", type=float, default=1.0,
                        help="share of a step's query that is random (the churn of the selections follows it)")
    parser.add_argument("--steps", type=int, default=60, help="decode steps (after the prefill step)")
    parser.add_argument("--warmup", type=int, default=10, help="decode steps left out of the statistics")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--breakdown", action="store_true", help="wall ms per step in ESA's phases (`BREAKDOWN`)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--profile-out", default="", help="write the cProfile stats (pstats) here")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    args.esa = {"sparse_ratio": 0.2, "retrieval_stride": 10}
    spent: dict[str, float] = {}
    if args.breakdown:
        time_methods(spent)
    engine = HostSteps(args)
    engine.step()  # the prefill of every request
    profiler = cProfile.Profile() if args.profile else None
    rows = []
    for i in range(args.steps):
        measured = i >= args.warmup
        if i == args.warmup:
            spent.clear()
        if profiler is not None and measured:
            profiler.enable()
        row = engine.step()
        if profiler is not None and measured:
            profiler.disable()
        if measured:
            rows.append(row)
    totals = [r["before_ms"] + r["after_ms"] for r in rows]
    heavy = [t for t, r in zip(totals, rows, strict=True) if r["per_layer"] or t > 3 * statistics.median(totals)]
    result = {
        "command": "python bench/esa_host_steps.py " + " ".join(sys.argv[1:]),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=Path(__file__).parent).stdout.strip() or None,
        "host": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                 "torch": torch.__version__},
        "shape": {k: getattr(args, k) for k in ("requests", "context", "layers", "block_size", "q_heads",
                                                 "head_dim")},
        "esa": args.esa, "query_noise": args.query_noise, "decode_steps": len(rows),
        "host_ms_per_step": {"mean": round(statistics.mean(totals), 3), "median": round(statistics.median(totals), 3),
                             "before_forward_mean": round(statistics.mean(r["before_ms"] for r in rows), 3),
                             "after_forward_mean": round(statistics.mean(r["after_ms"] for r in rows), 3),
                             "heavy_steps": len(heavy),
                             "heavy_steps_mean": round(statistics.mean(heavy), 3) if heavy else None},
        "layer_blocks_loaded_per_step": round(statistics.mean(r["layer_blocks_loaded"] for r in rows), 1),
        "of_which_ahead": round(statistics.mean(r["of_which_ahead"] for r in rows), 1),
        "resident_share": statistics.mean(r["resident_share"] or 0 for r in rows),
        "breakdown_ms_per_step": {k: round(1e3 * v / len(rows), 3)
                                  for k, v in sorted(spent.items(), key=lambda kv: -kv[1])} or None,
        "steps": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    }
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
        result["profile_tottime"] = text.getvalue()
    print(json.dumps({k: v for k, v in result.items() if k not in ("steps", "profile_tottime")}, indent=1))
    if profiler is not None:
        print(result["profile_tottime"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if profiler is not None and args.profile_out:
        profiler.dump_stats(args.profile_out)


if __name__ == "__main__":
    main()
