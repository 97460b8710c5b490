"""ESA's sub-block representations (``repr_tokens``): a short passage that matches the query (a needle) inside a
large block is found, where one mean per block averages it away; config validation and the per-block layout."""

from __future__ import annotations

import pytest
import torch

from ucm.device import get_backend
from ucm.errors import UcmConfigError
from ucm.sparse.config import EsaConfig
from ucm.sparse.esa.retriever import EsaRetriever


def needle_cache(block_size: int = 128, blocks: int = 12, needle_tokens: int = 12, seed: int = 0):
    """Noise keys; block 7 holds ``needle_tokens`` keys aligned with the query at token 50; block 3 is mildly
    aligned over all its tokens (a decoy whose block mean beats the needle block's)."""
    gen = torch.Generator().manual_seed(seed)
    kvh, groups, hd = 2, 3, 32
    query = torch.randn(kvh * groups, hd, generator=gen)
    direction = query.view(kvh, groups, hd).sum(1)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    keys = 0.3 * torch.randn(blocks, block_size, kvh, hd, generator=gen)
    keys[7, 50 : 50 + needle_tokens] += 4.0 * direction
    keys[3] += 0.8 * direction
    return query, keys


def test_needle_inside_a_block_needs_sub_block_representations():
    backend = get_backend("cpu")
    retriever = EsaRetriever(backend)
    query, keys = needle_cache()
    ids = torch.arange(keys.shape[0])
    whole = retriever.select(query, retriever.representations(keys, ids, 1), 1, 1)
    parts = EsaConfig(repr_tokens=16).repr_parts(128)
    sliced = retriever.select(query, retriever.representations(keys, ids, parts), 1, parts)
    assert whole == [3]  # one mean per block: the decoy wins
    assert sliced == [7]  # the needle's 16-token slice outscores every slice of the decoy


def test_representation_rows_and_dtype():
    backend = get_backend("cpu")
    _, keys = needle_cache()
    keys = keys.to(torch.bfloat16)
    reps = EsaRetriever(backend).representations(keys, torch.tensor([7, 2]), 8)
    assert reps.shape == (16, 2, 32) and reps.dtype == torch.bfloat16  # stored in the cache dtype
    torch.testing.assert_close(reps[1].float(), keys[7, 16:32].float().mean(0), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(reps[8].float(), keys[2, 0:16].float().mean(0), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("repr_tokens,block_size,parts", [(16, 128, 8), (16, 16, 1), (16, 3, 1), (16, 40, 3),
                                                         (1, 4, 4), (128, 128, 1)])  # fmt: skip
def test_repr_parts(repr_tokens: int, block_size: int, parts: int):
    assert EsaConfig(repr_tokens=repr_tokens).repr_parts(block_size) == parts


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "16"])
def test_repr_tokens_validated(bad):
    with pytest.raises(UcmConfigError, match="repr_tokens") as info:
        EsaConfig.from_mapping({"repr_tokens": bad})
    assert "an integer >= 1" in str(info.value)
