"""UcmDram's arena in power-of-two chunks: what the host locks is what was asked (torch's pinned host allocators
round each allocation up to a power of two: one 66 GiB buffer failed on a 125 GiB GPU host), blocks round-trip
across chunks through every copy path, and a fault in one chunk's copy fails only that chunk's blocks."""

from __future__ import annotations

import pytest
import torch
from conftest import ids_for, make_cache, page_bytes, row_bytes

from ucm.device.cpu import CpuBackend
from ucm.errors import UcmConfigError
from ucm.store import BlockPages, StoreDumpError, StoreLoadError, create_store
from ucm.store.arena import MAX_CHUNKS, PinnedArena, chunk_rows

WIDTH = row_bytes(make_cache())  # 768 B: not a power of two
GiB, MiB = 1 << 30, 1 << 20


def pow2_ceil(n: int) -> int:
    return 1 << (n - 1).bit_length()


class RoundingPins(CpuBackend):
    """Pins as torch's caching host allocator does (each allocation rounded up to a power of two and all of it
    locked) on a host that can lock at most `limit` bytes."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.locked, self.sizes = limit, 0, []

    def alloc_pinned(self, nbytes: int) -> torch.Tensor:
        rounded = pow2_ceil(nbytes)
        if self.locked + rounded > self.limit:
            raise RuntimeError("CUDA error: out of memory")
        self.locked += rounded
        self.sizes.append(nbytes)
        return torch.empty(rounded, dtype=torch.uint8)[:nbytes]


@pytest.mark.parametrize("size,row", [(66 * GiB, 2 * MiB), (80 * GiB, 2 * MiB), (5 * GiB, 256 << 10),
                                      ((1 << 36) - 768, 768), (768, 768), (21 * MiB, 3 * MiB), (100 * GiB, 3 * MiB)])
def test_chunks_lock_what_was_asked(size, row):
    sizes: list[int] = []

    def alloc(nbytes: int) -> torch.Tensor:  # no memory behind it: only the sizes are checked
        sizes.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8, device="meta")

    rows = size // row
    arena = PinnedArena(alloc, rows, row)
    assert [len(c) for c in arena.chunks] == chunk_rows(rows, row) and sum(map(len, arena.chunks)) == rows
    assert len(sizes) <= MAX_CHUNKS and all(n % row == 0 for n in sizes)
    locked = sum(pow2_ceil(n) for n in sizes)
    assert locked <= rows * row * 17 // 16 + MAX_CHUNKS * row
    if size in (66 * GiB, 80 * GiB):  # 64 + 2 and 64 + 16 GiB: exactly what was asked (one buffer: 128 GiB)
        assert locked == size and len(sizes) == 2 and pow2_ceil(size) == 128 * GiB


@pytest.mark.parametrize("transfer", ["kernel", "dma"])
def test_a_store_the_host_could_not_pin_in_one_piece_round_trips_across_chunks(monkeypatch, transfer):
    monkeypatch.setattr("ucm.store.dram._DEVICE_STAGING_BYTES", 2 * WIDTH)
    blocks = 13  # 9984 B in chunks of 10, 2 and 1 rows: one buffer would lock 16 KiB, more than the host allows
    backend = RoundingPins(limit=12 * 1024)
    config = {"max_cache_size": blocks * WIDTH, "kv_block_size": WIDTH, "transfer": transfer}
    with pytest.raises(RuntimeError, match="out of memory"):
        RoundingPins(limit=12 * 1024).alloc_pinned(blocks * WIDTH)
    src = make_cache(1)
    ids = ids_for(2, blocks)
    with create_store("UcmDram", config, backend) as store:
        assert len(backend.sizes) == 3 and backend.locked <= 12 * 1024
        store.dump(ids, BlockPages(src, torch.arange(blocks))).wait()
        assert store.lookup(ids) == [True] * blocks
        order = [12, 0, 10, 3, 11, 9, 1]  # scattered rows of every chunk, out of order
        dst = make_cache()
        store.load([ids[i] for i in order], BlockPages(dst, torch.arange(len(order)) + 2)).wait()
        assert all(page_bytes(dst, 2 + j) == page_bytes(src, i) for j, i in enumerate(order))
        layer = make_cache()[1]  # a sub-range (one layer) read in place
        store.load([ids[i] for i in order], BlockPages(layer, torch.arange(len(order)), row_offset=WIDTH // 3)).wait()
        assert all(torch.equal(layer[0][j], src[1][0][i]) for j, i in enumerate(order))
        pin = store.pin(ids)
        dst = make_cache()
        store.load_pinned([(pin, order)], BlockPages(dst, torch.arange(len(order)))).wait()
        assert all(page_bytes(dst, j) == page_bytes(src, i) for j, i in enumerate(order))
        store.unpin(pin)
        assert store.stats().blocks_loaded == 3 * len(order)


class FaultyChunk(CpuBackend):
    """Copies into or out of the arena chunk at `bad` (a data pointer) raise while `armed`."""

    def __init__(self):
        super().__init__()
        self.bad, self.armed = None, True

    def _check(self, buf: torch.Tensor) -> None:
        if self.armed and buf.untyped_storage().data_ptr() == self.bad:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    def gather_blocks(self, cache, block_ids, out, rows=None, stream=None):
        self._check(out)
        return super().gather_blocks(cache, block_ids, out, rows, stream)

    def scatter_blocks(self, src, cache, block_ids, rows=None, stream=None, background=False):
        self._check(src)
        return super().scatter_blocks(src, cache, block_ids, rows, stream, background)

    def scatter_blocks_many(self, jobs, stream=None, background=False):
        for src, *_ in jobs:
            self._check(src)
        return super().scatter_blocks_many(jobs, stream, background)


def test_a_fault_in_one_chunk_fails_only_its_blocks_and_the_store_keeps_serving():
    backend = FaultyChunk()
    blocks = 13
    first = chunk_rows(blocks, WIDTH)[0]  # a fresh store fills rows 0, 1, ... in order
    src = make_cache(4)
    ids = ids_for(5, blocks)
    config = {"max_cache_size": blocks * WIDTH, "kv_block_size": WIDTH, "transfer": "kernel"}
    with create_store("UcmDram", config, backend) as store:
        backend.bad = store._arena.chunks[1].untyped_storage().data_ptr()
        with pytest.raises(StoreDumpError) as info:
            store.dump(ids, BlockPages(src, torch.arange(blocks))).wait()
        assert sorted(info.value.failed_ids) == sorted(ids[first:first + len(store._arena.chunks[1])])
        stored = store.lookup(ids)
        assert stored[:first] == [True] * first and not any(stored[first:first + len(store._arena.chunks[1])])
        backend.armed = False
        store.dump(ids, BlockPages(src, torch.arange(blocks))).wait()  # the failed rows were freed: stored now
        assert store.lookup(ids) == [True] * blocks
        backend.armed = True
        bad = {ids[i] for i, row in enumerate(_rows(store, ids)) if store._arena.chunk_of(row) == 1}
        dst = make_cache()
        with pytest.raises(StoreLoadError) as info:
            store.load(ids, BlockPages(dst, torch.arange(blocks))).wait()
        assert set(info.value.failed_ids) == bad and bad
        for i, block_id in enumerate(ids):  # loaded blocks exact, failed ones untouched
            assert page_bytes(dst, i) == (page_bytes(make_cache(), 0) if block_id in bad else page_bytes(src, i))
        # pinned loads of two layers at once (one device call per chunk): the faulty chunk's blocks fail in both
        pin = store.pin(ids)
        dst = make_cache()
        layer_bytes = WIDTH // 3
        items = [([(pin, list(range(blocks)))], BlockPages(dst[layer], torch.arange(blocks),
                                                           row_offset=layer * layer_bytes)) for layer in (0, 2)]
        with pytest.raises(StoreLoadError) as info:
            store.load_pinned_layers(items).wait()
        assert set(info.value.failed_ids) == bad
        for layer in (0, 2):
            for i, block_id in enumerate(ids):
                want = torch.zeros_like(dst[layer][0][i]) if block_id in bad else src[layer][0][i]
                assert torch.equal(dst[layer][0][i], want)
        store.unpin(pin)
        backend.armed = False
        dst = make_cache()
        store.load(ids, BlockPages(dst, torch.arange(blocks))).wait()
        assert all(page_bytes(dst, i) == page_bytes(src, i) for i in range(blocks))


def _rows(store, ids: list[str]) -> list[int]:
    pin = store.pin(ids)
    try:
        return pin.rows.tolist()
    finally:
        store.unpin(pin)


def test_a_size_the_host_cannot_pin_even_in_chunks_is_a_config_error():
    with pytest.raises(UcmConfigError, match=r"max_cache_size=9984.*allocating it failed"):
        create_store("UcmDram", {"max_cache_size": 13 * WIDTH, "kv_block_size": WIDTH}, RoundingPins(limit=4096))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
@pytest.mark.parametrize("transfer", ["kernel", "dma"])
def test_cuda_blocks_round_trip_across_pinned_chunks(transfer):
    """On a GPU: device pages -> three pinned chunks -> device pages, whole blocks and one layer's sub-range."""
    from ucm.device import get_backend

    def on_gpu(cache):
        return [(k.cuda(), v.cuda()) for k, v in cache]

    def host(cache):
        return [(k.cpu(), v.cpu()) for k, v in cache]

    blocks = 13  # chunks of 10, 2 and 1 rows
    config = {"max_cache_size": blocks * WIDTH, "kv_block_size": WIDTH, "transfer": transfer}
    src = on_gpu(make_cache(7))
    ids = ids_for(8, blocks)
    with create_store("UcmDram", config, get_backend("cuda")) as store:
        assert [len(c) for c in store._arena.chunks] == [10, 2, 1]
        store.dump(ids, BlockPages(src, torch.arange(blocks, device="cuda"))).wait()
        order = [12, 0, 10, 3, 11, 9, 1]
        dst = on_gpu(make_cache())
        store.load([ids[i] for i in order], BlockPages(dst, torch.arange(len(order), device="cuda"))).wait()
        assert all(page_bytes(host(dst), j) == page_bytes(host(src), i) for j, i in enumerate(order))
        layer = on_gpu(make_cache())[1]
        slots = torch.arange(len(order), device="cuda")
        store.load([ids[i] for i in order], BlockPages(layer, slots, row_offset=WIDTH // 3)).wait()
        assert all(torch.equal(layer[0][j].cpu(), src[1][0][i].cpu()) for j, i in enumerate(order))
