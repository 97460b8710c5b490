"""Budget controller: which blocks a request keeps (block-aligned and ragged prompts, growth, preemption)."""

from __future__ import annotations

import pytest

from ucm.sparse.budget import num_work_blocks, plan_blocks, window_layout
from ucm.sparse.config import EsaConfig

CFG = EsaConfig(prefetch_ratio=0.25)  # init 1, local 2, min_blocks 4, ratio 0.2, k = 12 -> 3 spare slots


def test_block_aligned_prompt_first_decode_step():
    # 64 blocks of 16: candidates [1, 62) = 61 -> k = 12, 3 spare; first decode token opens block 64
    plan = plan_blocks(1024, 1024, 1025, 16, CFG)
    assert plan.sparse and plan.num_total_blocks == 65
    assert plan.sink_positions == (0,)
    assert plan.work_positions == tuple(range(1, 13))
    assert plan.spare_positions == (13, 14, 15)
    assert plan.freed_positions == tuple(range(16, 62))
    assert plan.kept_positions == (0, *range(1, 16), 62, 63, 64)
    assert plan.num_blocks == 1 + 12 + 3 + 2 + 1 and plan.num_slots == 19 * 16


def test_spare_slots_are_a_share_of_k_and_always_leave_a_candidate_to_free():
    assert window_layout(1024, 16, EsaConfig()).num_spare == 4  # the default 0.4 of k = 12
    assert window_layout(1024, 16, EsaConfig(prefetch_ratio=0)).num_spare == 0  # no loads ahead
    assert window_layout(1024, 16, EsaConfig(prefetch_ratio=1.0)).num_spare == 12
    # 10 candidates, k = 8: 2 candidates beyond k, one of them must stay freeable
    tight = EsaConfig(sparse_ratio=0.8, prefetch_ratio=1.0, local_window_sz=1)
    plan = plan_blocks(12 * 16, 12 * 16, 12 * 16 + 1, 16, tight)
    assert len(plan.work_positions) == 8 and plan.spare_positions == (9,) and plan.freed_positions == (10,)
    assert window_layout(1024, 16, EsaConfig(sparse_ratio=1.0)).num_spare == 0  # nothing is ever loaded
    assert plan_blocks(1024, 1024, 1025, 16, CFG, offload=False).spare_positions == ()  # resident: no loads


def test_ragged_prompt_decode_fills_last_prompt_block_first():
    # 1000 tokens: 63 blocks, the last holds 8 tokens; decode writes there until token 1008
    plan = plan_blocks(1000, 1000, 1001, 16, CFG)
    assert plan.num_total_blocks == 63
    assert plan.kept_positions == (0, *range(1, 16), 61, 62)  # 60 candidates -> k = 12, 3 spare
    grown = plan_blocks(1000, 1008, 1009, 16, CFG)
    assert grown.kept_positions == (0, *range(1, 16), 61, 62, 63)
    assert grown.freed_positions == plan.freed_positions


def test_long_generation_keeps_the_budget_constant():
    # 64 prompt blocks of 16, 40 blocks generated: sink 1 + k 12 + spare 3 + local 2 + tail 1 at every step
    for n in range(1025, 1025 + 16 * 40):
        plan = plan_blocks(1024, n - 1, n, 16, CFG)
        assert plan.num_blocks == 19, n
        total = plan.num_total_blocks
        assert plan.kept_positions == (0, *range(1, 16), total - 3, total - 2, total - 1)
        assert sorted(plan.kept_positions + plan.freed_positions) == list(range(total))
        assert plan.work_positions == tuple(range(1, 13))  # k is the prompt's, the slots never move
        assert plan.candidate_positions == tuple(range(1, total - 3))
        assert plan.decode_blocks_from == 64  # freed positions from 64 on were filled in decode


def test_generated_block_becomes_a_candidate_local_blocks_after_it_fills():
    layout = window_layout(1024, 16, CFG)
    assert layout.local_start_at(1025) == 62  # first decode step: the prompt's own local window
    # block 64 fills with token 1039; it is local while blocks 65 and 66 fill, a candidate once 67 opens
    assert layout.local_start_at(16 * 67) == 64
    assert layout.local_start_at(16 * 67 + 1) == 65
    starts = [layout.local_start_at(n) for n in range(1025, 4000)]
    assert starts == sorted(starts) and starts[0] == 62  # candidates only grow


