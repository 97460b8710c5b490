"""Budget controller: which blocks a request keeps (block-aligned and ragged prompts, growth, preemption)."""

from __future__ import annotations

import pytest

from ucm.sparse.budget import num_work_blocks, plan_blocks, window_layout
from ucm.sparse.config import EsaConfig

CFG = EsaConfig()  # init 1, local 2, min_blocks 4, ratio 0.2


def test_block_aligned_prompt_first_decode_step():
    # 64 blocks of 16: candidates [1, 62) = 61 -> k = 12; first decode token opens block 64
    plan = plan_blocks(1024, 1024, 1025, 16, CFG)
    assert plan.sparse and plan.num_total_blocks == 65
    assert plan.sink_positions == (0,)
    assert plan.work_positions == tuple(range(1, 13))
    assert plan.freed_positions == tuple(range(13, 62))
    assert plan.kept_positions == (0, *range(1, 13), 62, 63, 64)
    assert plan.num_blocks == 1 + 12 + 2 + 1 and plan.num_slots == 16 * 16


def test_ragged_prompt_decode_fills_last_prompt_block_first():
    # 1000 tokens: 63 blocks, the last holds 8 tokens; decode writes there until token 1008
    plan = plan_blocks(1000, 1000, 1001, 16, CFG)
    assert plan.num_total_blocks == 63
    assert plan.kept_positions == (0, *range(1, 13), 61, 62)  # 60 candidates -> k = 12
    grown = plan_blocks(1000, 1008, 1009, 16, CFG)
    assert grown.kept_positions == (0, *range(1, 13), 61, 62, 63)
    assert grown.freed_positions == plan.freed_positions


def test_output_growth_adds_one_block_per_block_size_tokens():
    counts = [plan_blocks(1024, 1024, n, 16, CFG).num_blocks for n in range(1025, 1025 + 16 * 5)]
    assert counts[0] == 16 and counts[-1] == 20
    assert all(b - a in (0, 1) for a, b in zip(counts, counts[1:], strict=False))
    assert sum(b - a for a, b in zip(counts, counts[1:], strict=False)) == 4


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
    plan = plan_blocks(prompt, prompt, prompt + 1, block_size, CFG)
    extra = plan.num_total_blocks - layout.prompt_blocks
    assert plan.num_blocks == expected + extra
    assert set(plan.kept_positions).isdisjoint(plan.freed_positions)
    assert sorted(plan.kept_positions + plan.freed_positions) == list(range(plan.num_total_blocks))


def test_ratio_rounding():
    assert num_work_blocks(100, 0.29) == 29 and num_work_blocks(10, 0.7) == 7 and num_work_blocks(10, 1.0) == 10
