"""The copy-engine load (`ucm.backends.cuda.batch_dma`) is one driver call over (destination, source, bytes)
descriptors; a wrong address would write another block's pages. The descriptors are pure pointer arithmetic, so they
are checked here on host tensors: applying them with a plain memory copy must give exactly the reference scatter,
for every page layout the device layer takes and for a layer's sub-range of whole-model rows (a store's arena)."""

from __future__ import annotations

import ctypes

import pytest
import torch
from ucm.backends.cuda import batch_dma

from ucm.device import reference


def apply(descriptors) -> None:
    for dst, src, size in zip(*(d.tolist() for d in descriptors), strict=True):
        ctypes.memmove(dst, src, size)


def layouts():
    g = torch.Generator().manual_seed(0)
    yield "vllm_layer", torch.randn(9, 2, 4, 16, generator=g).to(torch.bfloat16)
    yield "kv_tuple", (torch.randn(9, 4, 2, 8, generator=g), torch.randn(9, 4, 2, 8, generator=g))
    yield "layers", [torch.randn(9, 2, 4, 16, generator=g), (torch.randn(9, 4, 2, 8, generator=g).half(),
                                                               torch.randn(9, 4, 2, 8, generator=g).half())]
    yield "strided_blocks", torch.randn(18, 2, 4, 16, generator=g)[::2]


@pytest.mark.parametrize("name,cache", list(layouts()), ids=[n for n, _ in layouts()])
@pytest.mark.parametrize("with_rows", [False, True], ids=["rows=None", "rows"])
def test_descriptors_write_what_the_reference_scatter_writes(name: str, cache, with_rows: bool):
    pages = reference.as_page_tensors(cache)
    width = reference.bytes_per_block(pages)
    ids = torch.tensor([7, 2, 0, 5])
    rows = torch.tensor([5, 0, 3, 1]) if with_rows else None
    src = torch.randint(0, 256, (6, width), dtype=torch.uint8)
    want = [p.clone() for p in pages]
    reference.scatter_blocks(src, want, ids, rows)
    apply(batch_dma.descriptors(src, pages, ids.numpy(), None if rows is None else rows.numpy()))
    for got, expected in zip(pages, want, strict=True):
        assert torch.equal(got.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8))


def test_descriptors_of_one_layer_of_whole_model_rows():
    """A store's arena holds every layer of a block in one row: a load of layer 1 reads its sub-range (strided)."""
    g = torch.Generator().manual_seed(1)
    layers = [(torch.randn(8, 16, 2, 8, generator=g), torch.randn(8, 16, 2, 8, generator=g)) for _ in range(3)]
    layer_bytes = reference.bytes_per_block(reference.as_page_tensors(layers[1]))
    stored = torch.randint(0, 256, (10, 3 * layer_bytes), dtype=torch.uint8)
    src = stored[:, layer_bytes : 2 * layer_bytes]
    ids, rows = torch.tensor([3, 6, 1]), torch.tensor([9, 0, 4])
    untouched = [[p.clone() for p in layer] for layer in (layers[0], layers[2])]
    want = [p.clone() for p in layers[1]]
    reference.scatter_blocks(src.contiguous(), want, ids, rows)
    apply(batch_dma.descriptors(src, list(layers[1]), ids.numpy(), rows.numpy()))
    for got, expected in zip(layers[1], want, strict=True):  # bytes: random bits hold NaNs
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    for layer, before in zip((layers[0], layers[2]), untouched, strict=True):
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(layer, before, strict=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the copy engines are tested there")
def test_unavailable_without_a_gpu_says_why():
    assert "CUDA" in batch_dma.unavailable_reason()