def test_ragged_prompt_budget_grows_by_the_tail_once_decode_leaves_the_last_prompt_block():
    counts = {plan_blocks(1000, n - 1, n, 16, CFG).num_blocks for n in range(1001, 1009)}
    assert counts == {18}  # sink 1 + k 12 + spare 3 + local 2 (the last prompt block is the partial tail)
    counts = {plan_blocks(1000, n - 1, n, 16, CFG).num_blocks for n in range(1009, 1600)}
    assert counts == {19}
    assert plan_blocks(1000, 1500, 1501, 16, CFG).decode_blocks_from == 62  # the ragged block 62 fills in decode


def test_ratio_one_keeps_every_generated_block():
    config = EsaConfig(sparse_ratio=1.0)
    for n in (1025, 1400, 2000):
        plan = plan_blocks(1024, n - 1, n, 16, config)
        assert plan.sparse and plan.freed_positions == () and plan.num_blocks == plan.num_total_blocks


def test_resume_after_a_long_generation_shrinks_to_the_layout_of_its_length():
    uninterrupted = plan_blocks(1024, 1899, 1900, 16, CFG)
    assert not plan_blocks(1024, 0, 1899, 16, CFG).sparse  # re-prefill of prompt + 875 outputs: dense
    # (later chunks of the re-prefill are left dense by the scheduler hook: vLLM's own prefill boundary)
    assert plan_blocks(1024, 1899, 1900, 16, CFG) == uninterrupted


def test_prefill_chunks_are_dense_and_short_prompts_stay_dense():
    assert not plan_blocks(4096, 2048, 4096, 16, CFG).sparse  # last prefill chunk: still full
    assert plan_blocks(4096, 2048, 4096, 16, CFG).freed_positions == ()
    short = plan_blocks(63, 63, 64, 16, CFG)  # 4 blocks -> min_blocks met but sink + local leave 1 candidate
    assert short.sparse and short.freed_positions == (1,)  # k = int(1 * 0.2) = 0
    assert not plan_blocks(48, 48, 49, 16, CFG).sparse  # 3 blocks < min_blocks
    assert not plan_blocks(100, 100, 101, 16, EsaConfig(min_blocks=8)).sparse  # 7 blocks


def test_preemption_resume_is_dense_then_shrinks_again():
    before = plan_blocks(1000, 1010, 1011, 16, CFG)
    # preempted: KV freed, num_computed reset; the re-prefill of prompt + 11 outputs is dense
    resume = plan_blocks(1000, 0, 1011, 16, CFG)
    assert not resume.sparse and resume.num_blocks == 64
    after = plan_blocks(1000, 1011, 1012, 16, CFG)
    assert after.kept_positions == before.kept_positions and after.freed_positions == before.freed_positions


def test_resident_mode_frees_nothing():
    plan = plan_blocks(1024, 1024, 1025, 16, CFG, offload=False)
    assert plan.sparse and plan.freed_positions == () and plan.num_blocks == 65
    assert plan.work_positions == tuple(range(1, 13))


@pytest.mark.parametrize("block_size", [1, 7, 16, 128])
def test_any_block_size_budget_formula(block_size):
    prompt = 50 * block_size + block_size // 2
    layout = window_layout(prompt, block_size, CFG)
    expected = CFG.init_window_sz + num_work_blocks(layout.num_candidates, 0.2) + CFG.local_window_sz
    expected += min(num_work_blocks(num_work_blocks(layout.num_candidates, 0.2), CFG.prefetch_ratio),
                    layout.num_candidates - layout.num_work - 1)
    plan = plan_blocks(prompt, prompt, prompt + 1, block_size, CFG)
    extra = plan.num_total_blocks - layout.prompt_blocks
    assert plan.num_blocks == expected + extra
    assert set(plan.kept_positions).isdisjoint(plan.freed_positions)
    assert sorted(plan.kept_positions + plan.freed_positions) == list(range(plan.num_total_blocks))


def test_ratio_rounding():
    assert num_work_blocks(100, 0.29) == 29 and num_work_blocks(10, 0.7) == 7 and num_work_blocks(10, 1.0) == 10
