"""The scheduler-side sparse budget (`ucm.integration.vllm.sparse_budget.SparseBudget`) bound through the release
bindings (`compat.v1_engine.V1SchedulerBlocks`) to a real vLLM `KVCacheManager` and block pool (no engine): shrink
at the first decode step, freed blocks back in the pool, work slots made exclusive (prefix cache index /
copy-on-write), re-shrink after preemption, update hand-off in the connector's `SparseStepMeta`."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheManager  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from ucm.errors import UcmConfigError  # noqa: E402
from ucm.integration.vllm.compat.v1_engine import V1SchedulerBlocks  # noqa: E402
from ucm.integration.vllm.sparse_budget import SparseBudget  # noqa: E402
from ucm.sparse import UcmSparseRole, create_sparse  # noqa: E402

BS = 4
NUM_BLOCKS = 64
# 40-token prompt = 10 blocks: sink [0], candidates [1, 8) (k = 3 work slots: 1, 2, 3), local [8, 10); no spare
# slots for loads ahead (they have their own cases in tests/sparse/test_budget.py)
ESA = {"ESA": {"init_window_sz": 1, "local_window_sz": 2, "min_blocks": 4, "sparse_ratio": 0.5, "prefetch_ratio": 0}}


def make_manager(block_size: int = BS) -> KVCacheManager:
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=32, dtype=torch.float32)
    config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)])
    return KVCacheManager(config, max_model_len=1024, scheduler_block_size=block_size, hash_block_size=block_size)


def make_request(req_id: str, prompt: list[int]) -> Request:
    init_none_hash(sha256)
    return Request(req_id, prompt, SamplingParams(max_tokens=16), None,
                   block_hasher=get_request_block_hasher(BS, sha256))


def prefill(manager: KVCacheManager, request: Request) -> None:
    """Admit ``request`` like the scheduler does (prefix-cache hit, then one allocation for the rest)."""
    hit_blocks, num_hit = manager.get_computed_blocks(request)[:2]
    assert manager.allocate_slots(request, request.num_tokens - num_hit, num_hit, hit_blocks) is not None
    request.num_computed_tokens = request.num_tokens
    request.append_output_token_ids(7)  # the token sampled from the prefill


def decode(manager: KVCacheManager, budget: SparseBudget, request: Request) -> None:
    budget.before_allocate(request, 1)
    assert manager.allocate_slots(request, 1) is not None
    request.num_computed_tokens += 1
    request.append_output_token_ids(7)


def held(manager: KVCacheManager, req_id: str) -> list[int | None]:
    blocks = manager.coordinator.single_type_managers[0].req_to_blocks[req_id]
    return [None if b.is_null else b.block_id for b in blocks]


@pytest.fixture
def setup() -> tuple[KVCacheManager, SparseBudget]:
    manager = make_manager()
    budget = SparseBudget(create_sparse("ESA", ESA, UcmSparseRole.SCHEDULER, block_size=BS))
    budget.bind(V1SchedulerBlocks(manager))
    return manager, budget


def test_first_decode_step_frees_candidates_beyond_the_work_slots(setup) -> None:
    manager, budget = setup
    pool = manager.block_pool
    request = make_request("a", list(range(100, 140)))
    prefill(manager, request)
    before = held(manager, "a")
    free_before = pool.get_num_free_blocks()
    decode(manager, budget, request)
    after = held(manager, "a")
    # positions 4..7 are freed (null), the rest keep their blocks, one new block holds the decode token
    assert after[:4] == before[:4] and after[4:8] == [None] * 4 and after[8:10] == before[8:10]
    assert len(after) == 11 and after[10] is not None
    assert pool.get_num_free_blocks() == free_before + 4 - 1
    # the work slots (1, 2, 3) will be overwritten by the worker: no longer reachable through the prefix cache
    blocks = manager.coordinator.single_type_managers[0].req_to_blocks["a"]
    assert [blocks[p].block_hash is None for p in (1, 2, 3)] == [True] * 3
    assert blocks[0].block_hash is not None and blocks[8].block_hash is not None
    assert budget.take_updates({"a": 1}) == {"a": {4: 0, 5: 0, 6: 0, 7: 0}}
    # later decode steps keep the shrunk list and allocate as usual
    for _ in range(5):
        decode(manager, budget, request)
    assert held(manager, "a")[4:8] == [None] * 4 and budget.stats.shrinks == 1
    # the local window moved: prompt block 8 (stored at prefill) became a candidate and was freed
    assert budget.take_updates({"a": 1}) == {"a": {8: 0}}


def test_a_block_filled_in_decode_is_freed_only_once_its_store_copy_is_confirmed() -> None:
    manager = make_manager()
    confirmed: set[int] = set()
    budget = SparseBudget(create_sparse("ESA", ESA, UcmSparseRole.SCHEDULER, block_size=BS),
                          stored=lambda req_id: confirmed)
    budget.bind(V1SchedulerBlocks(manager))
    request = make_request("a", list(range(100, 140)))  # 10 blocks; block 10 fills with token 43
    prefill(manager, request)
    for _ in range(4 * 4):  # 56 tokens: blocks 10..13 filled in decode, the tail in 14; L = 14 - 1 - 2 = 11
        decode(manager, budget, request)
    after = held(manager, "a")
    assert after[8:10] == [None, None] and after[10] is not None  # no confirmed copy of block 10: held
    assert budget.stats.decode_blocks_held == 1 and budget.stats.decode_blocks_freed == 0
    budget.take_updates({"a": 1})
    confirmed.add(10)  # the workers' dump report arrived
    decode(manager, budget, request)
    assert held(manager, "a")[10] is None and budget.stats.decode_blocks_freed == 1
    assert budget.take_updates({"a": 1}) == {"a": {10: 0}}


def test_prefill_and_dense_requests_are_untouched(setup) -> None:
    manager, budget = setup
    short = make_request("short", list(range(200, 210)))  # 3 blocks < min_blocks
    prefill(manager, short)
    decode(manager, budget, short)
    long = make_request("long", list(range(300, 340)))
    hit_blocks, num_hit = manager.get_computed_blocks(long)[:2]
    manager.allocate_slots(long, 20, num_hit, hit_blocks)  # first prefill chunk
    long.num_computed_tokens = 20
    budget.before_allocate(long, 20)  # second chunk: still prefill
    assert None not in held(manager, "short") and None not in held(manager, "long")
    assert budget.stats.shrinks == 0 and budget.take_updates({"short": 1, "long": 20}) == {}


def test_shared_work_slot_gets_a_private_copy(setup) -> None:
    manager, budget = setup
    prompt = list(range(400, 440))
    a, b = make_request("a", prompt), make_request("b", prompt)
    prefill(manager, a)
    prefill(manager, b)  # full prefix hit on a's blocks (but the last, recomputed)
    shared = held(manager, "b")
    assert held(manager, "a")[:9] == shared[:9]
    decode(manager, budget, a)
    mine = held(manager, "a")
    # a's work slots 1..3 moved to private blocks, b still owns the originals, their content is copied first
    assert all(mine[p] not in shared for p in (1, 2, 3))
    assert held(manager, "b") == shared and budget.stats.work_blocks_copied == 3
    copies, _retained = manager.take_kv_cache_block_copies()
    assert {(c.src_block_id, c.dst_block_id) for c in copies} == {(shared[p], mine[p]) for p in (1, 2, 3)}
    assert budget.take_updates({"a": 1})["a"] == {1: mine[1], 2: mine[2], 3: mine[3], 4: 0, 5: 0, 6: 0, 7: 0}


def test_preempted_request_reshrinks_after_its_dense_re_prefill(setup) -> None:
    manager, budget = setup
    pool = manager.block_pool
    request = make_request("a", list(range(500, 540)))
    prefill(manager, request)
    decode(manager, budget, request)
    decode(manager, budget, request)
    # the scheduler preempts: every block goes back, the request restarts from zero computed tokens
    manager.free(request)
    request.num_computed_tokens = 0
    assert budget.take_updates({}) == {}  # its pending updates die with its blocks
    assert pool.get_num_free_blocks() == NUM_BLOCKS - 1
    hit_blocks, num_hit = manager.get_computed_blocks(request)[:2]
    manager.allocate_slots(request, request.num_tokens - num_hit, num_hit, hit_blocks)
    request.num_computed_tokens = request.num_tokens - 1
    assert None not in held(manager, "a")  # the re-prefill is dense
    decode(manager, budget, request)
    assert held(manager, "a")[4:8] == [None] * 4 and budget.stats.shrinks == 2
    manager.free(request)
    manager.take_kv_cache_block_copies()
    assert pool.get_num_free_blocks() == NUM_BLOCKS - 1


def test_updates_of_unscheduled_requests_wait_for_their_next_step(setup) -> None:
    manager, budget = setup
    request = make_request("a", list(range(600, 640)))
    prefill(manager, request)
    decode(manager, budget, request)
    assert budget.take_updates({"other": 1}) == {}  # shrunk but not scheduled in this step
    assert budget.take_updates({"a": 1}) == {"a": {4: 0, 5: 0, 6: 0, 7: 0}}


def test_block_size_mismatch_is_a_config_error() -> None:
    budget = SparseBudget(create_sparse("ESA", ESA, UcmSparseRole.SCHEDULER, block_size=BS))
    with pytest.raises(UcmConfigError, match="block_size"):
        budget.bind(V1SchedulerBlocks(make_manager(block_size=8)))


def test_step_meta_carries_the_updates_and_the_rebuilt_rows(setup) -> None:
    from types import SimpleNamespace

    manager, budget = setup
    request = make_request("a", list(range(700, 740)))
    prefill(manager, request)
    decode(manager, budget, request)
    output = SimpleNamespace(  # the fields of vLLM's SchedulerOutput the budget reads
        num_scheduled_tokens={"a": 1, "b": 40, "c": 3},
        scheduled_new_reqs=[SimpleNamespace(req_id="b")],
        scheduled_cached_reqs=SimpleNamespace(resumed_req_ids={"c"}),
    )
    meta = budget.step_meta(output)
    assert meta.block_updates == {"a": {4: 0, 5: 0, 6: 0, 7: 0}}
    assert meta.new_req_ids == ["b"] and meta.resumed_req_ids == ["c"]
    budget.request_finished("a")
    assert budget.step_meta(output).block_updates == {}
