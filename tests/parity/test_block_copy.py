"""Parity of batched block gather/scatter with `ucm.device.reference` on every implementation.

Layouts: vLLM's one tensor per layer ``[num_blocks, num_kv_heads, block_size, 2*head_size]``, Ascend's (k, v)
tuples ``[num_blocks, block_size, num_kv_heads, head_size]``, lists of layers, and page tensors whose blocks are
strided (a view of every other block). Buffers: pinned host, pageable host and device memory, with optional rows.
"""

from __future__ import annotations

import pytest
import torch
from parity_impls import INTERPRET, host_buffer, random_tensor

from ucm.device import reference
from ucm.device.backend import Backend
from ucm.errors import UcmConfigError

SENTINEL = 0xA5
# (num_blocks, num_kv_heads, block_size, head_size): non-powers of two and a realistic one
SHAPES = [(7, 3, 5, 12), (12, 2, 16, 64), (5, 1, 3, 5)]
COPY_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8]  # uint8: odd sizes -> 1-byte words
LAYOUTS = ["vllm_layer", "kv_tuple", "layers", "strided_blocks"]


def make_cache(layout: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device):
    nb, heads, bs, hd = shape
    if layout == "vllm_layer":
        return random_tensor((nb, heads, bs, 2 * hd), dtype, device)
    if layout == "kv_tuple":
        return (random_tensor((nb, bs, heads, hd), dtype, device), random_tensor((nb, bs, heads, hd), dtype, device))
    if layout == "kv_halves":  # vLLM's FLASH_ATTN layer: [2, num_blocks, ...], K and V one allocation apart
        return tuple(random_tensor((2, nb, bs, heads, hd), dtype, device).unbind(0))
    if layout == "layers":
        return [
            random_tensor((nb, heads, bs, 2 * hd), dtype, device),
            (random_tensor((nb, bs, heads, hd), dtype, device), random_tensor((nb, bs, heads, hd), dtype, device)),
            random_tensor((nb, heads, bs, 2 * hd), dtype, device),
        ]
    if layout == "strided_blocks":
        return random_tensor((2 * nb, heads, bs, 2 * hd), dtype, device)[::2]
    raise AssertionError(layout)


def page_bytes(pages: list[torch.Tensor]) -> list[torch.Tensor]:
    """Host copies of the page tensors as raw bytes (bit-exact comparison, NaN patterns included)."""
    return [p.cpu().contiguous().view(torch.uint8) for p in pages]


