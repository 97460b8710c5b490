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


def apply_ops(ops) -> None:
    """What the driver does with each 2D copy: ``height`` rows of ``width`` bytes, each operand's rows its own row
    length apart."""
    for op in ops:
        for h in range(int(op["height"])):
            ctypes.memmove(int(op["dst_ptr"]) + h * int(op["dst_row"]), int(op["src_ptr"]) + h * int(op["src_row"]),
                           int(op["width"]))


def test_the_op_struct_matches_the_driver_header():
    """CUDA_MEMCPY3D_BATCH_OP as cuda.h declares it, built with ctypes (its own alignment rules): every field this
    module sets is at the offset its numpy dtype gives, and the struct is as long."""

    class Location(ctypes.Structure):
        _fields_ = [("type", ctypes.c_uint), ("id", ctypes.c_int)]

    class Pointer(ctypes.Structure):
        _fields_ = [("ptr", ctypes.c_uint64), ("row_length", ctypes.c_size_t), ("layer_height", ctypes.c_size_t),
                    ("loc_hint", Location)]

    class Array(ctypes.Structure):
        _fields_ = [("array", ctypes.c_void_p), ("offset", ctypes.c_size_t * 3)]

    class Op(ctypes.Union):
        _fields_ = [("ptr", Pointer), ("array", Array)]

    class Operand(ctypes.Structure):
        _fields_ = [("type", ctypes.c_uint), ("op", Op)]

    class BatchOp(ctypes.Structure):
        _fields_ = [("src", Operand), ("dst", Operand), ("extent", ctypes.c_size_t * 3),
                    ("src_access_order", ctypes.c_uint), ("flags", ctypes.c_uint)]

    operand = Operand.op.offset + Op.ptr.offset
    want = {
        "src_type": BatchOp.src.offset, "src_ptr": BatchOp.src.offset + operand + Pointer.ptr.offset,
        "src_row": BatchOp.src.offset + operand + Pointer.row_length.offset,
        "dst_type": BatchOp.dst.offset, "dst_ptr": BatchOp.dst.offset + operand + Pointer.ptr.offset,
        "dst_row": BatchOp.dst.offset + operand + Pointer.row_length.offset,
        "width": BatchOp.extent.offset, "height": BatchOp.extent.offset + 8, "depth": BatchOp.extent.offset + 16,
        "src_access_order": BatchOp.src_access_order.offset, "flags": BatchOp.flags.offset,
    }
    assert {name: batch_dma.OP_DTYPE.fields[name][1] for name in want} == want
    assert batch_dma.OP_DTYPE.itemsize == ctypes.sizeof(BatchOp) == 112


def test_k_and_v_halves_of_one_cache_are_one_2d_copy_per_block():
    """vLLM's FLASH_ATTN layer cache [2, num_blocks, ...]: K and V are evenly spaced page tensors; applying the 2D
    copies gives exactly the reference scatter (rows from a layer's sub-range of whole-model rows), and nothing
    outside the loaded blocks changes."""
    g = torch.Generator().manual_seed(2)
    cache = torch.randn(2, 9, 16, 2, 8, generator=g).to(torch.bfloat16)
    pages = list(cache.unbind(0))
    pitch = batch_dma.page_pitch(pages)
    assert pitch == 9 * reference.page_nbytes(pages[0])
    width = reference.bytes_per_block(pages)
    stored = torch.randint(0, 256, (10, 3 * width), dtype=torch.uint8)
    src = stored[:, width : 2 * width]
    ids, rows = torch.tensor([3, 8, 0]), torch.tensor([9, 0, 4])
    want = [p.clone() for p in pages]
    reference.scatter_blocks(src.contiguous(), want, ids, rows)
    ops = batch_dma.pitched_ops(src, pages, ids.numpy(), rows.numpy(), pitch, batch_dma.SOURCE_ORDERS["stream"], 1)
    assert ops.size == ids.numel() and set(ops["height"].tolist()) == {2} and set(ops["flags"].tolist()) == {1}
    apply_ops(ops)
    for got, expected in zip(pages, want, strict=True):
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


def test_pages_not_evenly_spaced_have_no_pitch():
    g = torch.Generator().manual_seed(3)
    k = torch.randn(9, 16, 2, 8, generator=g)
    assert batch_dma.page_pitch([k]) is None
    assert batch_dma.page_pitch([k, k]) is None  # the same page twice: they would overlap
    cache = torch.randn(3, 9, 16, 2, 8, generator=g)
    assert batch_dma.page_pitch([cache[0], cache[2]]) == 2 * 9 * reference.page_nbytes(cache[0])
    assert batch_dma.page_pitch([cache[0], cache[2], cache[1]]) is None  # out of order
    assert batch_dma.page_pitch([cache[0], cache[1, :, :8]]) is None  # a different page size
