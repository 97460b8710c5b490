"""Attention straight over an ESA selection (no sparse table): the fused Triton kernel, the device layer's
reference and the batched ESA step all equal paged attention over the materialized sparse table."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import run_interpreted, run_on_cuda
from sparse_cases import candidate_reps, make_case

from ucm.device import BlockSelection, get_backend
from ucm.errors import UcmConfigError
from ucm.sparse.attention import paged_decode_attention
from ucm.sparse.config import EsaConfig
from ucm.sparse.esa.step import esa_decode_attention, esa_sparse_tables


def _both_steps(backend, case, config):
    reps, cu, sink_end, local_start, ks = candidate_reps(backend, case, config)
    k = torch.tensor(ks, dtype=torch.int64, device=reps.device)
    table, lens, selected, counts = esa_sparse_tables(
        backend, case.query, reps, cu, case.block_table, case.seq_lens, sink_end, local_start, k, case.block_size
    )
    via_table = paged_decode_attention(case.query, case.k_cache, case.v_cache, table, lens)
    fused, fused_sel, fused_counts = esa_decode_attention(
        backend, case.query, reps, cu, case.k_cache, case.v_cache, case.block_table, case.seq_lens, sink_end,
        local_start, k, int(lens.max()),
    )
    assert torch.equal(fused_sel, selected) and torch.equal(fused_counts, counts)
    return fused, via_table, lens


@pytest.mark.parametrize("block_size", [1, 7, 16])
def test_esa_step_without_table_equals_table_path(block_size):
    case = make_case([60 * block_size + 3, 21 * block_size, 9 * block_size + 1], block_size=block_size,
                     needles_per_request=2, needle_lo=2, seed=5)
    fused, via_table, lens = _both_steps(get_backend("cpu"), case, EsaConfig(sparse_ratio=0.25, min_blocks=4))
    assert bool((lens < case.seq_lens).all())  # really sparse
    torch.testing.assert_close(fused, via_table, atol=1e-5, rtol=1e-5)


def test_ratio_one_equals_dense():
    case = make_case([803, 400], block_size=16, seed=6)
    fused, _, lens = _both_steps(get_backend("cpu"), case, EsaConfig(sparse_ratio=1.0))
    assert torch.equal(lens, case.seq_lens)
    dense = paged_decode_attention(case.query, case.k_cache, case.v_cache, case.block_table, case.seq_lens)
    torch.testing.assert_close(fused, dense, atol=1e-5, rtol=1e-5)


def test_local_start_outside_the_request_is_a_config_error():
    case = make_case([64], block_size=16, seed=7)
    selected, counts = torch.tensor([[0]]), torch.tensor([1])
    selection = BlockSelection(case.block_table, case.seq_lens, selected, counts, 1, torch.tensor([4]))
    with pytest.raises(UcmConfigError, match="local_start"):  # 4 blocks: local_start must be < 4
        get_backend("cpu").sparse_decode_attention(case.query, case.k_cache, case.v_cache, selection)


def _selection_fields(case) -> dict:
    batch = case.block_table.shape[0]
    return dict(block_table=case.block_table, seq_lens=case.seq_lens, selected=torch.zeros(batch, 2, dtype=torch.int64),
                counts=torch.ones(batch, dtype=torch.int64), sink_end=1, local_start=torch.tensor([2, 3]))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("selected", torch.zeros(3, 2, dtype=torch.int64), r"invalid selected batch size=3: expected 2, the rows of"),
    ("counts", torch.ones(2, 1, dtype=torch.int64), r"invalid counts=.*: expected an integer tensor \[B\]"),
    ("local_start", torch.tensor([2.0, 3.0]), r"invalid local_start='torch.float32 \(2,\)'"),
    ("seq_lens", torch.tensor([64]), r"invalid seq_lens batch size=1: expected 2"),
    ("sink_end", 9, r"invalid sink_end=9: expected a host int in \[0, 5\]"),
    ("sink_end", torch.tensor(1), r"invalid sink_end=tensor\(1\)"),
    ("max_seq_len", -1, r"invalid max_seq_len=-1: expected None or a host int >= 0"),
])
def test_selection_rejects_a_malformed_field(field, value, message):
    case = make_case([64, 80], block_size=16, seed=8)  # 5 table columns
    fields = _selection_fields(case)
    BlockSelection(**fields)  # the well-formed one builds
    with pytest.raises(UcmConfigError, match=message) as info:
        BlockSelection(**{**fields, field: value})
    assert info.value.field.split()[0] == field


def test_selection_rejects_a_query_of_another_batch():
    case = make_case([64, 80], block_size=16, seed=8)
    selection = BlockSelection(**_selection_fields(case))
    with pytest.raises(UcmConfigError, match=r"invalid query shape=\(1, .*expected \[2, num_q_heads, head_dim\]"):
        get_backend("cpu").sparse_decode_attention(case.query[:1], case.k_cache, case.v_cache, selection)


def test_kernel_rejects_a_query_of_another_batch():
    pytest.importorskip("triton")
    from ucm.kernels.sparse_paged_attention import sparse_paged_decode_attention

    case = make_case([64, 80], block_size=16, seed=8)
    selection = BlockSelection(**_selection_fields(case))
    with pytest.raises(UcmConfigError, match="query shape"):
        sparse_paged_decode_attention(case.query[:1], case.k_cache, case.v_cache, selection)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the compiled kernel is tested")
def test_kernel_matches_reference_interpreted_on_cpu():
    pytest.importorskip("triton")
    assert run_interpreted("sparse_kernel_check.py", timeout=600) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_matches_reference_on_cuda():
    assert run_on_cuda("sparse_kernel_check") == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fused_esa_step_matches_cpu_reference():
    config = EsaConfig(sparse_ratio=0.2)
    shape = dict(block_size=16, num_q_heads=32, num_kv_heads=8, head_dim=128, needles_per_request=4, needle_lo=2,
                 seed=9)
    ref, _, _ = _both_steps(get_backend("cpu"), make_case([8000, 3000, 5555], **shape), config)
    fused, via_table, _ = _both_steps(get_backend("cuda"), make_case([8000, 3000, 5555], device="cuda", **shape),
                                      config)
    torch.testing.assert_close(fused, via_table, atol=2e-2, rtol=2e-2)  # float32 inputs: tf32 dots
    torch.testing.assert_close(fused.cpu(), ref, atol=2e-2, rtol=2e-2)


def test_cuda_backend_runs_the_fused_kernel():
    # the base method is the host-looping reference: it syncs (no CUDA graphs) and is ~30x slower on the GPU
    from ucm.backends.cuda import CudaBackend

    from ucm.device.backend import Backend

    assert CudaBackend.sparse_decode_attention is not Backend.sparse_decode_attention