def pick(n_total: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.randperm(n_total)[:n].to(device)


def use_mode(impl: Backend, kind: str) -> str:
    """'pinned-staged' runs the CUDA backend's staged path (device gather + one DMA) on a pinned buffer;
    'pinned-dma' its loads on the copy engines (the driver's batched memcpy; gathers stay on the kernel)."""
    if impl.device.type == "cpu" and kind in ("pageable", "device"):
        pytest.skip("on a CPU device every buffer is host memory: the 'pinned' case covers it")
    if kind not in ("pinned-staged", "pinned-dma"):
        return kind
    if not hasattr(impl, "host_copy"):
        pytest.skip(f"{impl.name} has no host-copy modes")
    if kind == "pinned-dma":
        require_copy_engines()
    impl.host_copy = kind.removeprefix("pinned-")
    return "pinned"


def copy_engine_calls() -> int:
    from ucm.backends.cuda import batch_dma

    return batch_dma.calls


def require_copy_engines() -> None:
    """A CUDA run must take the copy-engine path it tests, not fall back to the kernel unnoticed."""
    from ucm.backends.cuda import batch_dma

    reason = batch_dma.unavailable_reason()
    assert reason is None, f"the driver's batched memcpy is unavailable: {reason}"


@pytest.fixture(autouse=True)
def _restore_host_copy(impl: Backend):
    source_order = getattr(impl, "dma_source_order", None)
    yield
    if "host_copy" in vars(impl):
        del impl.host_copy
    if source_order is not None:
        impl.dma_source_order = source_order


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", COPY_DTYPES, ids=str)
@pytest.mark.parametrize("buffer", ["pinned", "pageable", "device", "pinned-staged"])
@pytest.mark.parametrize("with_rows", [False, True], ids=["rows=None", "rows"])
def test_gather_matches_reference(impl: Backend, layout: str, dtype: torch.dtype, buffer: str, with_rows: bool):
    shape = SHAPES[torch.randint(len(SHAPES), ()).item()]
    cache = make_cache(layout, shape, dtype, impl.device)
    pages = reference.as_page_tensors(cache)
    width = reference.bytes_per_block(pages)
    n = int(torch.randint(1, shape[0] + 1, ()))
    ids = pick(shape[0], n, torch.device("cpu") if with_rows else impl.device)  # host and device ids
    n_rows = n + 3 if with_rows else n
    rows = torch.randperm(n_rows)[:n] if with_rows else None
    out = host_buffer(impl, use_mode(impl, buffer), n_rows, width)
    out.fill_(SENTINEL)
    handle = impl.gather_blocks(cache, ids, out, rows, stream=impl.new_stream())
    handle.wait()
    assert handle.done()
    expected = torch.full((n_rows, width), SENTINEL, dtype=torch.uint8)
    reference.gather_blocks([p.cpu() for p in pages], ids.cpu(), expected, rows)
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", COPY_DTYPES, ids=str)
@pytest.mark.parametrize("buffer", ["pinned", "pageable", "device", "pinned-staged", "pinned-dma"])
@pytest.mark.parametrize("with_rows", [False, True], ids=["rows=None", "rows"])
def test_scatter_matches_reference(impl: Backend, layout: str, dtype: torch.dtype, buffer: str, with_rows: bool):
    shape = SHAPES[torch.randint(len(SHAPES), ()).item()]
    cache = make_cache(layout, shape, dtype, impl.device)
    pages = reference.as_page_tensors(cache)
    width = reference.bytes_per_block(pages)
    n = int(torch.randint(1, shape[0] + 1, ()))
    host_ids = with_rows or buffer == "pinned-dma"  # the copy engines take host ids (device ids: the kernel)
    ids = pick(shape[0], n, torch.device("cpu") if host_ids else impl.device)
    n_rows = n + 2 if with_rows else n
    rows = torch.randperm(n_rows)[:n] if with_rows else None
    src = host_buffer(impl, use_mode(impl, buffer), n_rows, width)
    src.copy_(torch.randint(0, 256, (n_rows, width), dtype=torch.uint8))
    expected = [p.cpu().clone() for p in pages]
    reference.scatter_blocks(src.cpu(), expected, ids.cpu(), rows)
    before = copy_engine_calls()
    impl.scatter_blocks(src, cache, ids, rows, stream=impl.new_stream()).wait()
    if buffer == "pinned-dma":
        assert copy_engine_calls() == before + 1, "the load did not go to the copy engines"
    for got, want in zip(page_bytes(pages), page_bytes(expected), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("with_rows", [False, True], ids=["rows=None", "rows"])
def test_background_scatter_matches_reference(impl: Backend, with_rows: bool):
    """A background load (on CUDA a few programs, each looping over its share of the blocks and pages) writes
    exactly what a full grid does: every block of three layers (K and V pages), more jobs than programs."""
    shape = (12, 2, 16, 64)
    cache = make_cache("layers", shape, torch.bfloat16, impl.device)
    pages = reference.as_page_tensors(cache)
    width = reference.bytes_per_block(pages)
    ids = pick(shape[0], shape[0], torch.device("cpu") if with_rows else impl.device)
    n_rows = shape[0] + 2 if with_rows else shape[0]
    rows = torch.randperm(n_rows)[: shape[0]] if with_rows else None
    src = host_buffer(impl, "pinned", n_rows, width)
    src.copy_(torch.randint(0, 256, (n_rows, width), dtype=torch.uint8))
    expected = [p.cpu().clone() for p in pages]
    reference.scatter_blocks(src.cpu(), expected, ids.cpu(), rows)
    impl.scatter_blocks(src, cache, ids, rows, stream=impl.new_stream(), background=True).wait()
    for got, want in zip(page_bytes(pages), page_bytes(expected), strict=True):
        assert torch.equal(got, want)


def test_copy_engine_load_of_one_layer_of_stored_rows(impl: Backend):
    """On CUDA, a load on the copy engines from one layer's sub-range of whole-model rows (strided rows, as a
    store's arena holds them) into that layer's (k, v) pages, foreground and background, writes exactly what the
    reference does; device-resident ids go to the kernel instead, with the same result."""
    if not hasattr(impl, "host_copy"):
        pytest.skip(f"{impl.name} has no copy-engine path")
    require_copy_engines()
    layers = [make_cache("kv_tuple", (10, 2, 16, 64), torch.bfloat16, impl.device) for _ in range(3)]
    layer_bytes = reference.bytes_per_block(reference.as_page_tensors(layers[1]))
    stored = host_buffer(impl, "pinned", 12, 3 * layer_bytes)
    stored.copy_(torch.randint(0, 256, stored.shape, dtype=torch.uint8))
    src = stored[:, layer_bytes : 2 * layer_bytes]  # layer 1 of every stored row
    for background, ids_device in ((False, "cpu"), (True, "cpu"), (True, impl.device)):
        ids, rows = torch.tensor([7, 2, 9, 0]), torch.tensor([11, 3, 0, 6])
        expected = [p.cpu().clone() for p in reference.as_page_tensors(layers[1])]
        reference.scatter_blocks(src.cpu().contiguous(), expected, ids, rows)
        impl.host_copy = "dma" if not background else "zero_copy"
        before = copy_engine_calls()
        impl.scatter_blocks(src, layers[1], ids.to(ids_device), rows, stream=impl.new_stream(),
                            background=background).wait()
        assert copy_engine_calls() == before + (ids_device == "cpu")
        for got, want in zip(page_bytes(reference.as_page_tensors(layers[1])), page_bytes(expected), strict=True):
            assert torch.equal(got, want)
        stored.copy_(torch.randint(0, 256, stored.shape, dtype=torch.uint8))


def layer_loads(layers: list, stored: torch.Tensor, plan: dict[int, tuple[list[int], list[int]]]) -> tuple[list, list]:
    """A step's loads of several layers from whole-model rows: layer ``l`` takes block ids ``plan[l][0]`` from rows
    ``plan[l][1]`` of its own column range of ``stored``. Returns the `scatter_blocks_many` jobs and, per layer, its
    page tensors as the reference scatter leaves them."""
    layer_bytes = stored.shape[1] // len(layers)
    jobs, expected = [], []
    for layer, (ids, rows) in plan.items():
        src = stored[:, layer * layer_bytes : (layer + 1) * layer_bytes]
        want = [p.cpu().clone() for p in reference.as_page_tensors(layers[layer])]
        reference.scatter_blocks(src.cpu().contiguous(), want, torch.tensor(ids), torch.tensor(rows))
        expected.append(want)
        jobs.append((src, layers[layer], torch.tensor(ids), torch.tensor(rows)))
    return jobs, expected


def assert_layers_hold(layers: list, expected: list, where: object = None) -> None:
    for layer, want in enumerate(expected):
        got = page_bytes(reference.as_page_tensors(layers[layer]))
        assert all(torch.equal(a, b) for a, b in zip(got, page_bytes(want), strict=True)), (where, layer)


@pytest.mark.parametrize("layout", ["kv_tuple", "kv_halves"])
@pytest.mark.parametrize("source_order", ["stream", "any"])
@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
def test_scatter_many_loads_each_layer_its_own_blocks(
    impl: Backend, background: bool, source_order: str, layout: str
):
    """Every layer's load of a step as one call: each layer its own ids, rows and sub-range of whole-model rows;
    on CUDA one copy-engine call for all of them (host ids), with either source access order, whether a layer's K
    and V are two tensors or the halves of one allocation (vLLM's FLASH_ATTN cache)."""
    if hasattr(impl, "dma_source_order"):
        impl.dma_source_order = source_order
    elif source_order != "stream":
        pytest.skip(f"{impl.name} has no copy-engine options")
    layers = [make_cache(layout, (10, 2, 16, 64), torch.bfloat16, impl.device) for _ in range(3)]
    layer_bytes = reference.bytes_per_block(reference.as_page_tensors(layers[0]))
    stored = host_buffer(impl, "pinned", 12, 3 * layer_bytes)
    stored.copy_(torch.randint(0, 256, stored.shape, dtype=torch.uint8))
    jobs, expected = layer_loads(layers, stored, {0: ([7, 2], [11, 3]), 1: ([0, 9, 4], [1, 0, 6]), 2: ([5], [8])})
    before = copy_engine_calls()
    impl.scatter_blocks_many(jobs, stream=impl.new_stream(), background=background).wait()
    if impl.device.type == "cuda":
        assert copy_engine_calls() == before + 1
    assert_layers_hold(layers, expected)


@pytest.mark.parametrize("layout", ["kv_tuple", "kv_halves"])
def test_background_loads_on_the_copy_kernel_are_one_copy_list_launch(impl: Backend, layout: str):
    """Loads ahead with the CUDA backend's ``background_copy`` "kernel": every layer's blocks (each layer its own
    ids, rows and sub-range of whole-model rows) in one copy-list launch, no copy-engine call, the reference's
    bytes; its pinned table is reused once the launch that read it is done (three loads, at most one table made)."""
    if impl.name == "cuda":
        previous, impl.background_copy = impl.background_copy, "kernel"
        tables = impl._copy_tables.made if impl._copy_tables is not None else 0
    elif impl.name != INTERPRET:
        pytest.skip(f"{impl.name} has no copy kernel")
    try:
        layers = [make_cache(layout, (10, 2, 16, 64), torch.bfloat16, impl.device) for _ in range(3)]
        layer_bytes = reference.bytes_per_block(reference.as_page_tensors(layers[0]))
        stored = host_buffer(impl, "pinned", 12, 3 * layer_bytes)
        for round_ in range(3):
            stored.copy_(torch.randint(0, 256, stored.shape, dtype=torch.uint8))
            plan = {0: ([7, 2], [11, 3 + round_]), 1: ([0, 9, 4], [1, 0, 6]), 2: ([5 + round_], [8])}
            jobs, expected = layer_loads(layers, stored, plan)
            before = copy_engine_calls() if impl.name == "cuda" else 0
            impl.scatter_blocks_many(jobs, stream=impl.new_stream(), background=True).wait()
            assert_layers_hold(layers, expected, round_)
            if impl.name == "cuda":
                assert copy_engine_calls() == before
        if impl.name == "cuda":
            assert impl._copy_tables.made - tables <= 1
    finally:
        if impl.name == "cuda":
            impl.background_copy = previous


def test_move_blocks_within_a_cache(impl: Backend):
    """Blocks loaded ahead into spare pages move onto the pages the attention reads (ESA's consume step)."""
    cache = make_cache("kv_tuple", (9, 2, 4, 8), torch.bfloat16, impl.device)
    before = [p.cpu().clone() for p in reference.as_page_tensors(cache)]
    src_ids, dst_ids = torch.tensor([4, 0, 8]), torch.tensor([1, 7, 3])
    impl.move_blocks(cache, src_ids.to(impl.device), dst_ids.to(impl.device), stream=impl.new_stream()).wait()
    for got, old in zip(reference.as_page_tensors(cache), before, strict=True):
        want = old.clone()
        want[dst_ids] = old[src_ids]
        assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))
    with pytest.raises(UcmConfigError, match="dst_ids"):
        impl.move_blocks(cache, src_ids, dst_ids[:2])


