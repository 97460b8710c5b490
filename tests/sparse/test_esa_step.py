"""ESA decode step (scoring + top-k + sparse block table) against dense paged attention, on CPU (and CUDA)."""

from __future__ import annotations

import pytest
import torch
from sparse_cases import candidate_reps, make_case

from ucm.device import get_backend
from ucm.sparse.attention import attention_mass, paged_decode_attention
from ucm.sparse.config import EsaConfig
from ucm.sparse.esa.step import esa_sparse_tables, sparse_block_tables


def _esa_attention(backend, case, config):
    reps, cu, sink_end, local_start, ks = candidate_reps(backend, case, config)
    k = torch.tensor(ks, dtype=torch.int64, device=reps.device)
    table, lens, selected, counts = esa_sparse_tables(
        backend, case.query, reps, cu, case.block_table, case.seq_lens, sink_end, local_start, k, case.block_size
    )
    out = paged_decode_attention(case.query, case.k_cache, case.v_cache, table, lens)
    return out, table, lens, selected, counts, sink_end


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_ratio_one_equals_dense(block_size):
    backend = get_backend("cpu")
    case = make_case([40 * block_size + 3, 23 * block_size, 9 * block_size + 1], block_size=block_size, seed=1)
    config = EsaConfig(sparse_ratio=1.0, min_blocks=4)
    out, table, lens, _, _, _ = _esa_attention(backend, case, config)
    dense = paged_decode_attention(case.query, case.k_cache, case.v_cache, case.block_table, case.seq_lens)
    assert torch.equal(lens, case.seq_lens)  # every block kept
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    for b in range(3):  # the same blocks, the last (partial) one last
        n = -(-int(lens[b]) // block_size)
        assert sorted(table[b, :n].tolist()) == sorted(case.block_table[b, :n].tolist())
        assert table[b, n - 1] == case.block_table[b, n - 1]


def test_needles_always_selected_and_output_close():
    backend = get_backend("cpu")
    case = make_case([1600, 1000, 2047, 700], block_size=16, needles_per_request=3, needle_lo=2, seed=2)
    config = EsaConfig(sparse_ratio=0.1)
    out, table, lens, selected, counts, sink_end = _esa_attention(backend, case, config)
    for b, needles in enumerate(case.needles):
        picked = {sink_end + c for c in selected[b, : int(counts[b])].tolist()}
        local_start = -(-(int(case.seq_lens[b]) - 1) // 16) - config.local_window_sz
        for pos in needles:  # a needle is selected unless it already sits in the local window
            assert pos in picked or pos >= local_start, (b, pos, sorted(picked))
        assert int(lens[b]) < int(case.seq_lens[b]) * 0.2  # 10% of the candidates + windows
    dense = paged_decode_attention(case.query, case.k_cache, case.v_cache, case.block_table, case.seq_lens)
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), dense.flatten(1), dim=1)
    assert bool((cos > 0.95).all()), cos


def test_table_layout_ragged_and_short_selection():
    # hand-checked: sink 1, selected candidates {3, 0} -> positions 4, 1; local from 6; seq 7 blocks of 4 + 2 tokens
    block_table = torch.arange(100, 110, dtype=torch.int32)[None, :]
    seq_lens = torch.tensor([4 * 7 + 2], dtype=torch.int32)
    selected = torch.tensor([[0, 3, -1]])
    counts = torch.tensor([2])
    table, lens = sparse_block_tables(block_table, seq_lens, selected, counts, 1, torch.tensor([6]), 4)
    assert table[0, :5].tolist() == [100, 101, 104, 106, 107]
    assert lens.tolist() == [4 * 4 + 2]


def test_recall_grows_with_ratio_and_structure_beats_random():
    backend = get_backend("cpu")
    recalls = {}
    for structured in (False, True):
        case = make_case([4096] * 2, block_size=16, structured=structured, seed=3)
        for ratio in (0.1, 0.5):
            config = EsaConfig(sparse_ratio=ratio)
            _, table, lens, _, _, _ = _esa_attention(backend, case, config)
            total = 0.0
            for b in range(2):
                mass = attention_mass(case.query[b], case.k_cache, case.block_table[b], int(case.seq_lens[b]))
                kept = set(table[b, : -(-int(lens[b]) // 16)].tolist())
                rows = case.block_table[b, : mass.numel()].tolist()
                total += sum(float(m) for m, page in zip(mass, rows, strict=True) if page in kept) / 2
            recalls[structured, ratio] = total
    assert recalls[False, 0.5] > recalls[False, 0.1]
    assert recalls[True, 0.1] > recalls[False, 0.1] + 0.1
    assert recalls[True, 0.5] > 0.8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_esa_step_matches_cpu_reference():
    cpu, gpu = get_backend("cpu"), get_backend("cuda")
    case = make_case([8000, 3000, 5555], block_size=16, num_q_heads=32, num_kv_heads=8, head_dim=128,
                     needles_per_request=4, needle_lo=2, seed=4)
    config = EsaConfig(sparse_ratio=0.2)
    ref_out, ref_table, ref_lens, ref_sel, ref_counts, _ = _esa_attention(cpu, case, config)
    dev = make_case([8000, 3000, 5555], block_size=16, num_q_heads=32, num_kv_heads=8, head_dim=128,
                    needles_per_request=4, needle_lo=2, seed=4, device="cuda")
    out, table, lens, sel, counts, _ = _esa_attention(gpu, dev, config)
    assert torch.equal(counts.cpu(), ref_counts)
    overlap = [len(set(sel[b].tolist()) & set(ref_sel[b].tolist())) / int(ref_counts[b]) for b in range(3)]
    assert min(overlap) > 0.97, overlap  # float32 ties may differ in the last place
    torch.testing.assert_close(out.cpu(), ref_out, atol=2e-2, rtol=2e-2)
    if min(overlap) == 1.0:
        torch.testing.assert_close(out.cpu(), ref_out, atol=1e-4, rtol=1e-4)
