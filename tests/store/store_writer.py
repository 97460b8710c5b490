"""A separate engine process for the store tests (started by `conftest.start_writer`): dumps seeded blocks into a
UcmNfsStore directory, optionally stopping right before publishing so the test can kill it or race it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from conftest import cache_pages, ids_for, make_cache

from ucm.device import bytes_per_block, get_backend
from ucm.store import BlockPages
from ucm.store.nfs import NfsStore


def main() -> None:
    root, seed, n, mode, signal_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5])
    cache = make_cache(seed)
    config = {"storage_backends": root, "kv_block_size": bytes_per_block(cache_pages(cache)), "io_threads": 1}
    store = NfsStore(config, get_backend("cpu"))

    def before_publish(temp_path: str) -> None:
        (signal_dir / f"ready-{os.getpid()}").write_text(temp_path)
        if mode == "hang":
            time.sleep(600)
        while mode == "barrier" and not (signal_dir / "go").exists():
            time.sleep(0.01)

    if mode != "plain":
        store._before_publish = before_publish
    store.dump(ids_for(seed, n), BlockPages(cache, torch.arange(1, n + 1))).wait()
    store.close()


if __name__ == "__main__":
    main()
