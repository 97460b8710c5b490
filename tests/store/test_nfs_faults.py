"""UcmNfsStore under storage faults: corrupt and truncated files, a full disk (ENOSPC on a tiny tmpfs), a
read-only file system and a vanished directory; entries that are not block files (a directory, FIFO or symlink at
a block's name, a symlinked shard dir); files another engine wrote that this one cannot verify (another block
size, a newer format, a checksum algorithm not installed here); close() racing transfers; file and directory
modes. Each gives a clear per-block error, never wrong bytes, never deletes a valid block, and the store keeps
serving the other blocks."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest
import torch
from conftest import NUM_PAGES, make_cache, page_bytes, remount_read_only, row_bytes, tmpfs
from test_nfs import FILE, block_files, ids_for, nfs, temp_files

from ucm.errors import UcmConfigError
from ucm.store import BlockPages, StoreClosedError, StoreDumpError, StoreLoadError, create_store
from ucm.store.blockfile import _FIELDS, FORMAT_VERSION, HEADER_SIZE

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
        assert (store.stats().stored_blocks, store.stats().used_bytes) == (2, 2 * (HEADER_SIZE + WIDTH))
        store.dump(ids[1:2], BlockPages(src, torch.tensor([2]))).wait()
        assert (store.stats().stored_blocks, store.stats().used_bytes) == (3, 3 * (HEADER_SIZE + WIDTH))
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


# ---------------------------------------------------------------------------- entries that are not block files
def _set_atimes(paths, ages) -> None:
    now = time.time()
    for path, age in zip(paths, ages, strict=True):
        os.utime(path, (now - age, now - age))


def _thread_errors(monkeypatch) -> list:
    """Exceptions that end any thread (the GC thread must never die)."""
    errors: list = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    return errors


def test_gc_skips_a_directory_at_a_block_name(backend, tmp_path, monkeypatch):
    errors = _thread_errors(monkeypatch)
    src = make_cache(31)
    ids = ids_for(31, 5)
    with nfs(backend, tmp_path, max_storage_size=64 * FILE) as store:
        store.dump(ids[1:], BlockPages(src, torch.arange(4))).wait()
        store.max_storage_size = 3 * FILE  # lowered after the dumps: no background pass races the atimes
        in_the_way = tmp_path / ids[0][:2] / f"{ids[0]}.kv"  # a directory where a block file would be
        in_the_way.mkdir(parents=True, exist_ok=True)
        (in_the_way / "x").write_bytes(b"x" * 100)
        files = block_files(tmp_path)
        _set_atimes([str(in_the_way)] + [files[b] for b in ids[1:]], [900, 400, 300, 200, 100])
        result = store.collect_garbage()
        assert store.lookup(ids) == [False, False, False, True, True]  # the size bound holds again
        assert in_the_way.is_dir() and (in_the_way / "x").exists()
        assert result["skipped"] >= 1 and store.stats().gc_skipped >= 1
        assert store.stats().used_bytes <= 3 * FILE
        store._schedule_gc()  # the background pass survives the same tree
        store._gc_thread.join()
        with pytest.raises(StoreDumpError, match="directory"):
            store.dump(ids[:1], BlockPages(src, torch.tensor([0]))).wait()
    assert not errors


def test_gc_skips_blocks_it_cannot_remove(backend, tmp_path, monkeypatch):
    errors = _thread_errors(monkeypatch)
    other = tmp_path / "other"
    other.mkdir()
    src = make_cache(32)
    ids = ids_for(32, 16)
    with tmpfs(tmp_path / "ro", "1m") as ro, nfs(backend, [ro, other], max_storage_size=64 * FILE) as store:
        store.dump(ids, BlockPages(src, torch.arange(16))).wait()
        on_ro, on_other = _split(store, ids, ro)
        assert on_ro and len(on_other) >= 2
        files = block_files(ro, other)
        _set_atimes([files[b] for b in on_ro + on_other], [1000 + i for i in range(len(ids))][::-1])
        remount_read_only(ro)
        store.max_storage_size = len(on_ro) * FILE  # only evicting every block of the writable dir gets close
        result = store.collect_garbage()
        assert result["skipped"] == len(on_ro) and store.stats().gc_skipped == len(on_ro)
        assert store.lookup(ids) == [b in on_ro for b in ids]
    assert not errors


def test_gc_and_dumps_never_follow_a_symlinked_shard(backend, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    ids = ids_for(33, 3)
    names = ["a.kv", "b.kv", "c.kv", f"{ids[0]}.kv", ".tmp-ab12-host-1-x"]
    for name in names:
        (outside / name).write_bytes(b"y" * FILE)
        os.utime(outside / name, (time.time() - 7200, time.time() - 7200))
    (root / ids[0][:2]).symlink_to(outside, target_is_directory=True)
    with nfs(backend, root, max_storage_size=FILE, stale_temp_seconds=60) as store:
        store.collect_garbage()
        assert sorted(p.name for p in outside.iterdir()) == sorted(names)
        with pytest.raises(StoreDumpError, match="symbolic link") as info:
            store.dump(ids[:1], BlockPages(make_cache(33), torch.tensor([0]))).wait()
        assert info.value.failed_ids == ids[:1]
        assert sorted(p.name for p in outside.iterdir()) == sorted(names)
        with pytest.raises(StoreLoadError, match="symbolic link"):
            store.load(ids[:1], BlockPages(make_cache(), torch.tensor([0]))).wait()
        assert store.lookup(ids[:1]) == [False]


# ---------------------------------------------------------------------------- blocks another engine can read
def test_other_block_size_is_a_miss_not_corruption(backend, tmp_path):
    src = make_cache(34)
    ids = ids_for(34, 2)
    with nfs(backend, tmp_path) as store:
        store.dump(ids, BlockPages(src, torch.tensor([1, 2]))).wait()
    files = block_files(tmp_path)
    config = {"storage_backends": str(tmp_path), "kv_block_size": WIDTH // 2}
    with create_store("UcmNfsStore", config, backend) as other:
        task = other.load(ids, BlockPages(torch.zeros(4, WIDTH // 2, dtype=torch.uint8), torch.tensor([0, 1])))
        with pytest.raises(StoreLoadError, match="kv_block_size.*file kept") as info:
            task.wait()
        assert info.value.failed_ids == ids and other.lookup(ids) == [False, False]
    assert block_files(tmp_path) == files
    with nfs(backend, tmp_path) as store:  # the engine that wrote them still reads them
        dst = make_cache()
        store.load(ids, BlockPages(dst, torch.tensor([3, 4]))).wait()
        assert page_bytes(dst, 3) == page_bytes(src, 1)


def test_newer_format_version_is_a_miss_not_corruption(backend, tmp_path):
    src = make_cache(35)
    ids = ids_for(35, 2)
    with nfs(backend, tmp_path) as store:
        store.dump(ids, BlockPages(src, torch.tensor([1, 2]))).wait()
        path = block_files(tmp_path)[ids[0]]
        with open(path, "r+b") as f:  # a well-formed header of a later format: version 2, header crc updated
            header = bytearray(f.read(HEADER_SIZE))
            struct.pack_into("<I", header, 8, FORMAT_VERSION + 1)
            struct.pack_into("<I", header, 172, zlib.crc32(header[:172]))
            f.seek(0)
            f.write(header)
        with pytest.raises(StoreLoadError, match="newer.*file kept") as info:
            store.load(ids, BlockPages(make_cache(), torch.tensor([3, 4]))).wait()
        assert info.value.failed_ids == ids[:1] and os.path.exists(path)
        assert store.lookup(ids) == [False, True]
        store.dump(ids[:1], BlockPages(src, torch.tensor([1]))).wait()  # never overwrites the other engine's file
        assert open(path, "rb").read(HEADER_SIZE) == bytes(header)


READER = """
import sys
sys.modules["xxhash"] = None  # an engine where the xxhash package is not installed
import torch
from ucm.device import get_backend
from ucm.store import BlockPages, StoreLoadError, create_store
root, width, ids = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
config = {"storage_backends": root, "kv_block_size": width}
with create_store("UcmNfsStore", config, get_backend("cpu")) as store:
    try:
        store.load(ids, BlockPages(torch.zeros(len(ids), width, dtype=torch.uint8), torch.arange(len(ids)))).wait()
    except StoreLoadError as exc:
        print("LOOKUP", store.lookup(ids), "ERROR", exc)