@pytest.mark.parametrize("buffer", ["pinned", "device"])
def test_round_trip_through_buffer_moves_blocks_between_caches(impl: Backend, buffer: str):
    """Offload blocks of one cache and load them into other slots of a second cache (a store's life cycle)."""
    shape = (9, 2, 4, 8)
    src_cache = make_cache("kv_tuple", shape, torch.bfloat16, impl.device)
    dst_cache = make_cache("kv_tuple", shape, torch.bfloat16, impl.device)
    src_ids, dst_ids = torch.tensor([4, 0, 8]), torch.tensor([1, 7, 3])
    width = reference.bytes_per_block(reference.as_page_tensors(src_cache))
    buf = host_buffer(impl, buffer, 3, width)
    side = impl.new_stream()
    impl.gather_blocks(src_cache, src_ids, buf, stream=side).wait()
    impl.scatter_blocks(buf, dst_cache, dst_ids, stream=side).wait()
    for s, d in zip(src_cache, dst_cache, strict=True):
        assert torch.equal(d[dst_ids.to(d.device)].cpu(), s[src_ids.to(s.device)].cpu())


def test_empty_block_list_touches_nothing(impl: Backend):
    cache = make_cache("layers", SHAPES[0], torch.float16, impl.device)
    pages = reference.as_page_tensors(cache)
    width = reference.bytes_per_block(pages)
    before = page_bytes(pages)
    ids = torch.empty(0, dtype=torch.int64)
    out = host_buffer(impl, "pinned", 2, width).fill_(SENTINEL)
    handle = impl.gather_blocks(cache, ids, out)
    handle.wait()
    assert handle.done() and bool((out.cpu() == SENTINEL).all())
    impl.scatter_blocks(out, cache, ids, rows=torch.empty(0, dtype=torch.int64)).wait()
    assert all(torch.equal(a, b) for a, b in zip(page_bytes(pages), before, strict=True))


