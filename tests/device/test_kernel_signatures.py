"""Kernel arguments whose Triton type must not follow their value: Triton types a plain int argument by its value
(i32 below 2**31, i64 above, also under do_not_specialize), so an argument that can fall on either side compiles
a second variant the first time it crosses, in the middle of decode. Such arguments carry an explicit type."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")


def test_an_unannotated_int_is_typed_by_its_value():
    from triton.runtime.jit import mangle_type

    assert mangle_type(5) == "i32" and mangle_type(2**31 - 1) == "i32"
    assert mangle_type(2**31) == "i64" and mangle_type(-(2**31) - 1) == "i64"


def test_the_copy_list_table_offset_is_always_int64():
    from ucm.kernels.copy_list import _copy_list_kernel

    if not hasattr(_copy_list_kernel, "params"):
        pytest.fail("run without TRITON_INTERPRET (the interpreter wraps the kernel without its parameters)")
    types = {p.name: p.annotation_type for p in _copy_list_kernel.params}
    # a pinned host table's distance to a device anchor, in 8-byte words, is below 2**31 near small buffers and
    # above it near a large KV cache
    assert types["table"] == "i64"


def _variants(kernel, device: int) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is None or device not in caches:
        pytest.fail("this Triton keeps its compiled variants elsewhere: update _variants")
    return len(caches[device][0])


def test_copy_lists_near_and_far_from_their_table_share_one_compiled_kernel():
    """On a GPU: one launch next to small buffers (as ESA's warm-up), one whose anchor is a large allocation (as a
    KV cache), their table offsets on both sides of 2**31 words; both copy right and the second compiles nothing
    new."""
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from ucm.kernels.copy_list import _copy_list_kernel, copy_list, table_entries

    free, _ = torch.cuda.mem_get_info()
    big = torch.empty(min(free // 2, 40 << 30), dtype=torch.uint8, device="cuda")
    src = torch.arange(256, dtype=torch.int64).to(torch.uint8).pin_memory()
    table = torch.empty(table_entries(1), dtype=torch.int64, pin_memory=True)
    offsets = []
    for dst in (torch.zeros(256, dtype=torch.uint8, device="cuda"), big[:256]):
        dst.zero_()
        copy_list(dst, np.array([dst.data_ptr()], dtype=np.uint64), np.array([src.data_ptr()], dtype=np.uint64),
                  np.array([256], dtype=np.uint64), table)
        torch.cuda.synchronize()
        assert torch.equal(dst.cpu(), src)
        offsets.append((dst.data_ptr() - table.data_ptr()) // 8)
        if len(offsets) == 1:
            first = _variants(_copy_list_kernel, torch.cuda.current_device())
    # the premise: the two offsets fall on both sides of the int32 range (a large allocation's start lies far from
    # the pinned table in CUDA's unified address space); else this layout does not test the typing
    assert [-(2**31) <= o < 2**31 for o in offsets] == [True, False], offsets
    assert _variants(_copy_list_kernel, torch.cuda.current_device()) == first, offsets
