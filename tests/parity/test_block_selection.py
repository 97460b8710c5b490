"""Parity of the block-selection primitives with `ucm.device.reference`: masked top-k, block means (block
representations), GQA block scoring and the combined `select_blocks`, on every implementation.

Selections are compared as sets of scores (ties may be broken differently); scores and means with per-dtype
tolerances. Inputs cover ragged batches, empty requests, k = 0 and k past the row, excluded windows, partial last
blocks, GQA group sizes 1/3/4, non-contiguous views, and host- or device-resident lengths/masks.
"""

from __future__ import annotations

import math

import pytest
import torch
from parity_impls import DTYPES, TOLERANCE, random_tensor

from ucm.device import reference
from ucm.device.backend import Backend
from ucm.errors import UcmConfigError


def skip_duplicate_placement(impl: Backend, placement: str) -> None:
    if placement == "device" and impl.device.type == "cpu":
        pytest.skip("device placement is host placement on a CPU device")


def windows_mask(lengths: torch.Tensor, width: int, init: int, local: int) -> torch.Tensor:
    """ESA's always-resident windows: the first `init` and last `local` entries of each row's length."""
    j = torch.arange(width)[None, :]
    lens = lengths[:, None]
    return (j < init) | ((j >= lens - local) & (j < lens))


def check_selection(
    got: tuple[torch.Tensor, torch.Tensor],
    scores: torch.Tensor,
    k,
    lengths: torch.Tensor | None,
    exclude: torch.Tensor | None,
    atol: float = 0.0,
) -> None:
    """`got` must be a valid top-k of `scores` (host float32) under the reference's rules."""
    idx, counts = (t.cpu() for t in got)
    want_idx, want_counts = reference.topk_masked(scores, k, lengths, exclude)
    assert torch.equal(counts, want_counts)
    assert idx.dtype == torch.int64 and idx.shape == want_idx.shape
    batch, width = scores.shape
    eligible = torch.ones(batch, width, dtype=torch.bool)
    if lengths is not None:
        eligible &= torch.arange(width)[None, :] < lengths.cpu()[:, None]
    if exclude is not None:
        eligible &= ~exclude.cpu()
    for b in range(batch):
        c = int(counts[b])
        chosen, pad = idx[b, :c], idx[b, c:]
        assert bool((pad == -1).all())
        assert bool((chosen[1:] > chosen[:-1]).all()), "indices ascending and distinct"
        if c == 0:
            continue
        assert bool(eligible[b, chosen].all()), "only eligible entries"
        rest = eligible[b].clone()
        rest[chosen] = False
        if atol == 0.0:  # same scores: the multisets of selected values must agree exactly
            want = scores[b, want_idx[b, :c]].sort().values
            assert torch.equal(scores[b, chosen].sort().values, want)
        elif bool(rest.any()):  # recomputed scores: nothing left out may beat what was kept
            assert float(scores[b, chosen].min()) >= float(scores[b, rest].max()) - atol


# ------------------------------------------------------------------------------------------------ top-k
TOPK_CASES = [
    # batch, width, k, lengths, exclude
    (1, 1, 1, None, None),
    (3, 37, 5, "ragged", "windows"),
    (4, 130, 0, "ragged", None),
    (2, 61, 200, None, "random"),  # k past the row: the whole eligible row
    (5, 100, "per-row", "ragged", "windows"),
    (2, 1000, 300, "ragged", "random"),
    (2, 16500, 700, "ragged", "windows"),  # longer than one register tile: the streamed path
]


@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: f"B{c[0]}xW{c[1]}-k{c[2]}-{c[3]}-{c[4]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("placement", ["host", "device"])
def test_topk_masked_matches_reference(impl: Backend, case, dtype: torch.dtype, placement: str):
    skip_duplicate_placement(impl, placement)
    batch, width, k, lengths_kind, exclude_kind = case
    if width > 4096 and (dtype != torch.float32 or placement != "host"):
        pytest.skip("one long-row case is enough")
    scores = random_tensor((batch, width), dtype, torch.device("cpu"))
    lengths = None
    if lengths_kind == "ragged":
        lengths = torch.randint(0, width + 1, (batch,))
        lengths[0] = width
        if batch > 2:
            lengths[1] = 0  # an empty request
    exclude = None
    if exclude_kind == "windows":
        exclude = windows_mask(lengths if lengths is not None else torch.full((batch,), width), width, 1, 2)
    elif exclude_kind == "random":
        exclude = torch.rand(batch, width) < 0.3
    if k == "per-row":
        k = torch.randint(0, width + 5, (batch,))
    where = impl.device if placement == "device" else torch.device("cpu")
    got = impl.topk_masked(
        scores.to(impl.device),
        k.to(where) if isinstance(k, torch.Tensor) else k,
        lengths.to(where) if lengths is not None else None,
        exclude.to(where) if exclude is not None else None,
    )
    assert got[0].device == impl.device and got[1].device == impl.device
    check_selection(got, scores, k, lengths, exclude)


