"""Block ids: deterministic across processes, chained over the prefix, namespaced, and safe as file names."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ucm.errors import UcmConfigError
from ucm.store.naming import block_ids_for_tokens, check_block_id, is_block_id, make_namespace

NS = make_namespace(model="tiny", dtype="bfloat16", tp_rank=0, layout="nhd")


def test_full_blocks_only_and_prefix_property():
    tokens = list(range(100, 150))
    ids = block_ids_for_tokens(tokens, 16, NS)
    assert len(ids) == 3 and all(is_block_id(b) for b in ids) and len(set(ids)) == 3
    # a prefix hashes to the same leading ids; a change in block 1 changes ids 1.. but not 0
    assert block_ids_for_tokens(tokens[:32], 16, NS) == ids[:2]
    changed = tokens.copy()
    changed[20] += 1
    other = block_ids_for_tokens(changed, 16, NS)
    assert other[0] == ids[0] and other[1] != ids[1] and other[2] != ids[2]
    # continuation from a parent id equals hashing the whole sequence
    assert block_ids_for_tokens(tokens[16:48], 16, NS, parent_id=ids[0]) == ids[1:3]


def test_namespace_separates_engines():
    tokens = list(range(32))
    base = block_ids_for_tokens(tokens, 16, NS)
    for ns in (make_namespace(model="tiny", dtype="float16", tp_rank=0, layout="nhd"),
               make_namespace(model="tiny", dtype="bfloat16", tp_rank=1, layout="nhd")):
        assert set(block_ids_for_tokens(tokens, 16, ns)).isdisjoint(base)
    assert make_namespace(b=1, a="x") == make_namespace(a="x", b=1) == "a=x;b=1"


def test_same_ids_in_another_process():
    code = (
        "from ucm.store.naming import block_ids_for_tokens as f;"
        f"print(','.join(f(list(range(100, 150)), 16, {NS!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert out.split(",") == block_ids_for_tokens(list(range(100, 150)), 16, NS)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ABCDEF0123456789", "abc", "0" * 129, 12345, None, "a/" * 10])
def test_bad_ids_rejected(bad):
    assert not is_block_id(bad)
    with pytest.raises(UcmConfigError, match="block id"):
        check_block_id(bad)


def test_bad_block_size():
    with pytest.raises(UcmConfigError, match="block_size"):
        block_ids_for_tokens([1, 2, 3], 0, NS)
