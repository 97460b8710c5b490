"""UcmDram dump/load of a realistic KV page set vs the pinned-copy ceiling, measured in the same run.

KV set: 32 layers, one page tensor per layer in vLLM 0.32's layout ``[num_blocks, num_kv_heads, block_size,
2*head_dim]`` (block 16, 8 KV heads, head dim 128, bf16): 64 KiB per layer page, 2 MiB per stored block.
- ceiling: one contiguous pinned<->device copy of the same bytes (``copy_`` on a side stream);
- device layer: ``Backend.gather_blocks``/``scatter_blocks`` of the scattered blocks into a pinned buffer;
- store: ``UcmDram.dump(ids, BlockPages(kv, slots))`` / ``load`` into other slots, waited on the host (the
  store's own bookkeeping included), then a one-layer load (the sparse algorithm's sub-range read);
every load is checked byte for byte. Median of ``--reps`` after one warm-up.

    python bench/store_dram_gpu.py --blocks 512 --reps 5 --out bench/results/store_dram_gpu.json

Runs on the CPU backend too (``--device cpu``, small sizes) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ucm.device import get_backend
from ucm.store import BlockPages, create_store

LAYERS, BLOCK, KV_HEADS, HEAD_DIM = 32, 16, 8, 128


def timed(backend, fn) -> float:
    backend.synchronize()
    start = time.perf_counter()
    fn()
    backend.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--blocks", type=int, default=512, help="blocks moved per call")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--transfer", default="auto", choices=["auto", "kernel", "dma"], help="UcmDram transfer")
    parser.add_argument("--out", default="bench/results/store_dram_gpu.json")
    args = parser.parse_args()
    backend = get_backend(args.device)
    dev = backend.device
    n, layers = args.blocks, args.layers
    num_pages = 2 * n + 1
    gen = torch.Generator(device=dev).manual_seed(0)
    kv = [
        torch.randn(num_pages, KV_HEADS, BLOCK, 2 * HEAD_DIM, generator=gen, device=dev).to(torch.bfloat16)
        for _ in range(layers)
    ]
    page = KV_HEADS * BLOCK * 2 * HEAD_DIM * 2
    row = page * layers
    nbytes = n * row
    src_slots = torch.randperm(num_pages - 1, generator=torch.Generator().manual_seed(1))[:n] + 1
    dst_slots = torch.tensor(sorted(set(range(1, num_pages)) - set(src_slots.tolist()))[:n])
    config = {"max_cache_size": 2 * n * row, "kv_block_size": row, "transfer": args.transfer}
    store = create_store("UcmDram", config, backend)

    # ceilings: one contiguous copy of the same bytes each way, on a side stream
    dense = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    pinned = backend.alloc_pinned(nbytes)
    side = backend.new_stream()
    buf = backend.alloc_pinned(nbytes).view(n, row)
    results: dict[str, list[float]] = {k: [] for k in (
        "ceiling_d2h", "ceiling_h2d", "device_gather_d2h", "device_scatter_h2d", "store_dump", "store_load",
        "store_load_one_layer")}

    def check(slots_a, slots_b, layer=None) -> None:
        for i, t in enumerate(kv):
            if layer is None or i == layer:
                assert torch.equal(t[slots_a], t[slots_b]), f"layer {i}: loaded bytes differ"

    for rep in range(args.reps + 1):
        sample = {
            "ceiling_d2h": timed(backend, lambda: backend.copy_async(pinned, dense, side).wait()),
            "ceiling_h2d": timed(backend, lambda: backend.copy_async(dense, pinned, side).wait()),
            "device_gather_d2h": timed(backend, lambda: backend.gather_blocks(kv, src_slots, buf, stream=side).wait()),
            "device_scatter_h2d": timed(
                backend, lambda: backend.scatter_blocks(buf, kv, dst_slots, stream=side).wait()),
        }
        check(src_slots, dst_slots)
        for t in kv:
            t[dst_slots] = 0
        ids = [f"{rep:016x}{i:016x}" for i in range(n)]
        sample["store_dump"] = timed(backend, lambda ids=ids: store.dump(ids, BlockPages(kv, src_slots)).wait())
        sample["store_load"] = timed(backend, lambda ids=ids: store.load(ids, BlockPages(kv, dst_slots)).wait())
        check(src_slots, dst_slots)
        layer = layers // 2
        kv[layer][dst_slots] = 0
        one = BlockPages(kv[layer], dst_slots, row_offset=layer * page)
        sample["store_load_one_layer"] = timed(backend, lambda ids=ids, one=one: store.load(ids, one).wait())
        check(src_slots, dst_slots, layer)
        if rep:
            for key, value in sample.items():
                results[key].append(value)

    # overlap: a dump on the store's side stream while compute (bf16 matmuls) runs on the current stream
    def measure_overlap() -> dict | None:
        """A dump on the store's side stream while bf16 matmuls run on the current stream."""
        if dev.type != "cuda":
            return None
        a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
        steps = 1

        def compute() -> None:
            for _ in range(steps):
                a @ a

        compute()  # warm-up: the first matmul initializes cuBLAS
        while timed(backend, compute) < statistics.median(results["store_dump"]) and steps < 4096:
            steps *= 2
        times_c, times_d, times_both = [], [], []
        for rep in range(3):
            ids = [f"{rep + 100:016x}{i:016x}" for i in range(n)]
            times_c.append(timed(backend, compute))
            times_d.append(timed(backend, lambda ids=ids: store.dump(ids, BlockPages(kv, src_slots)).wait()))

            def both(ids: tuple[str, ...] = tuple(f"{rep + 200:016x}{i:016x}" for i in range(n))) -> None:
                task = store.dump(ids, BlockPages(kv, src_slots))
                compute()
                task.wait()

            times_both.append(timed(backend, both))
        c, d, b = (statistics.median(t) for t in (times_c, times_d, times_both))
        return {"matmul_steps": steps, "compute_s": round(c, 5), "dump_s": round(d, 5), "both_s": round(b, 5),
                "hidden_fraction_of_shorter": round((c + d - b) / min(c, d), 3)}

    try:
        overlap: dict | str | None = measure_overlap()
    except Exception as exc:  # keep the main results even if this extra fails
        overlap = f"failed: {type(exc).__name__}: {exc}"

    gbps = {}
    for key, values in results.items():
        moved = nbytes // layers if key == "store_load_one_layer" else nbytes
        gbps[key] = round(moved / statistics.median(values) / 1e9, 2)
    stats = store.stats()
    store.close()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    result = {
        "command": " ".join(["python", *sys.argv]),
        "device": name,
        "torch": torch.__version__,
        "kv": {"layers": layers, "block_size": BLOCK, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16",
               "layout": "[num_blocks, kv_heads, block_size, 2*head_dim] per layer", "bytes_per_block": row},
        "transfer": args.transfer,
        "blocks_per_call": n,
        "bytes_per_call": nbytes,
        "gbps": gbps,
        "store_vs_ceiling": {
            "dump": round(gbps["store_dump"] / gbps["ceiling_d2h"], 3),
            "load": round(gbps["store_load"] / gbps["ceiling_h2d"], 3),
        },
        "target": "UcmDram dump and load >= 40 GB/s",
        "seconds": {k: [round(v, 5) for v in vs] for k, vs in results.items()},
        "overlap_dump_with_compute": overlap,
        "store_stats": stats.as_dict(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    g = gbps
    md = [
        f"# UcmDram on {name}: dump/load of {n} blocks x {row >> 10} KiB ({layers} layers, block 16, 8 KV heads, "
        "head dim 128, bf16)",
        "",
        f"Command: `{result['command']}` (torch {torch.__version__}); median of {args.reps}, GB/s = 1e9 B/s.",
        "",
        "| path | D2H (dump) GB/s | H2D (load) GB/s |",
        "|---|---|---|",
        f"| contiguous pinned copy (ceiling) | {g['ceiling_d2h']} | {g['ceiling_h2d']} |",
        f"| device layer gather/scatter (scattered blocks) | {g['device_gather_d2h']} | {g['device_scatter_h2d']} |",
        f"| UcmDram dump / load (whole rows, transfer={args.transfer}) | {g['store_dump']} | {g['store_load']} |",
        f"| UcmDram load of one layer (row sub-range, {page >> 10} KiB per block) | | {g['store_load_one_layer']} |",
        "",
        f"Store vs ceiling: dump {result['store_vs_ceiling']['dump']:.0%}, "
        f"load {result['store_vs_ceiling']['load']:.0%}; target >= 40 GB/s. "
        f"Evictions during the run: {stats.evictions}.",
        "",
        f"Dump on the side stream overlapped with bf16 matmuls on the compute stream: {overlap}.",
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
