"""UcmNfsStore shared by engine processes: a writer killed with SIGKILL mid-dump leaves no visible block, one
process dumps and another loads the same bytes, and two processes publishing the same blocks at once leave one
valid file each."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
from conftest import make_cache, page_bytes, start_writer
from test_nfs import block_files, ids_for, nfs, temp_files

from ucm.store import BlockPages


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def ready_files(signal_dir: Path) -> list[Path]:
    return list(signal_dir.glob("ready-*"))


def test_sigkill_mid_dump_leaves_no_visible_block(backend, tmp_path):
    root, signals = tmp_path / "store", tmp_path / "signals"
    root.mkdir(), signals.mkdir()
    ids = ids_for(31, 3)
    writer = start_writer(root, 31, 3, "hang", signals)
    try:
        wait_for(lambda: ready_files(signals), "the writer's first complete temporary file")
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(30)
    assert writer.returncode == -signal.SIGKILL
    temp = Path(ready_files(signals)[0].read_text())
    assert temp.exists() and temp.stat().st_size > 0  # the whole block was written, but never published
    with nfs(backend, root, stale_temp_seconds=3600) as store:
        assert store.lookup(ids) == [False] * 3 and not block_files(root)
        assert temp.exists()  # too young to be a crashed writer's
        os.utime(temp, (time.time() - 7200, time.time() - 7200))
        store.collect_garbage()  # (the start-up pass in the background may be the one that removes it)
        assert not temp.exists() and not temp_files(root) and store.lookup(ids) == [False] * 3


def test_one_process_dumps_another_loads(backend, tmp_path):
    ids = ids_for(32, 5)
    with nfs(backend, tmp_path) as store:  # opened before the other engine writes anything
        assert store.lookup(ids) == [False] * 5
        writer = start_writer(tmp_path, 32, 5, "plain", tmp_path)
        assert writer.wait(60) == 0
        assert store.lookup(ids) == [True] * 5
        dst = make_cache()
        store.load(ids, BlockPages(dst, torch.tensor([10, 11, 12, 13, 14]))).wait()
    src = make_cache(32)
    assert all(page_bytes(dst, 10 + i) == page_bytes(src, 1 + i) for i in range(5))


def test_two_processes_publish_the_same_blocks(backend, tmp_path):
    root, signals = tmp_path / "store", tmp_path / "signals"
    root.mkdir(), signals.mkdir()
    ids = ids_for(33, 3)
    writers = [start_writer(root, 33, 3, "barrier", signals) for _ in range(2)]
    try:
        wait_for(lambda: len(ready_files(signals)) == 2, "both writers holding a complete temporary file")
        assert len(temp_files(root)) == 2 and not block_files(root)
        (signals / "go").touch()
        assert [w.wait(60) for w in writers] == [0, 0]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
    assert set(block_files(root)) == set(ids) and not temp_files(root)
    dst = make_cache()
    with nfs(backend, root) as store:
        store.load(ids, BlockPages(dst, torch.tensor([5, 6, 7]))).wait()
    src = make_cache(33)
    assert all(page_bytes(dst, 5 + i) == page_bytes(src, 1 + i) for i in range(3))
