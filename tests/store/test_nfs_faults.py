"""UcmNfsStore under storage faults: corrupt and truncated files, a full disk (ENOSPC on a tiny tmpfs), a
read-only file system and a vanished directory. Each gives a clear per-block error, never wrong bytes, and the
store keeps serving the other blocks."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import make_cache, page_bytes, remount_read_only, row_bytes, tmpfs
from test_nfs import block_files, ids_for, nfs, temp_files

from ucm.store import BlockPages, StoreDumpError, StoreLoadError
from ucm.store.blockfile import HEADER_SIZE

WIDTH = row_bytes(make_cache())
ZERO = page_bytes(make_cache(), 0)


def corrupt_and_load(backend, root, damage, match):
    src, dst = make_cache(21), make_cache()
    ids = ids_for(21, 3)
    with nfs(backend, root) as store:
        store.dump(ids, BlockPages(src, torch.tensor([1, 2, 3]))).wait()
        damage(block_files(root)[ids[1]])
        task = store.load(ids, BlockPages(dst, torch.tensor([4, 5, 6])))
        with pytest.raises(StoreLoadError, match=match) as info:
            task.wait()
        assert info.value.failed_ids == [ids[1]]
        assert page_bytes(dst, 4) == page_bytes(src, 1) and page_bytes(dst, 6) == page_bytes(src, 3)
        assert page_bytes(dst, 5) == ZERO  # never handed out
        assert store.lookup(ids) == [True, False, True]  # the bad file was removed: it can be dumped again
        store.dump(ids[1:2], BlockPages(src, torch.tensor([2]))).wait()
        store.load(ids[1:2], BlockPages(dst, torch.tensor([5]))).wait()
        assert page_bytes(dst, 5) == page_bytes(src, 2)


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def test_flipped_payload_byte(backend, tmp_path):
    corrupt_and_load(backend, tmp_path, lambda p: flip(p, HEADER_SIZE + WIDTH // 2), "payload checksum mismatch")


def test_flipped_header_byte(backend, tmp_path):
    corrupt_and_load(backend, tmp_path, lambda p: flip(p, 30), "header checksum mismatch")


def test_truncated_file(backend, tmp_path):
    corrupt_and_load(backend, tmp_path, lambda p: os.truncate(p, HEADER_SIZE + 100), "truncated")


def test_file_of_another_block(backend, tmp_path):
    def swap(path: str) -> None:  # a file renamed to the wrong id must not pass as that block
        other = next(p for p in block_files(tmp_path).values() if p != path)
        shutil.copyfile(other, path)

    corrupt_and_load(backend, tmp_path, swap, "file holds block")


def _split(store, ids, full_root):
    on_full = [b for b in ids if store._path(b)[0] == str(full_root)]
    return on_full, [b for b in ids if b not in on_full]


def test_enospc_fails_blocks_and_store_keeps_serving(backend, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    with tmpfs(tmp_path / "small", "32k") as small:  # room for about 4 block files
        src, dst = make_cache(22), make_cache()
        ids = ids_for(22, 24)
        with nfs(backend, [small, other]) as store:
            assert len(_split(store, ids, small)[0]) >= 8
            task = store.dump(ids, BlockPages(src, torch.arange(24)))
            with pytest.raises(StoreDumpError, match="no space left in storage dir .*small.*ENOSPC") as info:
                task.wait()
            failed = set(info.value.failed_ids)
            on_small, on_other = _split(store, ids, small)
            assert failed and failed <= set(on_small) and on_other
            assert store.lookup(ids) == [b not in failed for b in ids] and not temp_files(small, other)
            stored = [i for i, b in enumerate(ids) if b not in failed]
            store.load([ids[i] for i in stored], BlockPages(dst, torch.tensor(stored))).wait()
            assert all(page_bytes(dst, i) == page_bytes(src, i) for i in stored)
            assert store.stats().dump_failures == len(failed)


def test_read_only_dir(backend, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    with tmpfs(tmp_path / "ro", "1m") as ro:
        src, dst = make_cache(23), make_cache()
        ids = ids_for(23, 16)
        with nfs(backend, [ro, other]) as store:
            store.dump(ids[:8], BlockPages(src, torch.arange(8))).wait()
            remount_read_only(ro)
            task = store.dump(ids[8:], BlockPages(src, torch.arange(8, 16)))
            on_ro, on_other = _split(store, ids[8:], ro)
            if on_ro:
                with pytest.raises(StoreDumpError, match="read-only file system") as info:
                    task.wait()
                assert info.value.failed_ids == on_ro
            assert store.lookup(ids[8:]) == [b in on_other for b in ids[8:]]
            # blocks already on the read-only dir are still served
            store.load(ids[:8], BlockPages(dst, torch.arange(8))).wait()
            assert all(page_bytes(dst, i) == page_bytes(src, i) for i in range(8))


def test_vanished_dir_is_not_recreated(backend, tmp_path):
    gone, other = tmp_path / "gone", tmp_path / "other"
    gone.mkdir(), other.mkdir()
    src = make_cache(24)
    ids = ids_for(24, 12)
    with nfs(backend, [gone, other]) as store:
        shutil.rmtree(gone)
        task = store.dump(ids, BlockPages(src, torch.arange(12)))
        on_gone, on_other = _split(store, ids, gone)
        with pytest.raises(StoreDumpError, match="storage dir .*gone is missing") as info:
            task.wait()
        assert info.value.failed_ids == on_gone and on_other
        assert not gone.exists()
        assert store.lookup(ids) == [b in on_other for b in ids]
        task = store.load(ids, BlockPages(make_cache(), torch.arange(12)))
        with pytest.raises(StoreLoadError) as info:
            task.wait()
        assert info.value.failed_ids == on_gone
