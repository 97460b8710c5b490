"""The on-disk format of one stored block (UcmNfsStore): a fixed 4 KiB header, then the payload.

Owned by `ucm.store.nfs`, which writes a block to a temporary name and publishes it; `check_block` verifies
everything before the payload may be used, and tells a damaged file (delete it) from one this engine cannot
read (keep it: another engine may). Header (little-endian), then zero padding to 4096 bytes:

    magic "UCMKVBLK" | u32 format version | u32 header size | u64 payload size | u32 checksum algorithm |
    u32 key id (0 unless keyed) | u64 payload checksum | u32 id length | 128 B block id (ASCII, zero padded) |
    u32 crc32 of all preceding header bytes

The 4 KiB header keeps the payload aligned for O_DIRECT. Checksum algorithms: 1 = xxh3_64 (needs the `xxhash`
package), 2 = crc32 (zlib), 3 = hmac_sha256: HMAC-SHA256 with a secret key over block id, payload size and
payload, truncated to 64 bits; the key id (a hash of the key) tells a block signed with another key (kept for the
engines that hold it) from a forged or damaged one. 1 and 2 detect corruption only: anyone who can write the
directory can write a block that passes them. A key makes a block written without it fail verification.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import mmap
import os
import struct
import threading
import zlib
from collections.abc import Callable, Sequence

try:  # xxh3 runs at memory speed; zlib's crc32 is the always-available fallback
    import xxhash
except ImportError:  # pragma: no cover - depends on the environment
    xxhash = None

MAGIC = b"UCMKVBLK"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
ALIGN = 4096
_FIELDS = struct.Struct("<8sIIQIIQI128s")
_HEADER_CRC = struct.Struct("<I")

CHECKSUMS: dict[str, int] = {"xxh3_64": 1, "crc32": 2, "hmac_sha256": 3}
KEYED = "hmac_sha256"
_KEYED_ALGO = CHECKSUMS[KEYED]
MIN_KEY_BYTES = 16


def available_checksums() -> list[str]:
    return [name for name in CHECKSUMS if name != "xxh3_64" or xxhash is not None]


def default_checksum() -> str:
    return "xxh3_64" if xxhash is not None else "crc32"


def _xxh3(parts: Sequence[memoryview]) -> int:
    if len(parts) == 1:
        return xxhash.xxh3_64_intdigest(parts[0])
    state = xxhash.xxh3_64()
    for part in parts:
        state.update(part)
    return state.intdigest()


def _crc32(parts: Sequence[memoryview]) -> int:
    value = 0
    for part in parts:
        value = zlib.crc32(part, value)
    return value


def _checksum_fn(algo: int) -> Callable[[Sequence[memoryview]], int] | None:
    """The unkeyed checksum of a payload given as consecutive parts (equal to that of the parts concatenated)."""
    if algo == 1:
        return _xxh3 if xxhash is not None else None
    if algo == 2:
        return _crc32
    return None


def key_id(key: bytes) -> int:
    """A 32-bit name of a checksum key, stored in the header (never the key; nonzero)."""
    return int.from_bytes(hashlib.sha256(b"ucm-kv-block-key\0" + key).digest()[:4], "little") or 1


def _keyed(key: bytes, block_id: str, parts: Sequence[memoryview]) -> int:
    """HMAC-SHA256 of (block id, payload size, payload), truncated to 64 bits: binding the id means a signed
    block cannot be passed off as another block by editing its (unkeyed) header."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    mac.update(block_id.encode("ascii") + b"\0" + sum(p.nbytes for p in parts).to_bytes(8, "little"))
    for part in parts:
        mac.update(part)
    return int.from_bytes(mac.digest()[:8], "little")


class BlockFileError(Exception):
    """A block file cannot be used; the message says why. Raised as one of the two subclasses below."""


class BlockCorruptError(BlockFileError):
    """The file is damaged or is not this block (truncated, bad magic, header or payload checksum mismatch,
    another block's content): no engine can use it, so it may be deleted."""


class BlockUnsupportedError(BlockFileError):
    """An intact-looking file this engine cannot verify (a newer format version, a checksum algorithm not
    available here, another ``kv_block_size``): a miss for this engine only, never deleted (in a mixed fleet
    another engine reads it)."""


_local = threading.local()


def header_buffer() -> memoryview:
    """A page-aligned, per-thread scratch buffer of HEADER_SIZE bytes (O_DIRECT needs aligned memory)."""
    buf = getattr(_local, "header", None)
    if buf is None:
        buf = _local.header = memoryview(mmap.mmap(-1, HEADER_SIZE))
    return buf


