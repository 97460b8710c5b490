"""UcmNfsStore: KV blocks as files in one or several directories that several engines (and machines) may share.

Built by `ucm.store.create_store("UcmNfsStore", ...)`; used by the connector's worker side (and its scheduler
side, for `lookup`). Layout: ``<storage dir>/<first 2 hex digits>/<block id>.kv``; a block's directory is
picked by its id's hash, so blocks spread over all ``storage_backends``. File names come only from validated hex
ids, so an id can never name a path outside the tree.

Writes: gather the pages into a pinned staging buffer (one batched device copy per chunk; host caches are written
straight from their pages), then per block a temporary file ``.tmp-<id>-<host>-<pid>-...`` in the same directory,
header + payload in one ``writev``, fsync, then publish: hard-link it to the final name (atomic, and only if the
name is free, so of two engines writing the same block the first wins) or rename where hard links are missing;
readers see no file or a whole one. Reads: one ``preadv`` into staging, verify header, size and checksum
(`ucm.store.blockfile`), then one batched scatter of the verified rows. All I/O runs on a thread pool of
``io_threads``; `close()` waits for it, and a transfer started once `close()` has begun raises `StoreClosedError`.

Faults never give wrong bytes and never delete a valid block; the block fails (vLLM recomputes it) and the store
keeps serving. A corrupt file is deleted (or, when it cannot be, no longer reported by `lookup` and replaced by
the next dump); a file this engine cannot verify (a newer format, a checksum algorithm not installed here,
another ``kv_block_size``) is kept for the engines that can. The scheduler side's lookup-only instance learns of
such files through `report_failed_loads` (it checks them again). Shard dirs and block files are never opened
through a symlink, and a FIFO or other non-regular entry at a block's name is refused without blocking (a dump
replaces it). New files get ``file_mode`` (default 0640), new shard dirs ``dir_mode`` (0750), whatever the umask.
Checksums detect corruption; only the keyed one (``checksum_key_file``) also refuses blocks written without its key.

Capacity: with ``max_storage_size`` set, a garbage collection pass deletes the least recently accessed blocks
(loads refresh a file's atime explicitly, so ``noatime``/``relatime`` mounts work) down to 90% of the bound; the
same pass deletes temporary files older than ``stale_temp_seconds`` left by crashed writers. It only deletes
regular files named like a block or a temporary file, skips (and counts) what it cannot delete, and never dies.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ucm.device import Backend, PinnedBufferPool
from ucm.store import blockfile
from ucm.store.base import BlockPages, KVStoreBase, StoreStats, StoreTask
from ucm.store.config import (
    MAX_KV_BLOCK_SIZE,
    config_error,
    get_bool,
    get_choice,
    get_float,
    get_int,
    get_mode,
    get_secret_file,
)
from ucm.store.errors import StoreClosedError
from ucm.store.naming import check_block_id, is_block_id
from ucm.store.task import ThreadTask

logger = logging.getLogger(__name__)

SUFFIX = ".kv"
TEMP_PREFIX = ".tmp-"
_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_TEMP_RE = re.compile(r"\.tmp-[0-9a-f]+-[A-Za-z0-9._-]+")  # the store's own temporary files (see _write_block)
# Shard dirs are opened without following a symlink: a link there could lead anywhere outside the tree.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_KNOWN_BAD = 4096  # unusable block files remembered per store (oldest forgotten first)
_MISSING = "not in the store (never dumped, garbage-collected, or its dump has not finished)"
_GC_LOW_WATERMARK = 0.9
_ATIME_REFRESH_S = 60.0
_MAX_IOV = 1000  # writev takes at most IOV_MAX (1024) buffers: header + one per page tensor
DEFAULT_STAGING_BYTES = 64 << 20
MAX_STAGING_BYTES = 4 << 30  # pinned memory per I/O thread
MAX_IO_THREADS = 256
MIN_STALE_TEMP_SECONDS = 60.0  # a slow shared file system may take seconds to write and fsync one block
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64]


def _pool_class(n: int) -> int:
    """Bytes `PinnedBufferPool` really allocates for an `n`-byte request (a power of two, >= 4 KiB)."""
    return max(4096, 1 << (max(n, 1) - 1).bit_length())


class NfsStore(KVStoreBase):
    name = "UcmNfsStore"
    config_fields = {
        "storage_backends": "an existing directory path, or a list of them (same list on every engine)",
        "kv_block_size": "int bytes of one stored block = one vLLM block of all layers of the worker (required)",
        "max_storage_size": "int bytes bound on all block files of all directories, or null for unbounded",
        "io_threads": f"int in [1, {MAX_IO_THREADS}] I/O threads (default 4)",
        "staging_bytes": "int bytes of pinned staging memory per I/O thread, in [kv_block_size, 4 GiB] "
        "(default 64 MiB, or kv_block_size if larger)",
        "o_direct": "bool, bypass the page cache (default false; needs kv_block_size % 4096 == 0)",
        "fsync": "bool, fsync each block file before publishing it (default true)",
        "checksum": f"payload checksum, one of {blockfile.available_checksums()} (default "
        f"{blockfile.default_checksum()!r}, or {blockfile.KEYED!r} when checksum_key_file is set)",
        "checksum_key_file": f"path of a file holding the secret key of checksum {blockfile.KEYED!r} "
        f"({blockfile.MIN_KEY_BYTES} to 4096 bytes; readable only by the engines)",
        "stale_temp_seconds": "seconds >= 60, age after which a temporary file is a crashed writer's leftover "
        "(default 600)",
        "file_mode": "permission bits of block files, an octal string: '0640' (default) or e.g. '0660' for a "
        "service group",
        "dir_mode": "permission bits of the shard dirs the store creates: '0750' (default) or e.g. '2770'",
    }

    def __init__(self, config: Mapping[str, Any], backend: Backend):
        get_int(config, "kv_block_size", maximum=MAX_KV_BLOCK_SIZE)  # required here
        checked = self.check_values(config)
        block, staging = checked["kv_block_size"], checked["staging_bytes"]
        self._roots, self.max_storage_size = checked["storage_backends"], checked["max_storage_size"]
        self.io_threads, self.o_direct, self.fsync = checked["io_threads"], checked["o_direct"], checked["fsync"]
        self.checksum, self.stale_temp_seconds = checked["checksum"], checked["stale_temp_seconds"]
        self._checksum_key: bytes | None = checked["checksum_key"]
        self.file_mode, self.dir_mode = checked["file_mode"], checked["dir_mode"]
        super().__init__(config, backend)

        self._chunk_rows = max(1, staging // block)
        self._align_pad = blockfile.ALIGN if self.o_direct else 0  # room to page-align plain host memory
        pool_bytes = self.io_threads * _pool_class(self._chunk_rows * block + self._align_pad)
        self._staging = PinnedBufferPool(backend, pool_bytes)
        self._pool = concurrent.futures.ThreadPoolExecutor(self.io_threads, thread_name_prefix="ucm-nfs-io")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()  # dumps in flight in this process
        self._reading: Counter[str] = Counter()  # loads in flight in this process: GC keeps these files
        self._direct_ok = dict.fromkeys(self._roots, self.o_direct)
        self._stats = StoreStats(capacity_bytes=self.max_storage_size)
        # blocks this process published or deleted as corrupt (tells a GC pass whether its scan is still current)
        self._content_changes = 0
        self._umask = _process_umask()
        # Block files found unusable, by path: (file identity, corrupt). Kept only when the file stays: a corrupt
        # file that could not be removed (a dump replaces it), or one this engine cannot read (never replaced).
        self._known_bad: OrderedDict[str, tuple[tuple[int, ...], bool]] = OrderedDict()
        self._bad_shards: set[str] = set()  # shard names that are not real directories (e.g. symlinks)
        self._gc_lock = threading.Lock()
        self._gc_thread: threading.Thread | None = None
        self._closed = False
        self._schedule_gc()  # in the background: a shared tree may hold millions of files

    @classmethod
    def check_values(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        block = get_int(config, "kv_block_size", None, maximum=MAX_KV_BLOCK_SIZE)
        roots = cls._check_roots(config.get("storage_backends"))
        max_storage_size = get_int(config, "max_storage_size", None)
        if max_storage_size is not None and block is not None and max_storage_size < blockfile.HEADER_SIZE + block:
            minimum = blockfile.HEADER_SIZE + block
            raise config_error("max_storage_size", max_storage_size, f"null or >= one block file ({minimum} B)")
        io_threads = get_int(config, "io_threads", 4, maximum=MAX_IO_THREADS)
        if "staging_bytes" in config:
            staging = get_int(config, "staging_bytes", maximum=MAX_STAGING_BYTES)
            if block is not None and staging < block:
                raise config_error("staging_bytes", staging, f"an int in [kv_block_size ({block} B), "
                                   f"{MAX_STAGING_BYTES}]")
        else:  # the default holds one block of any size
            staging = max(DEFAULT_STAGING_BYTES, block or 0)
        o_direct = get_bool(config, "o_direct", False)
        key = get_secret_file(config, "checksum_key_file", blockfile.MIN_KEY_BYTES)
        checksum = get_choice(config, "checksum", blockfile.KEYED if key is not None else blockfile.default_checksum(),
                              blockfile.available_checksums())
        if checksum == blockfile.KEYED and key is None:
            raise config_error("checksum_key_file", "<missing>", f"a key file path (checksum {blockfile.KEYED!r} "
                               "signs blocks with its key)")
        if key is not None and checksum != blockfile.KEYED:
            raise config_error("checksum", checksum, f"{blockfile.KEYED!r} (or left out) when checksum_key_file is set")
        if o_direct and (not hasattr(os, "O_DIRECT") or (block is not None and block % blockfile.ALIGN)):
            raise config_error("o_direct", True, f"false unless on Linux with kv_block_size % {blockfile.ALIGN} == 0")
        return {
            "kv_block_size": block,
            "storage_backends": roots,
            "max_storage_size": max_storage_size,
            "io_threads": io_threads,
            "staging_bytes": staging,
            "o_direct": o_direct,
            "fsync": get_bool(config, "fsync", True),
            "checksum": checksum,
            "checksum_key": key,
            "stale_temp_seconds": get_float(
                config, "stale_temp_seconds", 600.0, minimum=MIN_STALE_TEMP_SECONDS,
                why="seconds; a younger temporary file may still be written by another engine sharing the directory",
            ),
            "file_mode": get_mode(config, "file_mode", 0o640, required=0o600, allowed=0o777),
            "dir_mode": get_mode(config, "dir_mode", 0o750, required=0o700, allowed=0o3777),
        }

    # ------------------------------------------------------------------ queries
    def lookup(self, block_ids: Sequence[str]) -> list[bool]:
        self._check_open()
        hits = [self._loadable(check_block_id(b)) for b in block_ids]
        with self._lock:
            self._stats.lookup_hits += sum(hits)
            self._stats.lookup_misses += len(hits) - sum(hits)
        return hits

    def lookup_prefix(self, block_ids: Sequence[str]) -> int:
        """Stops at the first miss: each lookup is a stat, a round trip on NFS."""
        self._check_open()
        count = 0
        for block_id in block_ids:
            if not self._loadable(check_block_id(block_id)):
                break
            count += 1
        with self._lock:
            self._stats.lookup_hits += count
            self._stats.lookup_misses += int(count < len(block_ids))
        return count

    # ------------------------------------------------------------------ transfers
    def dump(self, block_ids: Sequence[str], source: BlockPages) -> StoreTask:
        block_ids = [check_block_id(b) for b in block_ids]
        source.check(len(block_ids), self.kv_block_size, whole_row=True, block_ids=block_ids)
        # A block another task is writing right now is written again (both publish a whole file): waiting for
        # the other task from an I/O thread could deadlock the pool, and skipping would end this task early.
        return self._submit("dump", block_ids, source, self._dump_chunk, self._pending)

    def load(self, block_ids: Sequence[str], destination: BlockPages) -> StoreTask:
        block_ids = [check_block_id(b) for b in block_ids]
        destination.check(len(block_ids), self.kv_block_size, whole_row=False, block_ids=block_ids)
        return self._submit("load", block_ids, destination, self._load_chunk, self._reading)

    def report_failed_loads(self, block_ids: Sequence[str]) -> StoreTask:
        """Verify these blocks' files again on an I/O thread, as a load would (see `KVStoreBase`): a corrupt one is
        deleted or, when it cannot be, remembered like one this engine cannot verify, and no longer reported by
        `lookup`. For the scheduler side's lookup-only instance, which shares no memory with the worker's."""
        block_ids = [check_block_id(b) for b in block_ids]
        task = ThreadTask("load", block_ids, 1)
        with self._lock:
            self._check_open()
            self._pool.submit(self._recheck, task, block_ids)
        return task

    def _submit(self, op: str, block_ids: list[str], pages: BlockPages, job: Any, in_flight: Counter[str]) -> StoreTask:
        """Split the ids into one job per I/O thread (at most a staging buffer each) and queue them; raises
        `StoreClosedError` once `close()` has begun (never the pool's own error)."""
        self._check_open()
        per_chunk = min(self._chunk_rows, max(1, -(-len(block_ids) // self.io_threads)))
        chunks = [list(range(i, min(i + per_chunk, len(block_ids)))) for i in range(0, len(block_ids), per_chunk)]
        task = ThreadTask(op, block_ids, len(chunks))
        ready = self.backend.record_event()  # device copies start after the caller's queued work
        device = pages.slots.device
        jobs = [
            ([block_ids[i] for i in c], pages.slots.index_select(0, torch.tensor(c, device=device)))
            for c in chunks
        ]
        with self._lock:  # close() marks the store closed under this lock, so no job is queued after shutdown
            self._check_open()
            in_flight.update(block_ids)
            for ids, slots in jobs:
                self._pool.submit(job, task, ids, slots, pages, ready)
        return task

    def _dump_chunk(
        self, task: ThreadTask, ids: list[str], slots: torch.Tensor, source: BlockPages, ready: Any
    ) -> None:
        try:
            todo = [i for i, b in enumerate(ids) if not self._stored(b)]
            with self._lock:
                self._stats.dumps_skipped += len(ids) - len(todo)
            pages = source.pages
            if todo and self._writes_from_pages(pages):
                # Host-resident cache (e.g. vLLM on CPU): write straight from the pages, no staging copy.
                ready.synchronize()
                for i in todo:
                    slot = int(slots[i])
                    self._dump_one(task, ids[i], [_byte_view(page[slot]) for page in pages])
            elif todo:
                with self._staging_rows(len(todo)) as buf:
                    stream = self._stream()
                    self.backend.wait_event(ready, stream)
                    self.backend.gather_blocks(source.cache, slots[todo], buf, stream=stream).wait()
                    rows = buf.numpy()
                    for row, i in enumerate(todo):
                        self._dump_one(task, ids[i], [memoryview(rows[row])])
        except Exception as exc:  # a device/staging failure fails the blocks not yet published
            unpublished = [b for b in ids if not self._stored(b)]
            task.fail(unpublished, f"dump failed: {type(exc).__name__}: {exc}")
            with self._lock:
                self._stats.dump_failures += len(unpublished)
        finally:
            with self._lock:
                self._pending.subtract(ids)
                self._pending += Counter()  # drop ids whose count reached 0
            task.part_done()

    def _recheck(self, task: ThreadTask, ids: list[str]) -> None:
        """The job of `report_failed_loads`: read and verify each file, the bytes go nowhere (plain memory: a
        lookup-only instance pins none). Not counted as loads."""
        try:
            payload = memoryview(np.empty(self.kv_block_size, dtype=np.uint8))
            for block_id in ids:
                fd, st, reason = self._open_for_read(block_id, payload)
                if fd is not None:
                    reason = self._read_block(block_id, fd, st, payload)
                if reason is not None:
                    task.fail([block_id], reason)
        except Exception as exc:
            task.fail(ids, f"check failed: {type(exc).__name__}: {exc}")
        finally:
            task.part_done()

    @staticmethod
    def _writes_from_pages(pages: list[torch.Tensor]) -> bool:
        """Whether blocks go straight between the cache pages (host memory) and files/staging, without a
        device copy: dumps write from the pages, loads copy verified rows into them."""
        return all(p.device.type == "cpu" for p in pages) and len(pages) < _MAX_IOV

    def _dump_one(self, task: ThreadTask, block_id: str, payload: list[memoryview]) -> None:
        root, _, _ = self._path(block_id)
        try:
            nbytes = self._write_block(block_id, payload)
        except OSError as exc:
            task.fail([block_id], self._describe(exc, root))
            with self._lock:
                self._stats.dump_failures += 1
            if exc.errno == errno.ENOSPC:
                self._schedule_gc()
            return
        with self._lock:
            self._stats.blocks_dumped += 1
            self._stats.bytes_dumped += self.kv_block_size
            self._stats.used_bytes += nbytes
            self._stats.stored_blocks += 1 if nbytes else 0
            self._content_changes += 1
            over = self.max_storage_size is not None and self._stats.used_bytes > self.max_storage_size
        if over:
            self._schedule_gc()

    def _load_chunk(
        self, task: ThreadTask, ids: list[str], slots: torch.Tensor, destination: BlockPages, ready: Any
    ) -> None:
        try:
            with self._staging_rows(len(ids)) as buf:
                rows = buf.numpy()
                pages = destination.pages
                to_host = self._writes_from_pages(pages)
                if to_host:
                    ready.synchronize()
                # Open every file first and let the kernel read ahead, so disk reads overlap verification.
                opened = [self._open_for_read(block_id, memoryview(rows[i])) for i, block_id in enumerate(ids)]
                good: list[int] = []
                try:
                    for i, block_id in enumerate(ids):
                        fd, st, reason = opened[i]
                        opened[i] = (None, None, None)
                        if fd is not None:
                            reason = self._read_block(block_id, fd, st, memoryview(rows[i]))
                        if reason is not None:
                            task.fail([block_id], reason)
                            continue
                        good.append(i)
                        if to_host:  # host-resident cache: copy the verified row while it is still in cache
                            _copy_row_to_pages(rows[i], pages, int(slots[i]), destination.row_offset)
                finally:
                    for fd, _, _ in opened:
                        if fd is not None:
                            os.close(fd)
                if good and not to_host:
                    stream = self._stream()
                    self.backend.wait_event(ready, stream)
                    start = destination.row_offset
                    src = buf[:, start : start + destination.row_bytes]
                    rows_t = torch.tensor(good, dtype=torch.int64)
                    dest_slots = slots[rows_t]
                    self.backend.scatter_blocks(src, destination.cache, dest_slots, rows=rows_t, stream=stream).wait()
                with self._lock:
                    self._stats.blocks_loaded += len(good)
                    self._stats.bytes_loaded += len(good) * destination.row_bytes
                    self._stats.load_failures += len(ids) - len(good)
        except Exception as exc:
            task.fail(ids, f"load failed: {type(exc).__name__}: {exc}")
            with self._lock:
                self._stats.load_failures += len(ids)
        finally:
            with self._lock:
                self._reading.subtract(ids)
                self._reading += Counter()  # drop ids whose count reached 0
            task.part_done()

    # ------------------------------------------------------------------ files
    def _path(self, block_id: str) -> tuple[str, str, str]:
        """(storage dir, shard dir, block file) of a validated block id."""
        root = self._roots[int(block_id[-8:], 16) % len(self._roots)]
        shard = os.path.join(root, block_id[:2])
        return root, shard, os.path.join(shard, block_id + SUFFIX)

    def _loadable(self, block_id: str) -> bool:
        """What `lookup` reports: a regular file is at the block's name and this store has not found it unusable
        (one lstat; symlinks, FIFOs and directories there are never loaded)."""
        _, shard, path = self._path(block_id)
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        if not (self._known_bad or self._bad_shards):
            return True
        with self._lock:
            bad = self._known_bad.get(path)
            return shard not in self._bad_shards and (bad is None or bad[0] != _identity(st))

    def _stored(self, block_id: str) -> bool:
        """Whether a dump may skip the block: a regular file is at its name that is not known to be corrupt. A
        file this engine cannot read (e.g. a newer format) counts as stored: another engine's block is never
        overwritten."""
        _, shard, path = self._path(block_id)
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or not _is_real_dir(shard):  # lstat followed a linked shard dir
            return False
        return not self._known_corrupt(path, st)

    def _write_block(self, block_id: str, payload: list[memoryview]) -> int:
        """Write, sync and publish one block file; returns the bytes it adds to the store (0 when another writer
        published the block meanwhile). Raises OSError (temp file removed)."""
        root, shard, final = self._path(block_id)
        tmp = f"{TEMP_PREFIX}{block_id}-{_HOST}-{os.getpid()}-{secrets.token_hex(6)}"
        header = blockfile.header_buffer()
        blockfile.fill_header(header, block_id, payload, self.checksum, self._checksum_key)
        dir_fd = self._open_shard(shard, create=True)
        try:
            fd = self._open(root, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, payload, dir_fd, self.file_mode)
            try:
                if self.file_mode & self._umask:  # give back the bits the umask cleared (never more than asked)
                    with contextlib.suppress(OSError):
                        os.fchmod(fd, self.file_mode)
                blockfile.write_all(fd, [header, *payload])
                if self.fsync:
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise
            os.close(fd)
            try:
                self._before_publish(os.path.join(shard, tmp))
                new = self._publish(dir_fd, tmp, final)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        # No directory fsync: a publish lost in a machine crash only loses the block (a miss, its temporary file
        # is collected later); the content is already durable, so a published name never shows partial data.
        return blockfile.HEADER_SIZE + self.kv_block_size if new else 0

    def _publish(self, dir_fd: int, tmp: str, final: str) -> bool:
        """Give the complete file `tmp` the name of `final` (both in shard dir `dir_fd`) atomically; False when
        another writer already had (its file holds the same block, verified on every load). A hard link publishes
        only if the name is free, so the first writer wins and counts stay exact; file systems without hard links
        fall back to rename. Whatever else holds the name (a symlink, a FIFO, a file found corrupt) is replaced by
        the rename, which never follows it; a directory there fails the block."""
        name = os.path.basename(final)
        try:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return True
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "a directory is in the way", final)
        regular = st is not None and stat.S_ISREG(st.st_mode)
        if regular and not self._known_corrupt(final, st):
            return False
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return not regular

    def _before_publish(self, temp_path: str) -> None:
        """Called after a block's temporary file is complete and synced, right before publishing (test hook)."""

    def _open_shard(self, shard: str, create: bool = False) -> int:
        """An fd of a shard dir, opened without following a symlink; made (with `dir_mode`) when `create`. Raises
        OSError: ENOENT when missing, ELOOP/ENOTDIR when not a real directory (then remembered for `lookup`)."""
        made = False
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(shard, self.dir_mode)  # never makedirs: a vanished storage dir must fail, not be recreated
                made = True
        try:
            fd = os.open(shard, _DIR_FLAGS)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                with self._lock:
                    self._bad_shards.add(shard)
            raise
        if self._bad_shards:
            with self._lock:
                self._bad_shards.discard(shard)
        if made and self.dir_mode & (self._umask | 0o7000):  # the umask (and mkdir, for setgid) cleared bits
            with contextlib.suppress(OSError):
                os.fchmod(fd, self.dir_mode)
        return fd

    def _open_for_read(
        self, block_id: str, payload: memoryview
    ) -> tuple[int | None, os.stat_result | None, str | None]:
        """(fd, its stat, None), or (None, None, why the block cannot be read); hints the kernel to read it ahead.
        Never blocks: a FIFO opens at once (O_NONBLOCK) and is refused like any entry that is not a regular file;
        neither the shard dir nor the file is opened through a symlink."""
        root, shard, path = self._path(block_id)
        try:
            dir_fd = self._open_shard(shard)
        except FileNotFoundError:
            return None, None, _MISSING
        except OSError as exc:
            return None, None, self._describe(exc, root, shard)
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
            fd = self._open(root, os.path.basename(path), flags, [payload], dir_fd)
        except FileNotFoundError:
            return None, None, _MISSING
        except OSError as exc:
            reason = self._describe(exc, root, path)
            if exc.errno in (errno.EACCES, errno.EPERM) and self._remember_unreadable(dir_fd, path):
                reason += "; the file is kept and no longer reported by lookup"
            return None, None, reason
        finally:
            os.close(dir_fd)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            return None, None, self._describe(exc, root, path)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None, None, f"{path} is {_kind(st.st_mode)}, not a block file (left in place; a dump replaces it)"
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        return fd, st, None

    def _read_block(self, block_id: str, fd: int, st: os.stat_result, payload: memoryview) -> str | None:
        """Read and verify one block from `fd` (closed here) into `payload`; None on success, else why not. Only a
        corrupt file is deleted; one this engine cannot read is kept (and no longer reported by `lookup`)."""
        root, shard, path = self._path(block_id)
        try:
            header = blockfile.header_buffer()
            blockfile.read_all(fd, [header, payload])
            blockfile.check_block(header, payload, block_id, st.st_size, self._checksum_key)
            if time.time() - st.st_atime > _ATIME_REFRESH_S:  # GC evicts by access time; keep it fresh cheaply
                with contextlib.suppress(OSError):
                    os.utime(fd, ns=(time.time_ns(), st.st_mtime_ns))
        except blockfile.BlockUnsupportedError as exc:
            self._remember_bad(path, st, corrupt=False)
            return f"{path}: {exc} (file kept: another engine may read it)"
        except blockfile.BlockFileError as exc:
            return f"{path}: {exc} ({self._remove_corrupt(shard, path, st)})"
        except OSError as exc:
            return self._describe(exc, root, path)
        finally:
            os.close(fd)
        return None

    def _remove_corrupt(self, shard: str, path: str, st: os.stat_result) -> str:
        """Delete the corrupt file `st` at `path` so the block can be dumped again (not if another file has taken
        the name meanwhile); returns what happened, for the failure reason. A file that stays is remembered:
        `lookup` stops reporting it and a dump replaces it."""
        name = os.path.basename(path)
        try:
            dir_fd = os.open(shard, _DIR_FLAGS)
            try:
                now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    return "file kept: a new file has replaced it"
                os.unlink(name, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
            with self._lock:  # no longer content (a dump of the block counts it again): what publishing it added
                self._stats.used_bytes = max(0, self._stats.used_bytes - blockfile.HEADER_SIZE - self.kv_block_size)
                self._content_changes += 1
                self._stats.stored_blocks = max(0, self._stats.stored_blocks - 1)
        except FileNotFoundError:
            return "file already removed"
        except OSError as exc:
            self._remember_bad(path, st, corrupt=True)
            return f"file could not be removed: {exc.strerror}; no longer reported by lookup"
        return "file removed"

    def _remember_unreadable(self, dir_fd: int, path: str) -> bool:
        """Remember a regular block file this engine may not open (e.g. another user's 0600 file): it would fail
        every load; like a file it cannot verify, it is kept and never overwritten. False if it cannot be told."""
        try:
            st = os.stat(os.path.basename(path), dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        self._remember_bad(path, st, corrupt=False)
        return True

    def _remember_bad(self, path: str, st: os.stat_result, corrupt: bool) -> None:
        with self._lock:
            self._known_bad[path] = (_identity(st), corrupt)
            self._known_bad.move_to_end(path)
            while len(self._known_bad) > _MAX_KNOWN_BAD:
                self._known_bad.popitem(last=False)

    def _known_corrupt(self, path: str, st: os.stat_result) -> bool:
        """Whether `st` is the very file at `path` that a load found corrupt (and could not remove)."""
        if not self._known_bad:
            return False
        with self._lock:
            bad = self._known_bad.get(path)
        return bad is not None and bad[1] and bad[0] == _identity(st)

    def _open(self, root: str, name: str, flags: int, bufs: list[memoryview], dir_fd: int, mode: int = 0o600) -> int:
        flags |= os.O_CLOEXEC
        if self._direct_ok[root] and all(_aligned(b) for b in bufs):
            try:
                return os.open(name, flags | os.O_DIRECT, mode, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            fd = os.open(name, flags, mode, dir_fd=dir_fd)
            if stat.S_ISREG(os.fstat(fd).st_mode):  # not a FIFO or device refusing O_DIRECT: the file system is
                self._direct_ok[root] = False  # without O_DIRECT support (e.g. tmpfs)
            return fd
        return os.open(name, flags, mode, dir_fd=dir_fd)

    @staticmethod
    def _describe(exc: OSError, root: str, path: str | None = None) -> str:
        code = errno.errorcode.get(exc.errno or 0, "")
        if path is None:  # os errors name the full path, except those relative to a dir fd
            path = exc.filename if isinstance(exc.filename, str) and os.path.isabs(exc.filename) else root
        link = f"{path} is a symbolic link; links below storage dir {root} are never followed"
        known = {
            errno.ENOSPC: f"no space left in storage dir {root} (ENOSPC)",
            errno.EDQUOT: f"disk quota exceeded in storage dir {root} (EDQUOT)",
            errno.EROFS: f"storage dir {root} is on a read-only file system (EROFS)",
            errno.EACCES: f"permission denied in storage dir {root} (EACCES)",
            errno.EPERM: f"operation not permitted in storage dir {root} (EPERM)",
            errno.ENOENT: f"storage dir {root} is missing (ENOENT)",
            errno.ELOOP: f"{link} (ELOOP)",
            errno.ENOTDIR: f"{link} (ENOTDIR)" if os.path.islink(path) else f"{path} is not a directory (ENOTDIR)",
            errno.EISDIR: f"{path} is a directory, not a block file (EISDIR)",
        }
        return known.get(exc.errno, f"I/O error in storage dir {root}: {code} {exc.strerror or exc}")

    # ------------------------------------------------------------------ garbage collection
    def collect_garbage(self) -> dict[str, int]:
        """One pass over every storage dir: delete stale temporary files and, over `max_storage_size`, the least
        recently accessed blocks (not those this process is loading) down to 90% of it. Returns counts.

        Only regular files named like a block or a temporary file of the store are ever deleted, and links are
        never followed. Entries it cannot use or delete (a directory or FIFO at a block's name, a linked shard
        dir, a read-only or permission-denied file) are skipped and counted (``skipped``, `StoreStats.gc_skipped`);
        the rest of the pass goes on, so the size bound holds as far as the deletable blocks allow.

        Runs in the background at construction and when a dump goes over the bound (or hits ENOSPC); callable any
        time (passes are serialized)."""
        with self._gc_lock:
            with self._lock:
                changes_before = self._content_changes
            now = time.time()
            temps_removed = skipped = 0
            bad_shards: set[str] = set()
            blocks: list[tuple[float, int, str, str]] = []  # (atime, size, shard dir, file name)
            for root in self._roots:
                for shard in _scandir(root):
                    if not _SHARD_RE.fullmatch(shard.name):
                        continue
                    if not _is_dir_entry(shard):  # a symlink (could lead anywhere), a file, or unreadable
                        bad_shards.add(shard.path)
                        skipped += 1
                        continue
                    try:
                        dir_fd = os.open(shard.path, _DIR_FLAGS)
                    except OSError:  # replaced by a link since the listing, or unreadable
                        skipped += 1
                        continue
                    try:
                        for entry in _scandir(dir_fd):
                            is_block = entry.name.endswith(SUFFIX) and is_block_id(entry.name[: -len(SUFFIX)])
                            if not (is_block or _TEMP_RE.fullmatch(entry.name)):
                                continue  # not the store's (e.g. an NFS client's .nfs* file): left alone
                            try:
                                st = entry.stat(follow_symlinks=False)
                            except FileNotFoundError:
                                continue  # vanished since the listing
                            except OSError:  # e.g. a shard dir we may list but not search (EACCES)
                                skipped += 1
                                continue
                            if not stat.S_ISREG(st.st_mode):
                                skipped += 1
                            elif is_block:
                                blocks.append((st.st_atime, st.st_size, shard.path, entry.name))
                            elif now - st.st_mtime > self.stale_temp_seconds:
                                removed = _unlink_at(dir_fd, entry.name)
                                temps_removed += removed is True
                                skipped += removed is False
                    finally:
                        os.close(dir_fd)
            used = sum(size for _, size, _, _ in blocks)
            scanned_used, evicted = used, 0
            if self.max_storage_size is not None and used > self.max_storage_size:
                target = int(self.max_storage_size * _GC_LOW_WATERMARK)
                with self._lock:
                    busy = set(self._reading) | set(self._pending)
                for _, size, shard, name in sorted(blocks):
                    if used <= target:
                        break
                    if name[: -len(SUFFIX)] in busy:
                        continue
                    removed = _unlink_in(shard, name)
                    if removed is False:
                        skipped += 1
                        continue
                    evicted += removed is True
                    used -= size
            with self._lock:
                self._stats.evictions += evicted
                self._stats.gc_skipped += skipped
                self._bad_shards = bad_shards
                if self._content_changes == changes_before:  # the scan is a consistent picture: take it
                    self._stats.used_bytes = used
                    self._stats.stored_blocks = len(blocks) - evicted
                else:  # blocks were published or removed during the scan: keep the running counts, minus evictions
                    self._stats.used_bytes = max(0, self._stats.used_bytes - (scanned_used - used))
                    self._stats.stored_blocks = max(0, self._stats.stored_blocks - evicted)
            return {"temp_files_removed": temps_removed, "blocks_removed": evicted, "used_bytes": used,
                    "skipped": skipped}

    def _collect_in_background(self) -> None:
        """The GC thread: a pass that fails anyway (e.g. a storage dir unmounted mid-scan) is logged; the next
        pass, at the next dump over the bound, tries again."""
        try:
            self.collect_garbage()
        except Exception:
            logger.exception("UcmNfsStore: garbage collection pass failed")

    def _schedule_gc(self) -> None:
        with self._lock:
            if self._closed or (self._gc_thread is not None and self._gc_thread.is_alive()):
                return
            self._gc_thread = threading.Thread(target=self._collect_in_background, name="ucm-nfs-gc", daemon=True)
            self._gc_thread.start()

    # ------------------------------------------------------------------ housekeeping
    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(**self._stats.as_dict())

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            gc_thread = self._gc_thread
        self._pool.shutdown(wait=True)
        if gc_thread is not None:
            gc_thread.join()

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(self.name)

    def _stream(self) -> torch.Stream:
        """This I/O thread's own side stream, so threads' copies do not serialize."""
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = self.backend.new_stream()
        return stream

    @contextlib.contextmanager
    def _staging_rows(self, rows: int) -> Iterator[torch.Tensor]:
        nbytes = rows * self.kv_block_size
        buf = self._staging.acquire(nbytes + self._align_pad)
        skip = -buf.data_ptr() % blockfile.ALIGN if self._align_pad else 0  # O_DIRECT needs page-aligned rows
        try:
            yield buf[skip : skip + nbytes].view(rows, self.kv_block_size)
        finally:
            self._staging.release(buf)

    @staticmethod
    def _check_roots(value: Any) -> list[str]:
        paths = [value] if isinstance(value, str | os.PathLike) else value
        expected = "a directory path or a non-empty list of them (non-empty paths without NUL bytes)"
        if not isinstance(paths, list | tuple) or not paths or not all(isinstance(p, str | os.PathLike) for p in paths):
            raise config_error("storage_backends", value, expected)
        for path in map(os.fspath, paths):
            if not isinstance(path, str) or not path or "\0" in path:  # "" would be the current directory
                raise config_error("storage_backends", value, expected)
        roots = sorted({os.path.realpath(os.fspath(p)) for p in paths})
        for root in roots:
            if not os.path.isdir(root):
                raise config_error("storage_backends", root, "existing directories (create them first)")
        return roots


def _scandir(path: str | int) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError:
        return []


def _unlink_at(dir_fd: int, name: str) -> bool | None:
    """Remove `name` from the dir `dir_fd`: True if removed, None if already gone, False if it cannot be removed
    (read-only file system, permission, a directory)."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return None
    except OSError:
        return False


def _unlink_in(shard: str, name: str) -> bool | None:
    """`_unlink_at` by shard path, never through a linked shard dir."""
    try:
        dir_fd = os.open(shard, _DIR_FLAGS)
    except FileNotFoundError:
        return None
    except OSError:
        return False
    try:
        return _unlink_at(dir_fd, name)
    finally:
        os.close(dir_fd)


def _is_dir_entry(entry: os.DirEntry) -> bool:
    """Whether a listed entry is a real directory (not a link to one); False when it cannot be told."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """Tells one file from a later one at the same name (another engine may replace a bad block file)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _kind(mode: int) -> str:
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket",
             stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device", stat.S_ISLNK: "a symbolic link"}
    return next((name for test, name in kinds.items() if test(mode)), "not a regular file")


def _process_umask() -> int:
    """The umask, read without changing it (Linux >= 4.7); all bits when unknown, so modes are always set."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return 0o777


def _aligned(buf: memoryview) -> bool:
    """O_DIRECT needs every buffer's address and length aligned."""
    return buf.nbytes % blockfile.ALIGN == 0 and ctypes.addressof(ctypes.c_char.from_buffer(buf)) % blockfile.ALIGN == 0


def _copy_row_to_pages(row: np.ndarray, pages: list[torch.Tensor], slot: int, row_offset: int) -> None:
    """Copy the bytes of a stored row, from `row_offset` on, into page `slot` of each host page tensor."""
    offset = row_offset
    for page in pages:
        dest = page[slot].reshape(-1).view(torch.uint8).numpy()
        dest[:] = row[offset : offset + dest.nbytes]
        offset += dest.nbytes


def _byte_view(page: torch.Tensor) -> memoryview:
    """The bytes of one (contiguous) page of a host tensor, without copying."""
    return memoryview(page.reshape(-1).view(torch.uint8).numpy())