"""


def test_checksum_not_available_here_is_a_miss_not_corruption(backend, tmp_path):
    pytest.importorskip("xxhash")
    ids = ids_for(36, 2)
    with nfs(backend, tmp_path, checksum="xxh3_64") as store:
        store.dump(ids, BlockPages(make_cache(36), torch.tensor([1, 2]))).wait()
    files = block_files(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", READER, str(tmp_path), str(WIDTH), *ids], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LOOKUP [False, False]" in proc.stdout and "not available here" in proc.stdout, proc.stdout
    assert "file kept" in proc.stdout and block_files(tmp_path) == files


# ---------------------------------------------------------------------------- FIFOs, links, unremovable files
def test_fifo_at_a_block_path_fails_that_block_without_hanging(backend, tmp_path):
    src = make_cache(37)
    ids = ids_for(37, 2)
    store = nfs(backend, tmp_path)
    store.dump(ids[1:], BlockPages(src, torch.tensor([2]))).wait()
    fifo = tmp_path / ids[0][:2] / f"{ids[0]}.kv"
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    try:
        assert store.lookup(ids) == [False, True]
        dst = make_cache()
        with pytest.raises(StoreLoadError, match="FIFO") as info:
            store.load(ids, BlockPages(dst, torch.tensor([3, 4]))).wait(timeout=20)
        assert info.value.failed_ids == ids[:1] and page_bytes(dst, 4) == page_bytes(src, 2)
        store.dump(ids[:1], BlockPages(src, torch.tensor([1]))).wait()  # a dump replaces the FIFO
        store.load(ids[:1], BlockPages(dst, torch.tensor([3]))).wait(timeout=20)
        assert page_bytes(dst, 3) == page_bytes(src, 1)
    finally:
        _close_with_fifo_open(store, fifo)


def _close_with_fifo_open(store, fifo) -> None:
    """close() while holding the FIFO open for writing too: an I/O thread blocked opening it for reading (the bug)
    gets through, so close() returns and the test fails instead of hanging."""
    fd = None
    with contextlib.suppress(OSError):
        fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        store.close()
    finally:
        if fd is not None:
            os.close(fd)


def test_fifo_does_not_turn_off_o_direct(backend, tmp_path):
    pages = torch.randint(0, 255, (4, 4096), dtype=torch.uint8)
    ids = ids_for(44, 2)
    config = {"storage_backends": str(tmp_path), "kv_block_size": 4096, "o_direct": True}
    store = create_store("UcmNfsStore", config, backend)
    fifo = tmp_path / ids[0][:2] / f"{ids[0]}.kv"
    try:
        store.dump(ids[1:], BlockPages(pages, torch.tensor([1]))).wait()
        if not store._direct_ok[str(tmp_path)]:
            pytest.skip("this file system refuses O_DIRECT")
        fifo.parent.mkdir(exist_ok=True)
        os.mkfifo(fifo)
        with pytest.raises(StoreLoadError, match="FIFO"):
            store.load(ids, BlockPages(torch.zeros_like(pages), torch.tensor([2, 3]))).wait(timeout=20)
        assert store._direct_ok[str(tmp_path)]  # the FIFO refused O_DIRECT, not the file system
    finally:
        _close_with_fifo_open(store, fifo)


def test_dangling_symlink_at_a_block_path_is_replaced(backend, tmp_path):
    src = make_cache(38)
    ids = ids_for(38, 1)
    link = tmp_path / ids[0][:2] / f"{ids[0]}.kv"
    link.parent.mkdir()
    link.symlink_to(tmp_path / "nowhere")
    with nfs(backend, tmp_path) as store:
        assert store.lookup(ids) == [False]
        store.dump(ids, BlockPages(src, torch.tensor([1]))).wait()
        assert not link.is_symlink() and not (tmp_path / "nowhere").exists()
        dst = make_cache()
        store.load(ids, BlockPages(dst, torch.tensor([2]))).wait()
        assert page_bytes(dst, 2) == page_bytes(src, 1) and store.lookup(ids) == [True]


def test_symlink_to_a_block_file_is_never_read(backend, tmp_path):
    src = make_cache(39)
    ids = ids_for(39, 1)
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    with nfs(backend, outside) as store:
        store.dump(ids, BlockPages(src, torch.tensor([1]))).wait()
    link = root / ids[0][:2] / f"{ids[0]}.kv"
    link.parent.mkdir()
    link.symlink_to(block_files(outside)[ids[0]])
    with nfs(backend, root) as store:
        assert store.lookup(ids) == [False]
        with pytest.raises(StoreLoadError, match="symbolic link"):
            store.load(ids, BlockPages(make_cache(), torch.tensor([2]))).wait()
    assert block_files(outside)


def test_corrupt_file_that_cannot_be_removed(backend, tmp_path):
    src = make_cache(40)
    ids = ids_for(40, 2)
    with tmpfs(tmp_path / "ro", "1m") as ro, nfs(backend, ro) as store, nfs(backend, ro) as scheduler:
        store.dump(ids, BlockPages(src, torch.tensor([1, 2]))).wait()
        path = block_files(ro)[ids[0]]
        flip(path, HEADER_SIZE + 5)
        remount_read_only(ro)
        with pytest.raises(StoreLoadError, match="payload checksum mismatch") as info:
            store.load(ids, BlockPages(make_cache(), torch.tensor([3, 4]))).wait()
        reason = info.value.reasons[ids[0]]
        assert "file removed" not in reason and "could not be removed" in reason and os.path.exists(path)
        assert store.lookup(ids) == [False, True] and store.lookup_prefix(ids) == 0
        # the scheduler's lookup-only instance learns it from the worker's report, not from its own memory
        assert scheduler.lookup(ids) == [True, True]
        with pytest.raises(StoreLoadError, match="could not be removed"):
            scheduler.report_failed_loads(ids[:1]).wait(timeout=20)
        assert scheduler.lookup(ids) == [False, True] and os.path.exists(path)


def test_reported_failed_loads_are_checked_again(backend, tmp_path):
    """`report_failed_loads` (what the scheduler side passes on from its workers): a corrupt file is deleted, one
    this engine cannot verify is hidden and kept, one that failed for a passing reason stays offered."""
    src = make_cache(45)
    ids = ids_for(45, 4)
    with nfs(backend, tmp_path) as worker, nfs(backend, tmp_path) as scheduler:
        worker.dump(ids[:3], BlockPages(src, torch.tensor([1, 2, 3]))).wait()
        files = block_files(tmp_path)
        flip(files[ids[0]], HEADER_SIZE + 9)
        with open(files[ids[2]], "r+b") as f:  # another engine's newer format
            header = bytearray(f.read(HEADER_SIZE))
            struct.pack_into("<I", header, 8, FORMAT_VERSION + 1)
            f.seek(0)
            f.write(header)
        assert scheduler.lookup(ids) == [True, True, True, False]
        with pytest.raises(StoreLoadError) as info:
            scheduler.report_failed_loads(ids).wait(timeout=20)
        assert info.value.failed_ids == [ids[0], ids[2], ids[3]]
        assert "file removed" in info.value.reasons[ids[0]] and "file kept" in info.value.reasons[ids[2]]
        assert scheduler.lookup(ids) == [False, True, False, False]
        assert sorted(block_files(tmp_path)) == sorted(ids[1:3])
        assert scheduler.stats().blocks_loaded == 0  # a check is not a load
        scheduler.close()
        with pytest.raises(StoreClosedError):
            scheduler.report_failed_loads(ids)


# ---------------------------------------------------------------------------- bad slots, close racing transfers
@pytest.mark.parametrize("slot", [-1, NUM_PAGES])
def test_slot_outside_the_pages_is_refused(backend, tmp_path, slot):
    """Host caches are written from and read into pages by index: slot -1 used to store the last page under the id
    (and load into it)."""
    src, dst = make_cache(46), make_cache()
    ids = ids_for(46, 2)
    with nfs(backend, tmp_path) as store:
        with pytest.raises(UcmConfigError, match=f"BlockPages.slots.*slot {slot} of {ids[1]}"):
            store.dump(ids, BlockPages(src, torch.tensor([0, slot])))
        assert store.lookup(ids) == [False, False] and not block_files(tmp_path)
        store.dump(ids, BlockPages(src, torch.tensor([0, 1]))).wait()
        with pytest.raises(UcmConfigError, match=f"BlockPages.slots.*slot {slot} of {ids[0]}"):
            store.load(ids, BlockPages(dst, torch.tensor([slot, 2])))
        assert all(page_bytes(dst, i) == ZERO for i in range(NUM_PAGES))


def test_close_racing_transfers_raises_store_closed(backend, tmp_path):
    src = make_cache(41)
    ids = ids_for(41, 4)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so close() lands inside dump/load calls
    try:
        for trial in range(20):
            root = tmp_path / str(trial)
            root.mkdir()
            store = nfs(backend, root, io_threads=1)
            errors: list[BaseException] = []

            def hammer(store=store, errors=errors) -> None:
                while True:
                    try:
                        store.dump(ids, BlockPages(src, torch.arange(4))).wait()
                        store.load(ids, BlockPages(make_cache(), torch.arange(4))).wait()
                    except StoreClosedError:
                        return
                    except BaseException as exc:  # surfaced below
                        errors.append(exc)
                        return

            threads = [threading.Thread(target=hammer) for _ in range(2)]
            for t in threads:
                t.start()
            time.sleep(0.002 * trial)
            store.close()
            for t in threads:
                t.join(30)
            assert not errors, repr(errors[0])
    finally:
        sys.setswitchinterval(old)


# ---------------------------------------------------------------------------- file and directory modes
def dump_under_umask(backend, root, umask: int, seed: int, **config) -> str:
    """The path of one block dumped while the process umask is `umask` (the modes must not depend on it)."""
    old = os.umask(umask)
    try:
        with nfs(backend, root, **config) as store:
            ids = ids_for(seed, 1)
            store.dump(ids, BlockPages(make_cache(seed), torch.tensor([1]))).wait()
    finally:
        os.umask(old)
    return block_files(root)[ids[0]]


def test_default_modes_are_owner_and_group_only(backend, tmp_path):
    path = dump_under_umask(backend, tmp_path, 0, 42)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o750


def test_configured_modes_for_a_service_group(backend, tmp_path):
    # a umask clearing group write must not undo file_mode
    path = dump_under_umask(backend, tmp_path, 0o027, 43, file_mode="0660", dir_mode=0o2770)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o2770


@pytest.mark.parametrize(
    ("field", "value"),
    [("file_mode", "0999"), ("file_mode", "rw-r-----"), ("file_mode", 0o4640), ("file_mode", "0440"),
     ("file_mode", True), ("dir_mode", 0o640), ("dir_mode", "77777"), ("dir_mode", 1.5)],
)
def test_bad_modes_name_the_field(backend, tmp_path, field, value):
    with pytest.raises(UcmConfigError, match=f"{field}.*octal"):
        nfs(backend, tmp_path, **{field: value})


# ---------------------------------------------------------------------------- keyed checksum
def key_file(path, key: bytes = b"0123456789abcdef0123456789abcdef") -> str:
    path.write_bytes(key + b"\n")  # e.g. `openssl rand -hex 16 > key`: the newline is not part of the key
    path.chmod(0o600)
    return str(path)


def _resign_header(path: str, edit) -> None:
    """Edit a block file's header and recompute its (unkeyed) header crc, as anyone with write access can."""
    with open(path, "r+b") as f:
        header = bytearray(f.read(HEADER_SIZE))
        edit(header)
        struct.pack_into("<I", header, _FIELDS.size, zlib.crc32(header[: _FIELDS.size]))
        f.seek(0)
        f.write(header)


