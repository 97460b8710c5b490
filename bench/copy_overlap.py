"""Loads from pinned host memory beside a running forward: copy kernel vs the copy engines (GB/s, compute slowdown).

ESA's loads ahead run while the engine decodes. The copy kernel (`ucm.kernels.block_copy`) reads host memory from
SMs and holds them for as long as PCIe takes, which slowed the decode steps it overlapped (gpu_e2e_notes.md); the
copy engines (`ucm.backends.cuda.batch_dma`, the driver's batched memcpy) need no SM. This measures, on a
Llama-3-8B-shaped cache (32 layers, K and V pages of 16 tokens x 8 heads x 128, bf16) and a UcmDram-like arena
(one row per block, every layer's pages concatenated), one load of ``--blocks`` blocks per layer from random rows
into random slots, each layer's sub-range of the row (ESA's per-layer deltas):

- alone: GB/s and host ms to queue the load, per method;
- beside a compute proxy on the default stream (bf16 GEMMs over ~1 GiB of weights, HBM-bound like a decode step):
  the proxy's time with and without the load, and the load's end-to-end GB/s.

Methods: ``kernel`` (full grid, the consume step's loads), ``kernel_bg`` (16 programs, the background kernel),
``dma`` (copy engines), ``dma_bg`` (copy engines with the prefer-overlap flag). Every load is checked against the
reference copy once.

    python bench/copy_overlap.py --out-dir bench/results        # needs a CUDA GPU and an installed checkout
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from ucm.backends.cuda import batch_dma

from ucm.device import get_backend, reference

LAYERS, BLOCK_TOKENS, KV_HEADS, HEAD_DIM = 32, 16, 8, 128
METHODS = {"kernel": ("zero_copy", False), "kernel_bg": ("zero_copy", True), "dma": ("dma", False),
           "dma_bg": ("dma", True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=160, help="blocks loaded per layer")
    parser.add_argument("--cache-blocks", type=int, default=2048, help="blocks per layer cache")
    parser.add_argument("--arena-rows", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out-dir", default="")
    args = parser.parse_args()
    backend = get_backend("cuda")
    device = backend.device
    page = (args.cache_blocks, BLOCK_TOKENS, KV_HEADS, HEAD_DIM)
    caches = [(torch.zeros(page, dtype=torch.bfloat16, device=device),
               torch.zeros(page, dtype=torch.bfloat16, device=device)) for _ in range(LAYERS)]
    layer_bytes = reference.bytes_per_block(reference.as_page_tensors(caches[0]))
    arena = torch.randint(0, 256, (args.arena_rows, LAYERS * layer_bytes), dtype=torch.uint8).pin_memory()
    gen = torch.Generator().manual_seed(0)
    loads = [(torch.randperm(args.cache_blocks, generator=gen)[: args.blocks],
              torch.randperm(args.arena_rows, generator=gen)[: args.blocks]) for _ in range(LAYERS)]
    nbytes = LAYERS * args.blocks * layer_bytes
    side = backend.new_stream()

    def load(method: str) -> float:
        mode, background = METHODS[method]
        backend.host_copy = mode
        started = time.perf_counter()
        handles = [backend.scatter_blocks(arena[:, i * layer_bytes : (i + 1) * layer_bytes], caches[i], ids, rows,
                                          stream=side, background=background)
                   for i, (ids, rows) in enumerate(loads)]
        issued = time.perf_counter() - started
        for h in handles:
            h.wait()
        return issued

    # correctness of every method against the reference copy, on layer 0
    correct = {}
    for method in METHODS:
        for k, v in caches:
            k.zero_(), v.zero_()
        load(method)
        want = [p.cpu().clone().zero_() for p in reference.as_page_tensors(caches[0])]
        ids, rows = loads[0]
        reference.scatter_blocks(arena[:, :layer_bytes].contiguous(), want, ids, rows)
        correct[method] = all(torch.equal(g.cpu(), w) for g, w in zip(reference.as_page_tensors(caches[0]), want,
                                                                       strict=True))

    weights = [torch.randn(4096, 14336, dtype=torch.bfloat16, device=device) for _ in range(9)]
    x = torch.randn(8, 4096, dtype=torch.bfloat16, device=device)

    def compute() -> None:
        for w in weights:
            for _ in range(4):
                torch.mm(x, w)

    def timed(fn, reps: int) -> float:
        fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return statistics.median(samples)

    compute_ms = timed(compute, args.reps)
    rows_out = []
    for method in METHODS:
        alone, issue = [], []
        for _ in range(args.reps):
            torch.cuda.synchronize()
            started = time.perf_counter()
            issue.append(load(method))
            alone.append(time.perf_counter() - started)
        beside, load_wall = [], []
        for _ in range(args.reps):
            torch.cuda.synchronize()
            started = time.perf_counter()
            mode, background = METHODS[method]
            backend.host_copy = mode
            handles = [backend.scatter_blocks(arena[:, i * layer_bytes : (i + 1) * layer_bytes], caches[i], ids,
                                              rows, stream=side, background=background)
                       for i, (ids, rows) in enumerate(loads)]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            compute()
            end.record()
            for h in handles:
                h.wait()
            load_wall.append(time.perf_counter() - started)
            end.synchronize()
            beside.append(start.elapsed_time(end))
        row = {
            "method": method, "correct": correct[method], "bytes": nbytes,
            "alone_GBps": round(nbytes / statistics.median(alone) / 1e9, 2),
            "issue_ms": round(1000 * statistics.median(issue), 3),
            "compute_ms_alone": round(compute_ms, 3),
            "compute_ms_beside_load": round(statistics.median(beside), 3),
            "compute_slowdown": round(statistics.median(beside) / compute_ms, 3),
            "load_GBps_beside_compute": round(nbytes / statistics.median(load_wall) / 1e9, 2),
        }
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    backend.host_copy = "zero_copy"
    meta = {"command": "python bench/copy_overlap.py " + " ".join(sys.argv[1:]),
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "blocks_per_layer": args.blocks, "layer_block_bytes": layer_bytes, "layers": LAYERS,
            "compute_proxy": "36 bf16 GEMMs [8, 4096] x [4096, 14336] (9 weight tensors, 1 GiB)",
            "copy_engines_unavailable": batch_dma.unavailable_reason(), "copy_engine_calls": batch_dma.calls}
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "copy_overlap.json"), "w") as f:
            json.dump({**meta, "rows": rows_out}, f, indent=1)
        lines = ["# Loads beside a running forward: copy kernel vs copy engines", "",
                 f"GPU: {meta['gpu']}; torch {meta['torch']}; {args.blocks} blocks x {LAYERS} layers "
                 f"({nbytes / 2**20:.0f} MiB) from a pinned arena; proxy: {meta['compute_proxy']}.", "",
                 f"Command: `{meta['command']}`", "",
                 "| method | correct | alone GB/s | host ms to queue | proxy ms alone | proxy ms beside the load | "
                 "proxy slowdown | load GB/s beside the proxy |", "|---|---|---|---|---|---|---|---|"]
        for r in rows_out:
            lines.append(f"| {r['method']} | {r['correct']} | {r['alone_GBps']} | {r['issue_ms']} | "
                         f"{r['compute_ms_alone']} | {r['compute_ms_beside_load']} | {r['compute_slowdown']} | "
                         f"{r['load_GBps_beside_compute']} |")
        with open(os.path.join(args.out_dir, "copy_overlap.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
