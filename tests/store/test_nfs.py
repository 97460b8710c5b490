"""UcmNfsStore on real files (CPU backend): round trips across several directories, chunked staging, O_DIRECT,
capacity-bounded GC by access time, stale temporary files, concurrent threads."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from conftest import NUM_PAGES, ids_for, make_cache, page_bytes, row_bytes

from ucm.errors import UcmConfigError
from ucm.store import BlockPages, StoreLoadError, create_store
from ucm.store.blockfile import HEADER_SIZE
from ucm.store.nfs import NfsStore

WIDTH = row_bytes(make_cache())
FILE = HEADER_SIZE + WIDTH


def nfs(backend, roots, **extra):
    roots = [str(r) for r in roots] if isinstance(roots, list) else str(roots)
    return create_store("UcmNfsStore", {"storage_backends": roots, "kv_block_size": WIDTH, **extra}, backend)


def block_files(*roots) -> dict[str, str]:
    return {p.name[:-3]: str(p) for r in roots for p in r.rglob("*.kv")}


def temp_files(*roots) -> list:
    return [p for r in roots for p in r.rglob(".tmp-*")]


@pytest.mark.parametrize("staged", [False, True], ids=["from-pages", "staged"])
def test_round_trip_over_two_dirs(backend, tmp_path, monkeypatch, staged):
    if staged:  # the path device caches take: gather into pinned staging, write from there
        monkeypatch.setattr(NfsStore, "_writes_from_pages", staticmethod(lambda pages: False))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    src, dst = make_cache(11), make_cache()
    ids = ids_for(11, 12)
    slots = torch.arange(12) * 2 % NUM_PAGES
    with nfs(backend, [a, b], io_threads=3, staging_bytes=2 * WIDTH) as store:  # several chunks per call
        assert store.lookup(ids) == [False] * 12
        store.dump(ids, BlockPages(src, slots)).wait()
        assert store.lookup(ids) == [True] * 12 and store.lookup_prefix(ids) == 12
        files = block_files(a, b)
        assert set(files) == set(ids) and any(f.startswith(str(a)) for f in files.values())
        assert any(f.startswith(str(b)) for f in files.values())
        assert all(os.path.getsize(f) == FILE for f in files.values()) and not temp_files(a, b)
        dst_slots = torch.arange(12) + 12
        store.load(ids, BlockPages(dst, dst_slots)).wait()
        for s, d in zip(slots.tolist(), dst_slots.tolist(), strict=True):
            assert page_bytes(dst, d) == page_bytes(src, s)
        # one layer's (k, v) only: a sub-range of the stored rows
        layer = make_cache()[1]
        store.load(ids[:4], BlockPages(layer, torch.arange(4), row_offset=WIDTH // 3)).wait()
        for j, s in enumerate(slots[:4].tolist()):
            assert torch.equal(layer[0][j], src[1][0][s]) and torch.equal(layer[1][j], src[1][1][s])
        store.dump(ids[:3], BlockPages(src, slots[:3])).wait()
        stats = store.stats()
        assert (stats.blocks_dumped, stats.dumps_skipped, stats.blocks_loaded, stats.stored_blocks) == (12, 3, 16, 12)
    # a new engine (same list, other order) finds everything
    with nfs(backend, [b, a]) as store:
        store.collect_garbage()  # the start-up pass runs in the background; this one is done on return
        assert store.lookup(ids) == [True] * 12 and store.stats().used_bytes == 12 * FILE


def test_missing_block_fails_only_that_block(backend, tmp_path):
    src, dst = make_cache(12), make_cache()
    ids = ids_for(12, 3)
    with nfs(backend, tmp_path) as store:
        store.dump([ids[0], ids[2]], BlockPages(src, torch.tensor([1, 3]))).wait()
        assert store.lookup_prefix(ids) == 1 and store.lookup(ids) == [True, False, True]
        task = store.load(ids, BlockPages(dst, torch.tensor([5, 6, 7])))
        with pytest.raises(StoreLoadError, match="not in the store") as info:
            task.wait()
        assert info.value.failed_ids == [ids[1]]
        assert page_bytes(dst, 5) == page_bytes(src, 1) and page_bytes(dst, 7) == page_bytes(src, 3)
        assert page_bytes(dst, 6) == page_bytes(make_cache(), 6)


def test_o_direct_round_trip(backend, tmp_path):
    pages = torch.randint(0, 255, (8, 4096), dtype=torch.uint8)
    out = torch.zeros_like(pages)
    ids = ids_for(13, 4)
    config = {"storage_backends": str(tmp_path), "kv_block_size": 4096, "o_direct": True}
    with create_store("UcmNfsStore", config, backend) as store:
        store.dump(ids, BlockPages(pages, torch.tensor([0, 2, 4, 6]))).wait()
        store.load(ids, BlockPages(out, torch.tensor([1, 3, 5, 7]))).wait()
    assert torch.equal(out[1::2], pages[0::2])


def test_gc_evicts_least_recently_accessed(backend, tmp_path):
    src = make_cache(14)
    ids = ids_for(14, 6)
    with nfs(backend, tmp_path, max_storage_size=5 * FILE) as store:
        store.dump(ids[:4], BlockPages(src, torch.arange(4))).wait()
        files = block_files(tmp_path)
        now = time.time()
        for age, block_id in zip([400, 300, 200, 100], ids[:4], strict=True):
            os.utime(files[block_id], (now - age, now - age))
        store.load(ids[:1], BlockPages(make_cache(), torch.tensor([0]))).wait()  # refreshes block 0's atime
        assert os.stat(files[ids[0]]).st_atime > now - 10
        store.dump(ids[4:], BlockPages(src, torch.tensor([4, 5]))).wait()  # 6 files > bound: GC in background
        store.collect_garbage()
        assert store.lookup(ids) == [True, False, False, True, True, True]
        stats = store.stats()
        assert stats.evictions == 2 and stats.used_bytes == 4 * FILE <= stats.capacity_bytes


def test_stale_temp_files_are_cleaned(backend, tmp_path):
    shard = tmp_path / "ab"
    shard.mkdir()
    old, fresh = shard / ".tmp-ab12-host-1-x", shard / ".tmp-ab34-host-2-y"
    old.write_bytes(b"x" * 100)
    fresh.write_bytes(b"y" * 100)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    with nfs(backend, tmp_path, stale_temp_seconds=3600) as store:
        store.collect_garbage()  # after (or instead of) the start-up pass in the background
        assert not old.exists() and fresh.exists()


def test_threads_share_one_store(backend, tmp_path):
    src = make_cache(15)
    ids = ids_for(15, NUM_PAGES)
    errors: list[BaseException] = []
    with nfs(backend, tmp_path, io_threads=2) as store:

        def worker(k: int) -> None:
            try:
                gen = torch.Generator().manual_seed(k)
                for _ in range(8):
                    pick = torch.randperm(NUM_PAGES, generator=gen)[:5]
                    store.dump([ids[i] for i in pick], BlockPages(src, pick)).wait()
                    dst = make_cache()
                    store.load([ids[i] for i in pick], BlockPages(dst, torch.arange(5))).wait()
                    for j, i in enumerate(pick.tolist()):
                        assert page_bytes(dst, j) == page_bytes(src, i)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert not temp_files(tmp_path) and len(block_files(tmp_path)) == store.stats().stored_blocks


def test_ids_never_become_paths(backend, tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    with nfs(backend, root) as store:
        for bad in ("../" * 8 + "etc/passwd", "0" * 30 + "/x", "A" * 32):
            with pytest.raises(UcmConfigError, match="block id"):
                store.lookup([bad])
            with pytest.raises(UcmConfigError, match="block id"):
                store.dump([bad], BlockPages(make_cache(1), torch.tensor([0])))
    assert [p.name for p in tmp_path.iterdir()] == ["store"] and not any(root.iterdir())
