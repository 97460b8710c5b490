"""UcmNfsStore with a GPU KV cache: dump (gather into pinned staging, checksum, write, fsync, rename) and load
(read, verify, one batched scatter from staging) of the same KV page set as bench/store_dram_gpu.py, every load
checked byte for byte; a check of the staged path on a real device plus its throughput on that host's disk.

    python bench/store_nfs_gpu.py --dir /tmp/ucm-nfs-gpu --blocks 128 --reps 3 --out bench/results/store_nfs_gpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from ucm.device import get_backend
from ucm.store import BlockPages, create_store

LAYERS, BLOCK, KV_HEADS, HEAD_DIM = 32, 16, 8, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dir", default="/tmp/ucm-nfs-gpu")
    parser.add_argument("--blocks", type=int, default=128)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--io-threads", type=int, default=4)
    parser.add_argument("--out", default="bench/results/store_nfs_gpu.json")
    args = parser.parse_args()
    backend = get_backend(args.device)
    dev, n = backend.device, args.blocks
    kv = [torch.randn(2 * n + 1, KV_HEADS, BLOCK, 2 * HEAD_DIM, device=dev).to(torch.bfloat16)
          for _ in range(args.layers)]
    row = KV_HEADS * BLOCK * 2 * HEAD_DIM * 2 * args.layers
    src, dst = torch.arange(1, n + 1), torch.arange(n + 1, 2 * n + 1)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    config = {"storage_backends": str(root), "kv_block_size": row, "io_threads": args.io_threads}
    times: dict[str, list[float]] = {"dump": [], "load": []}
    with create_store("UcmNfsStore", config, backend) as store:
        for rep in range(args.reps + 1):
            ids = [f"{rep:016x}{i:016x}" for i in range(n)]
            for t in kv:
                t[dst] = 0
            backend.synchronize()
            start = time.perf_counter()
            store.dump(ids, BlockPages(kv, src)).wait()
            dump_s = time.perf_counter() - start
            start = time.perf_counter()
            store.load(ids, BlockPages(kv, dst)).wait()
            load_s = time.perf_counter() - start
            assert all(torch.equal(t[src], t[dst]) for t in kv), "loaded bytes differ"
            if rep:
                times["dump"].append(dump_s)
                times["load"].append(load_s)
        stats = store.stats().as_dict()
    shutil.rmtree(root, ignore_errors=True)
    gbps = {k: round(n * row / statistics.median(v) / 1e9, 3) for k, v in times.items()}
    result = {"command": " ".join(["python", *sys.argv]), "device": str(dev), "bytes_per_block": row,
              "blocks_per_call": n, "io_threads": args.io_threads, "gbps": gbps,
              "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()}, "store_stats": stats,
              "checked": "every load byte-identical"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
