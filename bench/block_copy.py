"""Batched block copy between a paged GPU cache and pinned host memory: GB/s per block size and method.

Moves the same scattered list of blocks (random ids out of a cache twice as large) device->host (gather, an
offload) and host->device (scatter, a load), by:
- `zero_copy`: `CudaBackend` default, one Triton launch reading/writing pinned host memory directly;
- `staged`: `CudaBackend` with ``host_copy="staged"``, one Triton gather into a device buffer + one DMA;
- `torch_ops`: the plain-PyTorch reference ops on the GPU (index_select/index_copy_ + one copy);
- `per_block`: one ``copy_`` per block (what a naive connector does);
- `contiguous`: one pinned copy of the same bytes, contiguous on both sides (the PCIe ceiling).
Every method's result is checked against the blocks it should have moved.

    python bench/block_copy.py            # writes bench/results/block_copy.json and block_copy.md

Needs a CUDA GPU and an installed checkout (`pip install -e .`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import torch

from ucm.device import Backend, get_backend, reference

BLOCK_SIZES = [16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20]
METHODS = ["zero_copy", "staged", "torch_ops", "per_block", "contiguous"]
TARGET_GBPS = 40.0


def time_ms(fn, reps: int) -> float:
    """Median milliseconds of one call (CUDA events; every call is synchronized)."""
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


def run_size(backend: Backend, block_bytes: int, total_bytes: int, reps: int) -> list[dict]:
    n = max(1, total_bytes // block_bytes)
    cache = torch.randint(-(2**15), 2**15, (2 * n, block_bytes // 2), dtype=torch.int16, device="cuda")
    ids = torch.randperm(2 * n)[:n]
    ids_dev = ids.cuda()
    host = torch.empty(n, block_bytes, dtype=torch.uint8, pin_memory=True)
    flat_host = host.view(-1)
    flat_dev = torch.empty(n * block_bytes, dtype=torch.uint8, device="cuda")
    expected = cache[ids_dev].view(torch.uint8).reshape(n, block_bytes).cpu()
    cache_rows = cache.view(torch.uint8).view(2 * n, block_bytes)

    def kernel(mode: str, to_host: bool):
        def call():
            backend.host_copy = mode
            if to_host:
                backend.gather_blocks(cache, ids, host)
            else:
                backend.scatter_blocks(host, cache, ids)

        return call

    def torch_ops(to_host: bool):
        def call():
            if to_host:
                reference.gather_blocks([cache], ids_dev, host)
            else:
                reference.scatter_blocks(host, [cache], ids_dev)

        return call

    ids_list = ids.tolist()

    def per_block(to_host: bool):
        def call():
            for i, b in enumerate(ids_list):
                if to_host:
                    host[i].copy_(cache_rows[b], non_blocking=True)
                else:
                    cache_rows[b].copy_(host[i], non_blocking=True)

        return call

    def contiguous(to_host: bool):
        def call():
            if to_host:
                flat_host.copy_(flat_dev, non_blocking=True)
            else:
                flat_dev.copy_(flat_host, non_blocking=True)

        return call

    results = []
    # Device-to-device gather (what the staged path runs before its DMA): the Triton kernel vs index_select.
    staging = torch.empty(n, block_bytes, dtype=torch.uint8, device="cuda")
    d2d = {
        "kernel": lambda: backend.gather_blocks(cache, ids_dev, staging),
        "torch_ops": lambda: reference.gather_blocks([cache], ids_dev, staging),
    }
    for method, fn in d2d.items():
        staging.zero_()
        ms = time_ms(fn, reps)
        ok = torch.equal(staging.cpu(), expected)
        results.append(
            {
                "direction": "D2D",
                "block_bytes": block_bytes,
                "blocks": n,
                "bytes": n * block_bytes,
                "method": method,
                "ms": round(ms, 4),
                "GBps": round(n * block_bytes / ms / 1e6, 2),
                "correct": ok,
            }
        )
        print(json.dumps(results[-1]), flush=True)
    for direction, to_host in (("D2H", True), ("H2D", False)):
        calls = {
            "zero_copy": kernel("zero_copy", to_host),
            "staged": kernel("staged", to_host),
            "torch_ops": torch_ops(to_host),
            "per_block": per_block(to_host),
            "contiguous": contiguous(to_host),
        }
        for method in METHODS:
            if to_host:
                host.zero_()
            else:
                host.copy_(expected)
                cache[ids_dev] = 0
            torch.cuda.synchronize()
            ms = time_ms(calls[method], reps if method != "per_block" else max(2, reps // 3))
            torch.cuda.synchronize()
            if method == "contiguous":
                ok = True
            elif to_host:
                ok = torch.equal(host, expected)
            else:
                ok = torch.equal(cache[ids_dev].view(torch.uint8).reshape(n, block_bytes).cpu(), expected)
            results.append(
                {
                    "direction": direction,
                    "block_bytes": block_bytes,
                    "blocks": n,
                    "bytes": n * block_bytes,
                    "method": method,
                    "ms": round(ms, 4),
                    "GBps": round(n * block_bytes / ms / 1e6, 2),
                    "correct": ok,
                }
            )
            print(json.dumps(results[-1]), flush=True)
    backend.host_copy = "zero_copy"
    return results


def sweep(backend: Backend, reps: int) -> list[dict]:
    """Copy-kernel launch shapes (bytes per program step x warps) at 16 KiB and 256 KiB blocks, zero-copy and D2D."""
    from ucm.kernels import block_copy

    defaults = (block_copy._CHUNK_BYTES, block_copy._NUM_WARPS)
    rows = []
    for block_bytes in (16 << 10, 256 << 10):
        n = (64 << 20) // block_bytes
        cache = torch.empty(2 * n, block_bytes, dtype=torch.uint8, device="cuda")
        ids = torch.randperm(2 * n)[:n]
        host = torch.empty(n, block_bytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(n, block_bytes, dtype=torch.uint8, device="cuda")
        for chunk in (4096, 8192, 16384, 32768):
            for warps in (2, 4, 8):
                block_copy._CHUNK_BYTES, block_copy._NUM_WARPS = chunk, warps
                row = {"block_bytes": block_bytes, "chunk_bytes": chunk, "num_warps": warps}
                for name, fn in (
                    ("D2H", functools.partial(backend.gather_blocks, cache, ids, host)),
                    ("H2D", functools.partial(backend.scatter_blocks, host, cache, ids)),
                    ("D2D", functools.partial(backend.gather_blocks, cache, ids, dev)),
                ):
                    row[name + "_GBps"] = round(n * block_bytes / time_ms(fn, reps) / 1e6, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    block_copy._CHUNK_BYTES, block_copy._NUM_WARPS = defaults
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Batched block copy, paged GPU cache <-> pinned host memory (GB/s)",
        "",
        f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; {meta['total_mib']} MiB of scattered "
        "blocks per call, median of repeated calls (CUDA events).",
        "",
        f"Command: `{meta['command']}`",
        "",
        "| direction | block | blocks | " + " | ".join(METHODS) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in METHODS) + " |",
    ]
    for direction in ("D2H", "H2D"):
        for size in sorted({r["block_bytes"] for r in rows}):
            sel = {r["method"]: r for r in rows if r["direction"] == direction and r["block_bytes"] == size}
            first = next(iter(sel.values()))
            cells = [f"{sel[m]['GBps']:.1f}" + ("" if sel[m]["correct"] else " (WRONG)") for m in METHODS]
            lines.append(f"| {direction} | {size >> 10} KiB | {first['blocks']} | " + " | ".join(cells) + " |")
    at16 = {(r["direction"], r["method"]): r["GBps"] for r in rows if r["block_bytes"] == 16 << 10}
    if ("D2H", "zero_copy") in at16:
        ok = min(at16[("D2H", "zero_copy")], at16[("H2D", "zero_copy")]) >= TARGET_GBPS
        lines += [
            "",
            f"Target: >= {TARGET_GBPS:.0f} GB/s at 16 KiB blocks with the default path (zero_copy): "
            f"D2H {at16[('D2H', 'zero_copy')]:.1f}, H2D {at16[('H2D', 'zero_copy')]:.1f} GB/s: "
            f"{'met' if ok else 'missed'} (per-block copy_ loop: {at16[('D2H', 'per_block')]:.1f} / "
            f"{at16[('H2D', 'per_block')]:.1f} GB/s; ceiling {at16[('D2H', 'contiguous')]:.1f}). The staged path "
            "(device gather + one DMA) is faster H2D but needs a device staging buffer as large as the transfer; "
            "zero_copy needs none, takes `rows`, and is one launch on the caller's stream.",
        ]
    lines += [
        "",
        "Device-to-device gather of the same blocks (GB/s of blocks moved; read + write is twice that):",
        "",
        "| block | Triton kernel | torch index_select |",
        "| --- | --- | --- |",
    ]
    for size in sorted({r["block_bytes"] for r in rows}):
        sel = {r["method"]: r for r in rows if r["direction"] == "D2D" and r["block_bytes"] == size}
        if sel:
            lines.append(f"| {size >> 10} KiB | {sel['kernel']['GBps']:.0f} | {sel['torch_ops']['GBps']:.0f} |")
    lines += [
        "",
        "zero_copy = `CudaBackend` default (one Triton launch, pinned host memory accessed directly); staged = one "
        "Triton gather/scatter on the device + one DMA; torch_ops = reference index_select/index_copy_ + copy; "
        "per_block = one `copy_` per block; contiguous = one pinned copy of the same bytes (ceiling).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-mib", type=int, default=128, help="bytes moved per call")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--sizes-kib", type=int, nargs="*", default=[s >> 10 for s in BLOCK_SIZES])
    parser.add_argument("--sweep", action="store_true", help="also time the copy kernel's launch shapes")
    args = parser.parse_args()
    import triton

    backend = get_backend("cuda")
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "total_mib": args.total_mib,
        "command": "python " + " ".join(["bench/block_copy.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    rows = []
    for kib in args.sizes_kib:
        rows += run_size(backend, kib << 10, args.total_mib << 20, args.reps)
    swept = sweep(backend, args.reps) if args.sweep else []
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "block_copy.json"), "w") as f:
        json.dump({"meta": meta, "results": rows, "sweep": swept}, f, indent=1)
    with open(os.path.join(args.out_dir, "block_copy.md"), "w") as f:
        f.write(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
