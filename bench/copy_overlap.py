"""Loads from pinned host memory beside a running forward: copy kernel vs the copy engines (GB/s, compute slowdown).

ESA's loads ahead run while the engine decodes. The copy kernel (`ucm.kernels.block_copy`) reads host memory from
SMs and holds them for as long as PCIe takes, which slowed the decode steps it overlapped (gpu_e2e_notes.md); the
copy engines (`ucm.backends.cuda.batch_dma`, the driver's batched memcpy) need no SM. This measures, on a
Llama-3-8B-shaped cache (32 layers, K and V pages of 16 tokens x 8 heads x 128, bf16) and a UcmDram-like arena
(one row per block, every layer's pages concatenated), one load of ``--blocks`` blocks per layer from random rows
into random slots, each layer's sub-range of the row (ESA's per-layer deltas):

- alone: GB/s on the device and host ms to queue the load, per method;
- beside a compute proxy on the default stream (bf16 GEMMs over 1 GiB of weights, HBM-bound like a decode step)
  started together with the load: the proxy's time with and without the load, and the load's GB/s;
- the same proxy started by a small H2D copy of its input from pinned memory (as a vLLM step starts by copying its
  input ids, positions and block tables), queued once the load is already moving: whether the step's own input
  copy waits behind the load on the copy engines (it would not with the copy kernel);
- beside the host work of a step: the host time the main thread takes to launch 256 small kernels while another
  thread queues the load (and that thread's queuing time): whether queuing holds up a step's launches (the
  driver's lock or the GIL), which a thread of its own would not hide.

Methods: ``kernel`` (full grid, the consume step's loads), ``kernel_bg`` (16 programs, the background kernel),
``dma`` (copy engines, one copy per page), ``dma_bg`` (copy engines with the prefer-overlap flag), ``dma_any`` (copy
engines, source access order "any"); each layer's cache is one allocation ``[2, blocks, ...]``, as vLLM's
FLASH_ATTN layer is; ``dma_step`` and ``kernel_step`` queue every layer's load as one `scatter_blocks_many` call
in the background, as ESA's loads ahead are (copy engines; the copy-list kernel: one launch). Every load is
checked against the reference copy once. The default stream sleeps while a load is queued, so the device times are
the copies' own (queuing a layer's load costs host time that would otherwise bound them: ``issue_ms``).

    python bench/copy_overlap.py --out-dir bench/results        # needs a CUDA GPU and an installed checkout
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import torch
from ucm.backends.cuda import batch_dma

from ucm.device import get_backend, reference

LAYERS, BLOCK_TOKENS, KV_HEADS, HEAD_DIM = 32, 16, 8, 128
#: method -> (host_copy, background_copy, background, copy engines' source access order)
METHODS = {"kernel": ("zero_copy", "kernel", False, "stream"), "kernel_bg": ("zero_copy", "kernel", True, "stream"),
           "dma": ("dma", "dma", False, "stream"), "dma_bg": ("zero_copy", "dma", True, "stream"),
           "dma_any": ("dma", "dma", False, "any"),
           "dma_step": ("zero_copy", "dma", True, "stream"), "kernel_step": ("zero_copy", "kernel", True, "stream")}
#: methods that queue all layers as one `scatter_blocks_many` call (as ESA's loads ahead are), not one call each
STEP_METHODS = {"dma_step", "kernel_step"}
#: small kernels the main thread launches while another thread queues a load (`launch_ms`)
LAUNCHES = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=160, help="blocks loaded per layer")
    parser.add_argument("--cache-blocks", type=int, default=2048, help="blocks per layer cache")
    parser.add_argument("--arena-rows", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--compute-rounds", type=int, default=12, help="passes over the proxy's 9 weights")
    parser.add_argument("--hold-ms", type=float, default=40, help="default-stream sleep while the load is queued")
    parser.add_argument("--out-dir", default="")
    args = parser.parse_args()
    backend = get_backend("cuda")
    device = backend.device
    page = (args.cache_blocks, BLOCK_TOKENS, KV_HEADS, HEAD_DIM)
    caches = [tuple(torch.zeros((2, *page), dtype=torch.bfloat16, device=device).unbind(0)) for _ in range(LAYERS)]
    layer_bytes = reference.bytes_per_block(reference.as_page_tensors(caches[0]))
    arena = torch.randint(0, 256, (args.arena_rows, LAYERS * layer_bytes), dtype=torch.uint8).pin_memory()
    gen = torch.Generator().manual_seed(0)
    loads = [(torch.randperm(args.cache_blocks, generator=gen)[: args.blocks],
              torch.randperm(args.arena_rows, generator=gen)[: args.blocks]) for _ in range(LAYERS)]
    nbytes = LAYERS * args.blocks * layer_bytes
    side = backend.new_stream()

    def queue(method: str) -> tuple[float, list]:
        """Queue every layer's load; (host seconds it took, the handles)."""
        backend.host_copy, backend.background_copy, background, backend.dma_source_order = METHODS[method]
        started = time.perf_counter()
        jobs = [(arena[:, i * layer_bytes : (i + 1) * layer_bytes], caches[i], ids, rows)
                for i, (ids, rows) in enumerate(loads)]
        if method in STEP_METHODS:
            handles = [backend.scatter_blocks_many(jobs, stream=side, background=background)]
        else:
            handles = [backend.scatter_blocks(*job, stream=side, background=background) for job in jobs]
        return time.perf_counter() - started, handles

    # correctness of every method against the reference copy, on layer 0 (bytes: random bf16 bits hold NaNs)
    correct = {}
    calls = {}
    for method in METHODS:
        for k, v in caches:
            k.zero_(), v.zero_()
        before = batch_dma.calls
        for h in queue(method)[1]:
            h.wait()
        calls[method] = batch_dma.calls - before
        want = [p.cpu().clone().zero_() for p in reference.as_page_tensors(caches[0])]
        ids, rows = loads[0]
        reference.scatter_blocks(arena[:, :layer_bytes].contiguous(), want, ids, rows)
        correct[method] = all(torch.equal(g.cpu().view(torch.uint8), w.view(torch.uint8))
                              for g, w in zip(reference.as_page_tensors(caches[0]), want, strict=True))

    weights = [torch.randn(4096, 14336, dtype=torch.bfloat16, device=device) for _ in range(9)]
    x = torch.randn(8, 4096, dtype=torch.bfloat16, device=device)

    x_host = torch.randn(8, 4096, dtype=torch.bfloat16).pin_memory()

    def compute(with_input: bool = False) -> None:
        if with_input:
            x.copy_(x_host, non_blocking=True)
        for _ in range(args.compute_rounds):
            for w in weights:
                torch.mm(x, w)

    def event() -> torch.Event:
        return torch.Event(device=device, enable_timing=True)

    def measure(method: str | None, with_compute: bool, with_input: bool = False) -> tuple[float, float, float]:
        """(host ms to queue the load, load ms on the device, compute ms): the default stream sleeps first so the
        whole load is queued before the copies and the compute start together; ``with_input``: the compute starts
        0.5 ms later with its input copy (the load is moving by then) and is timed from there."""
        torch.cuda.synchronize()
        torch.cuda._sleep(int(args.hold_ms * 1.5e6))  # ~1.5 GHz clocks: longer than queuing takes
        start, end, load_end = event(), event(), event()
        start.record()
        issue, handles = queue(method) if method else (0.0, [])
        if with_input:
            torch.cuda._sleep(int(0.5 * 1.5e6))
            start = event()
            start.record()
        if with_compute:
            compute(with_input)
        end.record()
        if handles:
            load_end.record(side)
        torch.cuda.synchronize()
        load_ms = start.elapsed_time(load_end) if handles else 0.0
        return 1000 * issue, load_ms, start.elapsed_time(end) if with_compute else 0.0

    tiny = torch.zeros(16, device=device)

    def launch_ms(method: str | None) -> tuple[float, float]:
        """(host ms the main thread takes to launch `LAUNCHES` small kernels, host ms another thread takes to queue
        the load meanwhile): whether queuing a load holds up the launches of a step running beside it (the
        driver's lock and the GIL, not the device: both wait behind a sleep)."""
        torch.cuda.synchronize()
        torch.cuda._sleep(int(args.hold_ms * 1.5e6))
        took = [0.0]
        worker = None
        if method:
            def run() -> None:
                took[0] = queue(method)[0]

            worker = threading.Thread(target=run)
            worker.start()
        started = time.perf_counter()
        for _ in range(LAUNCHES):
            tiny.add_(1)
        launched = time.perf_counter() - started
        if worker is not None:
            worker.join()
        torch.cuda.synchronize()
        return 1000 * launched, 1000 * took[0]

    compute_ms = statistics.median(measure(None, True)[2] for _ in range(args.reps))
    input_ms = statistics.median(measure(None, True, True)[2] for _ in range(args.reps))
    launches_alone = statistics.median(launch_ms(None)[0] for _ in range(args.reps))
    rows_out = []
    for method in METHODS:
        alone = [measure(method, False) for _ in range(args.reps)]
        beside = [measure(method, True) for _ in range(args.reps)]
        alone_ms = statistics.median(a[1] for a in alone)
        threaded = [launch_ms(method) for _ in range(args.reps)]
        beside_compute = statistics.median(b[2] for b in beside)
        beside_input = statistics.median(measure(method, True, True)[2] for _ in range(args.reps))
        row = {
            "method": method, "correct": correct[method], "copy_engine_calls": calls[method],
            "bytes": nbytes,
            "alone_GBps": round(nbytes / alone_ms / 1e6, 2),
            "issue_ms": round(statistics.median(a[0] for a in alone), 3),
            "launch_ms_alone": round(launches_alone, 3),
            "launch_ms_beside_queue": round(statistics.median(t[0] for t in threaded), 3),
            "queue_ms_on_a_thread": round(statistics.median(t[1] for t in threaded), 3),
            "compute_ms_alone": round(compute_ms, 3),
            "compute_ms_beside_load": round(beside_compute, 3),
            "compute_slowdown": round(beside_compute / compute_ms, 3),
            "load_GBps_beside_compute": round(nbytes / statistics.median(b[1] for b in beside) / 1e6, 2),
            "input_compute_ms_alone": round(input_ms, 3),
            "input_compute_ms_beside_load": round(beside_input, 3),
        }
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    backend.host_copy, backend.background_copy, backend.dma_source_order = "zero_copy", "dma", "stream"
    meta = {"command": "python bench/copy_overlap.py " + " ".join(sys.argv[1:]),
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "blocks_per_layer": args.blocks, "layer_block_bytes": layer_bytes, "layers": LAYERS,
            "compute_proxy": f"{9 * args.compute_rounds} bf16 GEMMs [8, 4096] x [4096, 14336] (9 weights, 1 GiB)",
            "copy_engines_unavailable": batch_dma.unavailable_reason()}
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "copy_overlap.json"), "w") as f:
            json.dump({**meta, "rows": rows_out}, f, indent=1)
        lines = ["# Loads beside a running forward: copy kernel vs copy engines", "",
                 f"GPU: {meta['gpu']}; torch {meta['torch']}; {args.blocks} blocks x {LAYERS} layers "
                 f"({nbytes / 2**20:.0f} MiB) from a pinned arena; proxy: {meta['compute_proxy']}.", "",
                 f"Command: `{meta['command']}`", "",
                 "| method | correct | alone GB/s | host ms to queue | proxy ms alone | proxy ms beside the load | "
                 "proxy slowdown | load GB/s beside the proxy | host ms for 256 launches, alone / while a thread "
                 "queues the load | that thread's ms to queue | proxy with its input copy, ms alone / beside the "
                 "load |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows_out:
            lines.append(f"| {r['method']} | {r['correct']} | {r['alone_GBps']} | {r['issue_ms']} | "
                         f"{r['compute_ms_alone']} | {r['compute_ms_beside_load']} | {r['compute_slowdown']} | "
                         f"{r['load_GBps_beside_compute']} | {r['launch_ms_alone']} / {r['launch_ms_beside_queue']} | "
                         f"{r['queue_ms_on_a_thread']} | {r['input_compute_ms_alone']} / "
                         f"{r['input_compute_ms_beside_load']} |")
        with open(os.path.join(args.out_dir, "copy_overlap.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
