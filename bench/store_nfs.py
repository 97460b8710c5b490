"""UcmNfsStore dump/load throughput on a local directory vs a plain sequential write/read of the same bytes.

For each block size, the same random bytes (a CPU page tensor, one page per block) are
- dumped to a UcmNfsStore (one checksummed file per block: gather into staging, checksum, write, fsync, rename)
  and loaded back into other pages (read, verify, scatter), and
- written dd-style into one file (sequential writes of block-sized chunks, one fsync at the end) and read back.
Reads are measured cold (page cache dropped before each read, when this process may) and warm. Each
measurement is repeated (store and baseline back to back, alternating which goes first); reported: median GB/s
and the median of the per-repetition store/baseline ratios.

    python bench/store_nfs.py --dir /var/tmp/ucm-bench --total-mib 256 --reps 3

Writes bench/results/store_nfs.json and store_nfs.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ucm.device import get_backend
from ucm.store import BlockPages, create_store
from ucm.store.blockfile import write_all

MIB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results"


DROP = "3"  # 3: page cache and dentries/inodes (every file's metadata cold too); 1: page cache only


def drop_page_cache() -> bool:
    """Flush dirty pages and drop the page cache (needs root); False when not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text(DROP + "\n")
        return True
    except OSError:
        return False


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def store_dump(store, ids, pages) -> None:
    store.dump(ids, pages).wait()


def store_load(store, ids, pages) -> None:
    store.load(ids, pages).wait()


def plain_write(path: Path, rows) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for row in rows:
            write_all(fd, [memoryview(row)])
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_read(path: Path, rows) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        for row in rows:
            view = memoryview(row)
            got = 0
            while got < view.nbytes:
                n = os.preadv(fd, [view[got:]], offset + got)
                if n <= 0:
                    raise OSError("short read")
                got += n
            offset += view.nbytes
    finally:
        os.close(fd)


def bench_block_size(root: Path, block_mib: int, total_mib: int, reps: int, store_config: dict) -> dict:
    block = block_mib * MIB
    n = max(1, total_mib // block_mib)
    data = torch.randint(0, 256, (n, block), dtype=torch.uint8)
    out = torch.empty_like(data)
    rows, out_rows = data.numpy(), out.numpy()
    slots = torch.arange(n)
    times: dict[str, list[float]] = {k: [] for k in
                                     ("store_dump", "plain_write", "store_load_cold", "plain_read_cold",
                                      "store_load_warm", "plain_read_warm")}
    cold = True
    store_dir, plain_file = root / "store", root / "plain.bin"
    shutil.rmtree(store_dir, ignore_errors=True)
    store_dir.mkdir(parents=True)
    config = {"storage_backends": str(store_dir), "kv_block_size": block, **store_config}
    # One long-lived store per block size, as an engine has (its staging buffers are reused across calls).
    with create_store("UcmNfsStore", config, get_backend("cpu")) as store:
        for rep in range(reps + 1):  # rep 0 warms up the staging buffers and is not counted
            ids = [f"{block_mib:08x}{rep:08x}{i:016x}" for i in range(n)]
            order = [("store", "plain"), ("plain", "store")][rep % 2]
            sample: dict[str, float] = {}
            for who in order:
                if who == "store":
                    sample["store_dump"] = timed(store_dump, store, ids, BlockPages(data, slots))
                else:
                    sample["plain_write"] = timed(plain_write, plain_file, rows)
            for who in order:
                cold = drop_page_cache() and cold
                if who == "store":
                    out.zero_()
                    sample["store_load_cold"] = timed(store_load, store, ids, BlockPages(out, slots))
                    assert torch.equal(out, data), "store returned different bytes"
                else:
                    sample["plain_read_cold"] = timed(plain_read, plain_file, out_rows)
            for who in order:
                if who == "store":
                    sample["store_load_warm"] = timed(store_load, store, ids, BlockPages(out, slots))
                else:
                    sample["plain_read_warm"] = timed(plain_read, plain_file, out_rows)
            if rep:
                for key, value in sample.items():
                    times[key].append(value)
            for shard in store_dir.iterdir():
                shutil.rmtree(shard)
            plain_file.unlink(missing_ok=True)
    shutil.rmtree(store_dir, ignore_errors=True)
    nbytes = n * block
    gbps = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
    return {
        "block_mib": block_mib, "blocks": n, "bytes": nbytes, "page_cache_dropped": cold,
        "gbps": {k: round(v, 3) for k, v in gbps.items()},
        # per repetition, store and plain ran back to back: the median of their ratios cancels most of the
        # load other processes put on the machine
        "ratio": {
            "dump_vs_write": _median_ratio(times["plain_write"], times["store_dump"]),
            "load_vs_read_cold": _median_ratio(times["plain_read_cold"], times["store_load_cold"]),
            "load_vs_read_warm": _median_ratio(times["plain_read_warm"], times["store_load_warm"]),
        },
        "seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
    }


def _median_ratio(plain: list[float], store: list[float]) -> float:
    """Median over repetitions of store throughput / plain throughput (= plain time / store time)."""
    return round(statistics.median(p / s for p, s in zip(plain, store, strict=True)), 3)


def filesystem_of(path: Path) -> str:
    try:
        return subprocess.run(["df", "-T", str(path)], capture_output=True, text=True).stdout.splitlines()[-1]
    except (OSError, IndexError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/var/tmp/ucm-store-bench")
    parser.add_argument("--sizes-mib", default="1,2,4,8,16,32")
    parser.add_argument("--total-mib", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--io-threads", type=int, default=4)
    parser.add_argument("--o-direct", action="store_true")
    parser.add_argument("--drop", choices=["1", "3"], default="3",
                        help="cold reads: drop the page cache only (1) or also dentries and inodes (3)")
    parser.add_argument("--out", default=str(RESULTS / "store_nfs"))
    args = parser.parse_args()
    global DROP
    DROP = args.drop
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    store_config = {"io_threads": args.io_threads, "o_direct": args.o_direct}
    load_at_start = os.getloadavg()
    rows = []
    for size in [int(s) for s in args.sizes_mib.split(",")]:
        row = bench_block_size(root, size, args.total_mib, args.reps, store_config)
        print(json.dumps({k: row[k] for k in ("block_mib", "gbps", "ratio")}), flush=True)
        rows.append(row)
    shutil.rmtree(root, ignore_errors=True)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "filesystem": filesystem_of(root.parent),
                    "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
        "store_config": store_config,
        "drop_caches": args.drop,
        "target": "store >= 80% of the plain sequential write/read for blocks >= 1 MiB",
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# UcmNfsStore vs plain sequential file I/O (same bytes, same disk, same run)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['cpus']} CPUs (shared), `{result['machine']['filesystem']}`; GB/s: median of "
        f"{args.reps}; ratios: median of the per-repetition ratios (store and plain back to back); "
        f"cold reads after `echo {args.drop} > /proc/sys/vm/drop_caches`: "
        f"{all(r['page_cache_dropped'] for r in rows)}.",
        "",
        "| block MiB | dump GB/s | plain write GB/s | dump/write | load cold | plain read cold | ratio | "
        "load warm | plain read warm | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g, q = r["gbps"], r["ratio"]
        lines.append(
            f"| {r['block_mib']} | {g['store_dump']:.2f} | {g['plain_write']:.2f} | {q['dump_vs_write']:.0%} | "
            f"{g['store_load_cold']:.2f} | {g['plain_read_cold']:.2f} | {q['load_vs_read_cold']:.0%} | "
            f"{g['store_load_warm']:.2f} | {g['plain_read_warm']:.2f} | {q['load_vs_read_warm']:.0%} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
