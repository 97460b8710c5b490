"""Block ids: chained content hashes of token blocks, namespaced per engine shape.

Owned by the stores; called by the connector (scheduler side to look blocks up, worker side to dump/load them)
and by anything else that must name the same KV bytes the same way in every process and after restarts.

A block id is the lowercase hex blake2b-128 digest of (previous block's digest, this block's token ids). The
first block's "previous digest" is the hash of the namespace, so the same tokens under another model, dtype,
tensor-parallel rank or cache layout get different ids. Token ids are encoded as little-endian int64; nothing
goes through pickle or Python's randomized ``hash``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ucm.errors import UcmConfigError

DIGEST_BYTES = 16
BLOCK_ID_HEX_LEN = 2 * DIGEST_BYTES
# Stores accept any lowercase hex id of 16..128 digits (e.g. vLLM's sha256 block hashes in hex), ours are 32.
_ID_RE = re.compile(r"[0-9a-f]{16,128}")
_VERSION_TAG = b"ucm-block-id/v1\x00"


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def make_namespace(**fields: Any) -> str:
    """A canonical namespace string from keyword fields (order-independent), e.g.
    ``make_namespace(model="llama-8b", dtype="bfloat16", tp_rank=0, tp_size=2, layout="nhd", block_size=16)``.
    Values are rendered with ``str``; fields whose value is None are left out."""
    for key, value in fields.items():
        if isinstance(value, Mapping | list | tuple | set):
            raise UcmConfigError(f"namespace field {key}", value, "a scalar (str, int, float, bool) or None")
    return ";".join(f"{key}={fields[key]}" for key in sorted(fields) if fields[key] is not None)


def namespace_seed(namespace: str) -> bytes:
    """The digest that stands in for the parent of a namespace's first block."""
    return _digest(_VERSION_TAG + namespace.encode("utf-8"))


def block_ids_for_tokens(
    token_ids: Sequence[int], block_size: int, namespace: str, parent_id: str | None = None
) -> list[str]:
    """Ids of the full blocks of `token_ids` (a trailing partial block gets no id).

    ``parent_id``: the id of the block before ``token_ids[0]`` when hashing a continuation (default: the
    sequence starts at token 0 of the namespace). Deterministic across processes, machines and restarts.
    """
    if not isinstance(block_size, int) or block_size <= 0:
        raise UcmConfigError("block_size", block_size, "a positive int")
    prev = namespace_seed(namespace) if parent_id is None else bytes.fromhex(check_block_id(parent_id))
    ids: list[str] = []
    full = len(token_ids) // block_size * block_size
    for start in range(0, full, block_size):
        chunk = token_ids[start : start + block_size]
        payload = b"".join(int(t).to_bytes(8, "little", signed=True) for t in chunk)
        prev = _digest(prev + payload)
        ids.append(prev.hex())
    return ids


def is_block_id(value: object) -> bool:
    """True when `value` is a well-formed block id: 16 to 128 lowercase hex digits."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def check_block_id(value: object) -> str:
    """Return `value` if it is a well-formed block id, else raise `UcmConfigError` (stores call this before an
    id reaches a file name, so ids can never traverse paths)."""
    if not is_block_id(value):
        raise UcmConfigError("block id", value, "a string of 16 to 128 lowercase hex digits")
    return value  # type: ignore[return-value]