def test_topk_ties_pick_a_valid_set(impl: Backend):
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    got = impl.topk_masked(scores.to(impl.device), 2)
    check_selection(got, scores, 2, None, None)


# ------------------------------------------------------------------------------------------------ block means
MEANS_SHAPES = [(9, 16, 8, 64), (6, 5, 3, 24), (4, 128, 2, 80)]  # num_blocks, block_size, kv heads, head dim


def k_view(layout: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``[num_blocks, block_size, num_kv_heads, head_dim]`` K view of a cache in the given layout."""
    nb, bs, heads, hd = shape
    if layout == "vllm_layer":  # [nb, heads, bs, 2*hd]: K is the first half of the last dim
        return random_tensor((nb, heads, bs, 2 * hd), dtype, device)[..., :hd].permute(0, 2, 1, 3)
    if layout == "kv_tuple":  # Ascend k_cache [nb, bs, heads, hd], contiguous
        return random_tensor((nb, bs, heads, hd), dtype, device)
    raise AssertionError(layout)


@pytest.mark.parametrize("shape", MEANS_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["vllm_layer", "kv_tuple"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
def test_block_means_matches_reference(impl: Backend, shape, layout: str, dtype: torch.dtype, partial: bool):
    k_cache = k_view(layout, shape, dtype, impl.device)
    n = int(torch.randint(1, 2 * shape[0], ()))
    ids = torch.randint(0, shape[0], (n,))  # repeats allowed
    num_tokens = None
    if partial:
        num_tokens = torch.randint(0, shape[1] + 1, (n,))
        num_tokens[-1] = 0  # an empty block has a zero mean
    got = impl.block_means(k_cache, ids.to(impl.device), num_tokens.to(impl.device) if partial else None)
    want = reference.block_means(k_cache.cpu(), ids, num_tokens)
    assert got.dtype == torch.float32 and got.device == impl.device
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got.cpu(), want, rtol=rtol, atol=atol)


def test_block_means_of_no_blocks_is_empty(impl: Backend):
    k_cache = k_view("kv_tuple", MEANS_SHAPES[0], torch.float16, impl.device)
    got = impl.block_means(k_cache, torch.empty(0, dtype=torch.int64, device=impl.device))
    assert got.shape == (0, MEANS_SHAPES[0][2], MEANS_SHAPES[0][3])


# ------------------------------------------------------------------------------------------------ scoring
SCORE_CASES = [
    # blocks per request, query heads, kv heads, head dim
    ([5, 0, 13], 4, 4, 16),  # no GQA, an empty request
    ([37], 6, 2, 24),  # group of 3, non-power-of-two head dim
    ([17, 64, 3, 9], 32, 8, 128),  # the benchmark's head configuration, ragged batch
    ([1, 2], 8, 1, 64),  # MQA
]


def make_scoring_inputs(case, dtype: torch.dtype, device: torch.device, contiguous: bool):
    counts, hq, hkv, hd = case
    batch = len(counts)
    cu_blocks = torch.tensor([0, *counts]).cumsum(0)
    total = int(cu_blocks[-1])
    if contiguous:
        query = random_tensor((batch, hq, hd), dtype, device)
        reps = random_tensor((total, hkv, hd), torch.float32, device)
    else:  # every other query head of a wider tensor; reps a head-major tensor seen block-major
        query = random_tensor((batch, 2 * hq, hd), dtype, device)[:, ::2]
        reps = random_tensor((hkv, total, hd), torch.float32, device).transpose(0, 1)
    return query, reps, cu_blocks


def score_tolerance(dtype: torch.dtype, hq: int, hd: int) -> tuple[float, float]:
    rtol, atol = TOLERANCE[dtype]
    return rtol, atol * math.sqrt(hq * hd)  # a score sums hq * hd products of unit-variance terms


@pytest.mark.parametrize("case", SCORE_CASES, ids=lambda c: f"{c[0]}-q{c[1]}kv{c[2]}-d{c[3]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("placement", ["host", "device"])
def test_block_scores_match_reference(impl: Backend, case, dtype: torch.dtype, contiguous: bool, placement: str):
    skip_duplicate_placement(impl, placement)
    query, reps, cu_blocks = make_scoring_inputs(case, dtype, impl.device, contiguous)
    got = impl.block_scores(query, reps, cu_blocks.to(impl.device) if placement == "device" else cu_blocks)
    want = reference.block_scores(query.cpu(), reps.cpu(), cu_blocks)
    assert got.dtype == torch.float32 and got.device == impl.device
    rtol, atol = score_tolerance(dtype, case[1], case[3])
    torch.testing.assert_close(got.cpu(), want, rtol=rtol, atol=atol)  # -inf padding must match exactly


def test_block_scores_reject_bad_gqa(impl: Backend):
    query, reps, cu_blocks = make_scoring_inputs(([3], 6, 4, 16), torch.float32, impl.device, True)
    with pytest.raises(UcmConfigError, match="num_q_heads"):
        impl.block_scores(query, reps, cu_blocks)


@pytest.mark.parametrize("case", SCORE_CASES[1:], ids=lambda c: f"{c[0]}-q{c[1]}kv{c[2]}-d{c[3]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [0, 3, 1000])
@pytest.mark.parametrize("placement", ["host", "device"])
def test_select_blocks_matches_reference(impl: Backend, case, dtype: torch.dtype, k: int, placement: str):
    skip_duplicate_placement(impl, placement)
    query, reps, cu_blocks = make_scoring_inputs(case, dtype, impl.device, contiguous=k != 3)
    lengths = cu_blocks[1:] - cu_blocks[:-1]
    width = int(lengths.max())
    exclude = windows_mask(lengths, width, 1, 2)  # ESA's init and local windows are never candidates
    where = impl.device if placement == "device" else torch.device("cpu")
    got = impl.select_blocks(query, reps, cu_blocks.to(where), k, exclude.to(where))
    ref_scores = reference.block_scores(query.cpu(), reps.cpu(), cu_blocks)
    _, atol = score_tolerance(dtype, case[1], case[3])
    check_selection(got, ref_scores, k, lengths, exclude, atol=atol)


@pytest.mark.parametrize("blocks", [[300, 7], [40]], ids=["wide-bin", "narrow-bin"])
def test_select_blocks_with_many_equal_scores(impl: Backend, blocks: list[int]):
    """Equal scores share one key bin: past the ranked capacity the selection falls back to the bitwise search."""
    counts, hq, hkv, hd = blocks, 4, 2, 16
    query, _, cu_blocks = make_scoring_inputs((counts, hq, hkv, hd), torch.float32, impl.device, True)
    total = int(cu_blocks[-1])
    reps = torch.ones(total, hkv, hd, device=impl.device)
    reps[::5] = 2.0  # a few strictly better blocks, the rest tied
    k = 150
    got = impl.select_blocks(query.abs(), reps, cu_blocks, k)
    ref_scores = reference.block_scores(query.abs().cpu(), reps.cpu(), cu_blocks)
    check_selection(got, ref_scores, k, cu_blocks[1:] - cu_blocks[:-1], None)


# ------------------------------------------------------------------ ESA's sub-block representations
@pytest.mark.parametrize("block_size,parts", [(16, 4), (40, 3), (128, 8)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_representations_per_slice(impl: Backend, block_size: int, parts: int, dtype: torch.dtype):
    """`block_representations`: the mean of each near-equal token slice of every listed block (slices of 13/13/14
    tokens for 40 in 3), on a head-major cache seen block-major (the strided views engines hand over)."""
    from ucm.sparse.esa.retriever import block_representations

    kvh, hd = 2, 24
    cache = random_tensor((7, kvh, block_size, hd), dtype, impl.device).permute(0, 2, 1, 3)
    ids = torch.tensor([5, 0, 3], device=impl.device)
    got = block_representations(impl, cache, ids, parts)
    bounds = [j * block_size // parts for j in range(parts + 1)]
    keys = cache.cpu().float()[ids.cpu()]
    want = torch.stack([keys[:, a:b].mean(1) for a, b in zip(bounds[:-1], bounds[1:], strict=True)], 1)
    assert got.shape == (3 * parts, kvh, hd) and got.dtype == torch.float32
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got.cpu(), want.flatten(0, 1), rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", SCORE_CASES[1:], ids=lambda c: f"{c[0]}-q{c[1]}kv{c[2]}-d{c[3]}")
@pytest.mark.parametrize("parts", [1, 4])
@pytest.mark.parametrize("k", [0, 3, 1000])
def test_select_blocks_by_best_part(impl: Backend, case, parts: int, k: int):
    """ESA's selection over blocks of `parts` representations: a valid top-k of each block's best part score."""
    from ucm.sparse.esa.retriever import select_blocks

    counts, hq, hkv, hd = case
    query, reps, cu_blocks = make_scoring_inputs(([c * parts for c in counts], hq, hkv, hd), torch.float32,
                                                 impl.device, True)  # fmt: skip
    cu = torch.tensor([0, *counts]).cumsum(0)
    got = select_blocks(impl, query, reps, cu, k, parts)
    part_scores = reference.block_scores(query.cpu(), reps.cpu(), cu * parts)
    best = part_scores.view(len(counts), -1, parts).amax(-1)
    _, atol = score_tolerance(torch.float32, hq, hd)
    check_selection(got, best, k, cu[1:] - cu[:-1], None, atol=atol)