def test_bad_arguments_raise_typed_errors(impl: Backend):
    cache = make_cache("kv_tuple", SHAPES[1], torch.float16, impl.device)
    width = reference.bytes_per_block(reference.as_page_tensors(cache))
    out = host_buffer(impl, "pinned", 4, width)
    with pytest.raises(UcmConfigError, match="gather_blocks out"):
        impl.gather_blocks(cache, torch.tensor([0, 1]), host_buffer(impl, "pinned", 4, width - 2)).wait()
    with pytest.raises(UcmConfigError, match="gather_blocks out"):
        impl.gather_blocks(cache, torch.tensor([0, 1, 2, 3, 5]), out).wait()  # more blocks than rows
    with pytest.raises(UcmConfigError, match="rows"):
        impl.gather_blocks(cache, torch.tensor([0, 1]), out, rows=torch.tensor([0])).wait()
    with pytest.raises((UcmConfigError, IndexError, RuntimeError)):
        impl.gather_blocks(cache, torch.tensor([0, SHAPES[1][0]]), out).wait()  # id past the cache
    transposed = random_tensor((4, 3, SHAPES[1][0], 8), torch.float16, impl.device).transpose(0, 2)
    with pytest.raises(UcmConfigError, match="page tensor strides"):
        impl.gather_blocks(transposed, torch.tensor([0]), out).wait()