def test_keyed_checksum_refuses_blocks_written_without_the_key(backend, tmp_path):
    """checksum 'hmac_sha256': a writer without the key cannot make a block this engine loads: not by writing its
    own (unkeyed, kept for the engines that read it), not by editing a signed one's payload, not by relabelling a
    signed block as another id (deleted as damaged). Engines with another key or none keep the signed blocks."""
    root = tmp_path / "kv"
    root.mkdir()
    src = make_cache(47)
    ids = ids_for(47, 4)
    with nfs(backend, root, checksum_key_file=key_file(tmp_path / "key")) as store:
        assert store.checksum == "hmac_sha256"
        store.dump(ids[:2], BlockPages(src, torch.tensor([1, 2]))).wait()
        files = block_files(root)
        dst = make_cache()
        store.load(ids[:2], BlockPages(dst, torch.tensor([3, 4]))).wait()
        assert page_bytes(dst, 3) == page_bytes(src, 1) and page_bytes(dst, 4) == page_bytes(src, 2)
        with nfs(backend, root, checksum="crc32") as forger:  # write access, no key
            forger.dump(ids[2:3], BlockPages(make_cache(99), torch.tensor([5]))).wait()
        files = block_files(root)
        relabelled = root / ids[3][:2] / f"{ids[3]}.kv"
        relabelled.parent.mkdir(exist_ok=True)
        shutil.copyfile(files[ids[0]], relabelled)
        _resign_header(str(relabelled), lambda h: struct.pack_into("128s", h, _FIELDS.size - 128, ids[3].encode()))
        flip(files[ids[1]], HEADER_SIZE + 11)
        dst = make_cache()
        with pytest.raises(StoreLoadError) as info:
            store.load(ids, BlockPages(dst, torch.arange(4))).wait()
        reasons = info.value.reasons
        assert info.value.failed_ids == ids[1:]
        assert "keyed checksum mismatch" in reasons[ids[1]] and "file removed" in reasons[ids[1]]
        assert "not signed with a key" in reasons[ids[2]] and "file kept" in reasons[ids[2]]
        assert "keyed checksum mismatch" in reasons[ids[3]]
        assert all(page_bytes(dst, i) == ZERO for i in (1, 2, 3)) and page_bytes(dst, 0) == page_bytes(src, 1)
        assert store.lookup(ids) == [True, False, False, False]
        assert sorted(block_files(root)) == sorted([ids[0], ids[2]])
    other_key = key_file(tmp_path / "other", b"another key of 16+ bytes")
    for extra, why in [({"checksum_key_file": other_key}, "signed with another key"), ({}, "no checksum key")]:
        with nfs(backend, root, **extra) as other:
            with pytest.raises(StoreLoadError, match=f"{why}.*file kept"):
                other.load(ids[:1], BlockPages(make_cache(), torch.tensor([0]))).wait()
    assert sorted(block_files(root)) == sorted([ids[0], ids[2]])


def test_keyed_checksum_config(backend, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # must not block the start
    (tmp_path / "short").write_bytes(b"too short\n")
    good = key_file(tmp_path / "key")
    cases = [
        ({"checksum": "hmac_sha256"}, "checksum_key_file", "<missing>"),
        ({"checksum_key_file": str(tmp_path / "short")}, "checksum_key_file", "holds 9 bytes"),
        ({"checksum_key_file": str(fifo)}, "checksum_key_file", "not a regular file"),
        ({"checksum_key_file": str(tmp_path / "none")}, "checksum_key_file", "No such file"),
        ({"checksum_key_file": good, "checksum": "crc32"}, "checksum", "'hmac_sha256' \\(or left out\\)"),
    ]
    for extra, field, match in cases:
        with pytest.raises(UcmConfigError, match=match) as info:
            nfs(backend, tmp_path, **extra)
        assert info.value.field == f"ucm_connector_config.{field}" and "0123456789" not in str(info.value)
