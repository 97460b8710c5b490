"""The copy-list kernel (`ucm.kernels.copy_list`): any list of (destination, source, bytes) copies in one launch,
whatever the sizes' alignment, and one clear error for a table or list it cannot take. Runs compiled on a GPU and
under Triton's interpreter on CPU tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity_impls import INTERPRET

from ucm.device.backend import Backend
from ucm.errors import UcmConfigError


def _kernels(impl: Backend):
    if impl.name not in ("cuda", INTERPRET):
        pytest.skip(f"{impl.name} does not run the Triton kernels")
    from ucm.kernels import copy_list

    return copy_list


def _table(impl: Backend, entries: int) -> torch.Tensor:
    return torch.empty(entries, dtype=torch.int64, pin_memory=impl.device.type == "cuda")


@pytest.mark.parametrize("unit", [1, 2, 8, 16], ids=lambda u: f"{u}-byte")
def test_copies_land_where_the_list_says_and_nothing_else_changes(impl: Backend, unit: int):
    """Host to device copies of sizes and offsets that are multiples of ``unit`` bytes (the kernel's word follows
    them: 1-byte words for odd ones), out of order, some longer than a program's chunk."""
    copy_list = _kernels(impl)
    src = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8)
    src = src.pin_memory() if impl.device.type == "cuda" else src
    dst = torch.zeros(1 << 16, dtype=torch.uint8, device=impl.device)
    # (destination, source, length) in units: disjoint destinations, one copy longer than a program's chunk
    spans = np.array([(2500, 0, 560), (0, 1250, 1), (625, 1875, 1), (1875, 3125, 43)], dtype=np.uint64)
    spans = spans[np.random.default_rng(unit).permutation(len(spans))] * np.uint64(unit)
    dsts, srcs, sizes = spans[:, 0].copy(), spans[:, 1].copy(), spans[:, 2].copy()
    table = _table(impl, copy_list.table_entries(len(spans)))
    copy_list.copy_list(dst, np.uint64(dst.data_ptr()) + dsts, np.uint64(src.data_ptr()) + srcs, sizes, table,
                        max_programs=2)
    want = torch.zeros_like(dst, device="cpu")
    for d, s, n in zip(dsts.tolist(), srcs.tolist(), sizes.tolist(), strict=True):
        want[d : d + n] = src.cpu()[s : s + n]
    assert torch.equal(dst.cpu(), want)


def test_a_table_or_list_it_cannot_take_is_one_clear_error(impl: Backend):
    copy_list = _kernels(impl)
    dst = torch.zeros(64, dtype=torch.uint8, device=impl.device)
    addr = np.array([dst.data_ptr()], dtype=np.uint64)
    with pytest.raises(UcmConfigError, match=r"copy list table.*>= 6 entries"):
        copy_list.copy_list(dst, np.repeat(addr, 2), np.repeat(addr, 2), np.array([8, 8], dtype=np.uint64),
                            _table(impl, 3))
    with pytest.raises(UcmConfigError, match="copy list.*as many sources and sizes"):
        copy_list.copy_list(dst, addr, np.repeat(addr, 2), np.array([8], dtype=np.uint64), _table(impl, 6))
    if impl.device.type == "cuda":
        with pytest.raises(UcmConfigError, match="copy list table.*pinned host memory"):
            copy_list.copy_list(dst, addr, addr, np.array([8], dtype=np.uint64), torch.empty(3, dtype=torch.int64))
