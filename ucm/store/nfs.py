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
(`ucm.store.blockfile`), then one batched scatter of the verified rows; a bad block is reported failed
and its file removed. All I/O runs on a thread pool of ``io_threads``.

Capacity: with ``max_storage_size`` set, a garbage collection pass deletes the least recently accessed blocks
(loads refresh a file's atime explicitly, so ``noatime``/``relatime`` mounts work) down to 90% of the bound; the
same pass deletes temporary files older than ``stale_temp_seconds`` left by crashed writers.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import os
import re
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ucm.device import Backend, PinnedBufferPool
from ucm.store import blockfile
from ucm.store.base import BlockPages, KVStoreBase, StoreStats, StoreTask
from ucm.store.config import MAX_KV_BLOCK_SIZE, config_error, get_bool, get_choice, get_float, get_int
from ucm.store.errors import StoreClosedError
from ucm.store.naming import check_block_id
from ucm.store.task import ThreadTask

SUFFIX = ".kv"
TEMP_PREFIX = ".tmp-"
_SHARD_RE = re.compile(r"[0-9a-f]{2}")
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
        f"{blockfile.default_checksum()!r})",
        "stale_temp_seconds": "seconds >= 60, age after which a temporary file is a crashed writer's leftover "
        "(default 600)",
    }

    def __init__(self, config: Mapping[str, Any], backend: Backend):
        get_int(config, "kv_block_size", maximum=MAX_KV_BLOCK_SIZE)  # required here
        checked = self.check_values(config)
        block, staging = checked["kv_block_size"], checked["staging_bytes"]
        self._roots, self.max_storage_size = checked["storage_backends"], checked["max_storage_size"]
        self.io_threads, self.o_direct, self.fsync = checked["io_threads"], checked["o_direct"], checked["fsync"]
        self.checksum, self.stale_temp_seconds = checked["checksum"], checked["stale_temp_seconds"]
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
        self._published_count = 0  # blocks this process published (tells a GC pass whether its scan is current)
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
            "checksum": get_choice(config, "checksum", blockfile.default_checksum(), blockfile.available_checksums()),
            "stale_temp_seconds": get_float(
                config, "stale_temp_seconds", 600.0, minimum=MIN_STALE_TEMP_SECONDS,
                why="seconds; a younger temporary file may still be written by another engine sharing the directory",
            ),
        }

    # ------------------------------------------------------------------ queries
    def lookup(self, block_ids: Sequence[str]) -> list[bool]:
        self._check_open()
        hits = [os.path.exists(self._path(check_block_id(b))[2]) for b in block_ids]
        with self._lock:
            self._stats.lookup_hits += sum(hits)
            self._stats.lookup_misses += len(hits) - sum(hits)
        return hits

    def lookup_prefix(self, block_ids: Sequence[str]) -> int:
        """Stops at the first miss: each lookup is a stat, a round trip on NFS."""
        self._check_open()
        count = 0
        for block_id in block_ids:
            if not os.path.exists(self._path(check_block_id(block_id))[2]):
                break
            count += 1
        with self._lock:
            self._stats.lookup_hits += count
            self._stats.lookup_misses += int(count < len(block_ids))
        return count

    # ------------------------------------------------------------------ transfers
    def dump(self, block_ids: Sequence[str], source: BlockPages) -> StoreTask:
        block_ids = [check_block_id(b) for b in block_ids]
        source.check(len(block_ids), self.kv_block_size, whole_row=True)
        # A block another task is writing right now is written again (both publish a whole file): waiting for
        # the other task from an I/O thread could deadlock the pool, and skipping would end this task early.
        self._check_open()
        with self._lock:
            self._pending.update(block_ids)
        return self._submit("dump", block_ids, list(range(len(block_ids))), source, self._dump_chunk)

    def load(self, block_ids: Sequence[str], destination: BlockPages) -> StoreTask:
        block_ids = [check_block_id(b) for b in block_ids]
        destination.check(len(block_ids), self.kv_block_size, whole_row=False)
        self._check_open()
        with self._lock:
            self._reading.update(block_ids)
        return self._submit("load", block_ids, list(range(len(block_ids))), destination, self._load_chunk)

    def _submit(self, op: str, block_ids: list[str], picks: list[int], pages: BlockPages, job: Any) -> StoreTask:
        per_chunk = min(self._chunk_rows, max(1, -(-len(picks) // self.io_threads)))
        chunks = [picks[i : i + per_chunk] for i in range(0, len(picks), per_chunk)]
        task = ThreadTask(op, block_ids, len(chunks))
        ready = self.backend.record_event()  # device copies start after the caller's queued work
        for chunk in chunks:
            ids = [block_ids[i] for i in chunk]
            slots = pages.slots.index_select(0, torch.tensor(chunk, dtype=torch.int64, device=pages.slots.device))
            self._pool.submit(job, task, ids, slots, pages, ready)
        return task

    def _dump_chunk(
        self, task: ThreadTask, ids: list[str], slots: torch.Tensor, source: BlockPages, ready: Any
    ) -> None:
        try:
            todo = [i for i, b in enumerate(ids) if not os.path.exists(self._path(b)[2])]
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
            unpublished = [b for b in ids if not os.path.exists(self._path(b)[2])]
            task.fail(unpublished, f"dump failed: {type(exc).__name__}: {exc}")
            with self._lock:
                self._stats.dump_failures += len(unpublished)
        finally:
            with self._lock:
                self._pending.subtract(ids)
                self._pending += Counter()  # drop ids whose count reached 0
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
            self._published_count += 1
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
                        fd, reason = opened[i]
                        opened[i] = (None, None)
                        if fd is not None:
                            reason = self._read_block(block_id, fd, memoryview(rows[i]))
                        if reason is not None:
                            task.fail([block_id], reason)
                            continue
                        good.append(i)
                        if to_host:  # host-resident cache: copy the verified row while it is still in cache
                            _copy_row_to_pages(rows[i], pages, int(slots[i]), destination.row_offset)
                finally:
                    for fd, _ in opened:
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

    def _write_block(self, block_id: str, payload: list[memoryview]) -> int:
        """Write, sync and publish one block file; returns the bytes it adds to the store (0 when another writer
        published the block meanwhile). Raises OSError (temp file removed)."""
        root, shard, final = self._path(block_id)
        with contextlib.suppress(FileExistsError):
            os.mkdir(shard)  # never makedirs: a vanished storage dir must fail, not be recreated
        tmp = os.path.join(shard, f"{TEMP_PREFIX}{block_id}-{_HOST}-{os.getpid()}-{secrets.token_hex(6)}")
        header = blockfile.header_buffer()
        blockfile.fill_header(header, block_id, payload, self.checksum)
        fd = self._open(root, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, payload)
        try:
            blockfile.write_all(fd, [header, *payload])
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        try:
            self._before_publish(tmp)
            new = _publish(tmp, final)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        # No directory fsync: a publish lost in a machine crash only loses the block (a miss, its temporary file
        # is collected later); the content is already durable, so a published name never shows partial data.
        return blockfile.HEADER_SIZE + self.kv_block_size if new else 0

    def _before_publish(self, temp_path: str) -> None:
        """Called after a block's temporary file is complete and synced, right before publishing (test hook)."""

    def _open_for_read(self, block_id: str, payload: memoryview) -> tuple[int | None, str | None]:
        """(fd, None), or (None, why the block file cannot be opened); hints the kernel to read it ahead."""
        root, _, path = self._path(block_id)
        try:
            fd = self._open(root, path, os.O_RDONLY, [payload])
        except FileNotFoundError:
            return None, "not in the store (never dumped, garbage-collected, or its dump has not finished)"
        except OSError as exc:
            return None, self._describe(exc, root)
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        return fd, None

    def _read_block(self, block_id: str, fd: int, payload: memoryview) -> str | None:
        """Read and verify one block from `fd` (closed here) into `payload`; None on success, else why not."""
        root, _, path = self._path(block_id)
        try:
            st = os.fstat(fd)
            header = blockfile.header_buffer()
            blockfile.read_all(fd, [header, payload])
            blockfile.check_block(header, payload, block_id, st.st_size)
        except blockfile.BlockFileError as exc:
            with contextlib.suppress(OSError):
                os.unlink(path)  # corrupt: remove it so the block can be dumped again
            return f"{path}: {exc} (file removed)"
        except OSError as exc:
            return self._describe(exc, root)
        finally:
            os.close(fd)
        if time.time() - st.st_atime > _ATIME_REFRESH_S:  # GC evicts by access time; keep it fresh cheaply
            with contextlib.suppress(OSError):
                os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))
        return None

    def _open(self, root: str, path: str, flags: int, bufs: list[memoryview]) -> int:
        flags |= os.O_CLOEXEC
        if self._direct_ok[root] and all(_aligned(b) for b in bufs):
            try:
                return os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct_ok[root] = False  # this file system does not support O_DIRECT (e.g. tmpfs)
        return os.open(path, flags, 0o644)

    @staticmethod
    def _describe(exc: OSError, root: str) -> str:
        code = errno.errorcode.get(exc.errno or 0, "")
        known = {
            errno.ENOSPC: f"no space left in storage dir {root} (ENOSPC)",
            errno.EDQUOT: f"disk quota exceeded in storage dir {root} (EDQUOT)",
            errno.EROFS: f"storage dir {root} is on a read-only file system (EROFS)",
            errno.EACCES: f"permission denied in storage dir {root} (EACCES)",
            errno.EPERM: f"operation not permitted in storage dir {root} (EPERM)",
            errno.ENOENT: f"storage dir {root} is missing (ENOENT)",
        }
        return known.get(exc.errno, f"I/O error in storage dir {root}: {code} {exc.strerror or exc}")

    # ------------------------------------------------------------------ garbage collection
    def collect_garbage(self) -> dict[str, int]:
        """One pass over every storage dir: delete stale temporary files and, over `max_storage_size`, the least
        recently accessed blocks (not those this process is loading) down to 90% of it. Returns counts.

        Runs in the background at construction and when a dump goes over the bound (or hits ENOSPC); callable any
        time (passes are serialized)."""
        with self._gc_lock:
            with self._lock:
                published_before = self._published_count
            now = time.time()
            temps_removed = 0
            blocks: list[tuple[float, int, str, str]] = []
            for root in self._roots:
                for shard in _scandir(root):
                    if not (shard.is_dir() and _SHARD_RE.fullmatch(shard.name)):
                        continue
                    for entry in _scandir(shard.path):
                        try:
                            st = entry.stat()
                        except OSError:
                            continue
                        if entry.name.startswith(TEMP_PREFIX):
                            if now - st.st_mtime > self.stale_temp_seconds:
                                with contextlib.suppress(OSError):
                                    os.unlink(entry.path)
                                    temps_removed += 1
                        elif entry.name.endswith(SUFFIX):
                            blocks.append((st.st_atime, st.st_size, entry.path, entry.name[: -len(SUFFIX)]))
            used = sum(size for _, size, _, _ in blocks)
            scanned_used, evicted = used, 0
            if self.max_storage_size is not None and used > self.max_storage_size:
                target = int(self.max_storage_size * _GC_LOW_WATERMARK)
                with self._lock:
                    busy = set(self._reading) | set(self._pending)
                for _, size, path, block_id in sorted(blocks):
                    if used <= target:
                        break
                    if block_id in busy:
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                        evicted += 1
                    used -= size
            with self._lock:
                self._stats.evictions += evicted
                if self._published_count == published_before:  # the scan is a consistent picture: take it
                    self._stats.used_bytes = used
                    self._stats.stored_blocks = len(blocks) - evicted
                else:  # blocks were published during the scan: keep the running counts, minus what was deleted
                    self._stats.used_bytes = max(0, self._stats.used_bytes - (scanned_used - used))
                    self._stats.stored_blocks = max(0, self._stats.stored_blocks - evicted)
            return {"temp_files_removed": temps_removed, "blocks_removed": evicted, "used_bytes": used}

    def _schedule_gc(self) -> None:
        with self._lock:
            if self._closed or (self._gc_thread is not None and self._gc_thread.is_alive()):
                return
            self._gc_thread = threading.Thread(target=self.collect_garbage, name="ucm-nfs-gc", daemon=True)
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


def _scandir(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError:
        return []


def _publish(tmp: str, final: str) -> bool:
    """Give the complete file `tmp` the name `final` atomically; False when another writer already had (its
    file holds the same block, verified on every load). A hard link publishes only if the name is free, so the
    first writer wins and counts stay exact; file systems without hard links fall back to rename (last wins)."""
    try:
        os.link(tmp, final)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
    existed = os.path.exists(final)
    os.rename(tmp, final)
    return not existed


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
