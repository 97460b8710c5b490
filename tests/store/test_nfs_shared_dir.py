"""UcmNfsStore in a shared sticky directory where some block files belong to another user: this engine can
neither evict them nor delete one that is corrupt. Garbage collection skips and counts them and still enforces
the bound as far as the other blocks allow; a corrupt one fails its load with a reason that says it stayed, and
neither the worker's instance nor the scheduler's lookup-only instance offers it again; nor one it may not read.

The engine runs in a child process without the capabilities that let root ignore sticky bits and file modes
(`conftest.run_without_file_owner_rights`); the test, as root, gives the files to another user."""

from __future__ import annotations

import json
import os
import time

import torch
from conftest import make_cache, run_without_file_owner_rights
from test_nfs import FILE, WIDTH, block_files, ids_for, nfs
from test_nfs_faults import flip

from ucm.store import BlockPages
from ucm.store.blockfile import HEADER_SIZE

OTHER_USER = 65534  # nobody

ENGINE = """
import json, sys, threading
import torch
from ucm.device import get_backend
from ucm.store import BlockPages, StoreLoadError, create_store

root, width, bound, ids = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
thread_errors = []
threading.excepthook = lambda args: thread_errors.append(repr(args.exc_value))
config = {"storage_backends": root, "kv_block_size": width}
out = {}
with create_store("UcmNfsStore", config, get_backend("cpu")) as worker, \\
        create_store("UcmNfsStore", config, get_backend("cpu")) as scheduler:
    worker._gc_thread.join()
    worker.max_storage_size = bound
    out["gc"] = worker.collect_garbage()
    worker._schedule_gc()  # the background pass meets the same files
    worker._gc_thread.join()
    out["gc_skipped"] = worker.stats().gc_skipped
    out["after_gc"] = worker.lookup(ids)
    kept = [b for b, hit in zip(ids, out["after_gc"]) if hit]
    try:
        worker.load(kept, BlockPages(torch.zeros(len(kept), width, dtype=torch.uint8), torch.arange(len(kept)))).wait()
    except StoreLoadError as exc:
        out["load_failed"], out["reasons"] = exc.failed_ids, exc.reasons
    out["worker_lookup"] = worker.lookup(kept)
    out["scheduler_before"] = scheduler.lookup(kept)
    try:
        scheduler.report_failed_loads(out.get("load_failed", [])).wait(timeout=30)
    except StoreLoadError as exc:
        out["recheck_failed"] = exc.failed_ids
    out["scheduler_after"] = scheduler.lookup(kept)
    out["scheduler_prefix"] = scheduler.lookup_prefix(kept)
out["thread_errors"] = thread_errors
print(json.dumps(out))
"""


def test_blocks_of_another_user_in_a_sticky_dir(backend, tmp_path):
    src = make_cache(51)
    ids = ids_for(51, 8)
    with nfs(backend, tmp_path) as store:
        store.dump(ids, BlockPages(src, torch.arange(8))).wait()
    files = block_files(tmp_path)
    theirs = ids[:4]  # the least recently accessed: the first blocks GC wants to evict
    now = time.time()
    for age, block_id in zip(range(800, 0, -100), ids, strict=True):
        os.utime(files[block_id], (now - age, now - age))
    for block_id in theirs:
        os.chown(files[block_id], OTHER_USER, OTHER_USER)
        os.chmod(files[block_id], 0o644)  # readable by this engine, but not its to delete
    for shard in {os.path.dirname(p) for p in files.values()}:
        os.chown(shard, OTHER_USER, OTHER_USER)
        os.chmod(shard, 0o1777)  # a shared, sticky directory (like /tmp)
    corrupt, unreadable = theirs[1], theirs[2]
    flip(files[corrupt], HEADER_SIZE + 7)
    os.chmod(files[unreadable], 0o600)  # theirs alone

    proc = run_without_file_owner_rights(ENGINE, str(tmp_path), str(WIDTH), str(3 * FILE), *ids)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["thread_errors"]
    # GC: their files are skipped and counted, mine are evicted (the bound holds as far as it can)
    assert out["gc"]["skipped"] == 4 and out["gc"]["blocks_removed"] == 4 and out["gc_skipped"] == 8
    assert out["after_gc"] == [True] * 4 + [False] * 4
    assert sorted(block_files(tmp_path)) == sorted(theirs)
    # the corrupt one and the unreadable one: their loads fail, say the files stayed, and no instance offers them
    assert out["load_failed"] == [corrupt, unreadable]
    reason = out["reasons"][corrupt]
    assert "payload checksum mismatch" in reason and "could not be removed" in reason
    assert "file removed" not in reason and os.path.exists(files[corrupt])
    assert "permission denied" in out["reasons"][unreadable] and "file is kept" in out["reasons"][unreadable]
    expected = [b not in (corrupt, unreadable) for b in theirs]
    assert out["worker_lookup"] == expected
    assert out["scheduler_before"] == [True] * 4  # the scheduler's own instance cannot know by itself
    assert out["recheck_failed"] == [corrupt, unreadable]
    assert out["scheduler_after"] == expected and out["scheduler_prefix"] == 1