def fill_header(
    buf: memoryview, block_id: str, payload: Sequence[memoryview], checksum: str, key: bytes | None = None
) -> None:
    """Write the header of the payload (given as consecutive parts) into `buf` (HEADER_SIZE bytes); `key` is the
    secret of the keyed checksum (required for it, ignored otherwise)."""
    algo = CHECKSUMS[checksum]
    if algo == _KEYED_ALGO:
        if key is None:
            raise ValueError(f"checksum {KEYED} needs a key")
        digest, kid = _keyed(key, block_id, payload), key_id(key)
    else:
        digest, kid = _checksum_fn(algo)(payload), 0
    size = sum(part.nbytes for part in payload)
    raw = block_id.encode("ascii")
    buf[:] = bytes(HEADER_SIZE)
    _FIELDS.pack_into(buf, 0, MAGIC, FORMAT_VERSION, HEADER_SIZE, size, algo, kid, digest, len(raw), raw)
    _HEADER_CRC.pack_into(buf, _FIELDS.size, zlib.crc32(buf[: _FIELDS.size]))


def check_block(
    header: memoryview, payload: memoryview, block_id: str, file_size: int, key: bytes | None = None
) -> None:
    """Raise `BlockCorruptError` or `BlockUnsupportedError` unless header + payload are a complete, intact copy
    of block `block_id`. The version is read before the header checksum: a later format may lay its header out
    differently, and must not look corrupt to this engine. With a `key`, only blocks signed with that key pass
    (any other is kept, for the engines that read it); without, a signed block cannot be verified (kept)."""
    if file_size < HEADER_SIZE:
        raise BlockCorruptError(f"truncated: {file_size} B, shorter than the {HEADER_SIZE} B header")
    magic, version = struct.unpack_from("<8sI", header, 0)
    if magic != MAGIC:
        raise BlockCorruptError("not a UCM block file (bad magic)")
    if version > FORMAT_VERSION:
        raise BlockUnsupportedError(f"format version {version} is newer than this engine's ({FORMAT_VERSION})")
    (header_crc,) = _HEADER_CRC.unpack_from(header, _FIELDS.size)
    if header_crc != zlib.crc32(header[: _FIELDS.size]):
        raise BlockCorruptError("header checksum mismatch")
    _magic, _version, header_size, size, algo, kid, digest, id_len, raw = _FIELDS.unpack_from(header, 0)
    if version != FORMAT_VERSION or header_size != HEADER_SIZE:
        raise BlockCorruptError(f"bad format version {version} (header {header_size} B)")
    if raw[:id_len].decode("ascii", "replace") != block_id:
        raise BlockCorruptError(f"file holds block {raw[:id_len].decode('ascii', 'replace')!r}")
    if size != payload.nbytes:
        raise BlockUnsupportedError(f"stored with a {size} B payload, this store's kv_block_size is {payload.nbytes} B")
    if file_size != HEADER_SIZE + size:
        raise BlockCorruptError(f"truncated or wrong size: {file_size} B, expected {HEADER_SIZE + size} B")
    if key is not None or algo == _KEYED_ALGO:
        _check_keyed(algo, kid, digest, key, block_id, payload)
        return
    fn = _checksum_fn(algo)
    if fn is None:
        known = {v: k for k, v in CHECKSUMS.items()}
        what = f"{known[algo]} (install xxhash)" if algo in known else "unknown to this engine"
        raise BlockUnsupportedError(f"checksum algorithm {algo} is not available here: {what}")
    if fn([payload]) != digest:
        raise BlockCorruptError("payload checksum mismatch")


def _check_keyed(algo: int, kid: int, digest: int, key: bytes | None, block_id: str, payload: memoryview) -> None:
    if key is None:
        raise BlockUnsupportedError(f"signed with a key ({KEYED}); this engine has no checksum key")
    if algo != _KEYED_ALGO:
        raise BlockUnsupportedError(f"not signed with a key; this engine accepts only {KEYED} blocks of its key")
    if kid != key_id(key):
        raise BlockUnsupportedError(f"signed with another key (key id {kid:#010x}, this engine's {key_id(key):#010x})")
    if not hmac.compare_digest(_keyed(key, block_id, [payload]).to_bytes(8, "little"), digest.to_bytes(8, "little")):
        raise BlockCorruptError("keyed checksum mismatch (damaged, or written without the key)")


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first `n` bytes from a list of buffers (after a short read or write)."""
    out = []
    for buf in bufs:
        if n >= buf.nbytes:
            n -= buf.nbytes
        else:
            out.append(buf[n:])
            n = 0
    return out


def write_all(fd: int, bufs: list[memoryview]) -> None:
    """Write every byte of `bufs` at the current position (one writev per pass; retries short writes)."""
    bufs = [b for b in bufs if b.nbytes]
    while bufs:
        written = os.writev(fd, bufs)
        if written <= 0:
            raise OSError(errno.EIO, "writev wrote nothing")
        bufs = _advance(bufs, written)


def read_all(fd: int, bufs: list[memoryview]) -> int:
    """Fill `bufs` from offset 0 (one preadv per pass); returns the bytes read (< total only at end of file)."""
    total, pos = 0, 0
    bufs = [b for b in bufs if b.nbytes]
    while bufs:
        got = os.preadv(fd, bufs, pos)
        if got <= 0:
            break
        total += got
        pos += got
        bufs = _advance(bufs, got)
    return total
