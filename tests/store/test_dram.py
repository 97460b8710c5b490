"""UcmDram on the CPU backend: round trips, sub-range loads, LRU eviction and its capacity bound, blocks being
loaded are never evicted, publish only after the copy, and concurrent use from several threads; faults: a failed
dump settles a second dump of its blocks, close racing calls, slots outside the pages, an arena too big to pin."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch
from conftest import NUM_PAGES, ids_for, make_cache, page_bytes, row_bytes

from ucm.device.cpu import CpuBackend
from ucm.errors import UcmConfigError
from ucm.store import BlockPages, StoreClosedError, StoreDumpError, StoreLoadError, create_store

WIDTH = row_bytes(make_cache())


def dram(backend, blocks: int):
    return create_store("UcmDram", {"max_cache_size": blocks * WIDTH, "kv_block_size": WIDTH}, backend)


class _GateEvent:
    def __init__(self, gate: threading.Event):
        self.gate = gate

    def query(self) -> bool:
        return self.gate.is_set()

    def synchronize(self) -> None:
        self.gate.wait()


class GatedBackend(CpuBackend):
    """The CPU backend, but a copy counts as finished only once `gate` is set: the store sees copies in flight
    as it does on a GPU (the bytes move at once; only completion is held back)."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()

    def record_event(self, stream=None):
        return _GateEvent(self.gate)


def test_round_trip_into_other_slots(backend):
    src, dst = make_cache(1), make_cache()
    ids = ids_for(1, 6)
    with dram(backend, 8) as store:
        store.dump(ids, BlockPages(src, torch.tensor([3, 5, 7, 9, 11, 13]))).wait()
        assert store.lookup(ids) == [True] * 6
        assert store.lookup_prefix(ids + ids_for(2, 1)) == 6
        assert store.lookup_prefix(ids_for(2, 1) + ids) == 0
        store.load(ids[::-1], BlockPages(dst, torch.tensor([20, 19, 18, 17, 16, 15]))).wait()
        for i, slot in enumerate([3, 5, 7, 9, 11, 13]):
            assert page_bytes(dst, 15 + i) == page_bytes(src, slot)
        stats = store.stats()
        assert (stats.blocks_dumped, stats.blocks_loaded, stats.bytes_loaded) == (6, 6, 6 * WIDTH)
        # dumping again is a no-op
        store.dump(ids[:2], BlockPages(src, torch.tensor([0, 1]))).wait()
        assert store.stats().dumps_skipped == 2


def test_load_one_layer_sub_range(backend):
    src = make_cache(2)
    layer_bytes = WIDTH // len(src)
    ids = ids_for(2, 2)
    with dram(backend, 4) as store:
        store.dump(ids, BlockPages(src, torch.tensor([4, 6]))).wait()
        dst_layer = make_cache()[0]
        store.load(ids, BlockPages(dst_layer, torch.tensor([1, 2]), row_offset=layer_bytes)).wait()
        assert torch.equal(dst_layer[0][1], src[1][0][4]) and torch.equal(dst_layer[1][2], src[1][1][6])
        with pytest.raises(UcmConfigError, match="load destination"):
            store.load(ids, BlockPages(dst_layer, torch.tensor([1, 2]), row_offset=WIDTH - layer_bytes + 1))
        with pytest.raises(UcmConfigError, match="dump source"):
            store.dump(ids, BlockPages(dst_layer, torch.tensor([1, 2])))


def test_lru_eviction_order_and_bound(backend):
    src = make_cache(3)
    a, b, c, d, e, f = ids_for(3, 6)
    with dram(backend, 4) as store:
        store.dump([a, b, c, d], BlockPages(src, torch.tensor([0, 1, 2, 3]))).wait()
        store.load([a], BlockPages(make_cache(), torch.tensor([0]))).wait()  # a is now most recent
        store.dump([e], BlockPages(src, torch.tensor([4]))).wait()  # evicts b
        assert store.lookup([a, b, c, d, e]) == [True, False, True, True, True]
        store.dump([f], BlockPages(src, torch.tensor([5]))).wait()  # evicts c
        assert store.lookup([a, c, d, e, f]) == [True, False, True, True, True]
        stats = store.stats()
        assert stats.evictions == 2 and stats.stored_blocks == 4 and stats.used_bytes <= stats.capacity_bytes
        task = store.load([b, d], BlockPages(make_cache(), torch.tensor([1, 2])))
        with pytest.raises(StoreLoadError, match="1 block") as info:
            task.wait()
        assert info.value.failed_ids == [b] and task.failed_ids == [b]


def test_block_being_loaded_is_never_evicted():
    backend = GatedBackend()
    src, dst = make_cache(4), make_cache()
    a, b, c, d = ids_for(4, 4)
    with dram(backend, 2) as store:
        backend.gate.set()
        store.dump([a, b], BlockPages(src, torch.tensor([0, 1]))).wait()
        backend.gate.clear()
        load = store.load([a], BlockPages(dst, torch.tensor([5])))  # in flight: a is pinned
        assert not load.done()
        dump = store.dump([c, d], BlockPages(src, torch.tensor([2, 3])))  # c evicts b; d finds no row
        assert store.lookup([a, b, c, d]) == [True, False, False, False]  # c not visible before its copy ends
        backend.gate.set()
        load.wait()
        with pytest.raises(StoreDumpError, match="full") as info:
            dump.wait()
        assert info.value.failed_ids == [d]
        assert store.lookup([a, c]) == [True, True] and page_bytes(dst, 5) == page_bytes(src, 0)


def test_threads_dump_and_load_concurrently(backend):
    """8 threads dump and load overlapping block sets through a store too small for all of them: a dump may
    find the store full, and every load either delivers the exact bytes or reports the block failed (its pages
    untouched)."""
    src = make_cache(5)
    ids = ids_for(5, NUM_PAGES)
    errors: list[BaseException] = []
    with dram(backend, 10) as store:

        def worker(k: int) -> None:
            try:
                gen = torch.Generator().manual_seed(k)
                for _ in range(30):
                    pick = torch.randperm(NUM_PAGES, generator=gen)[:4]
                    try:
                        store.dump([ids[i] for i in pick], BlockPages(src, pick)).wait()
                    except StoreDumpError as exc:  # every row pinned by other threads' loads/dumps right now
                        assert all("full" in r for r in exc.reasons.values())
                    dst = make_cache()
                    slots = torch.arange(4)
                    task = store.load([ids[i] for i in pick], BlockPages(dst, slots))
                    try:
                        task.wait()
                    except StoreLoadError:
                        pass
                    failed = set(task.failed_ids)
                    for j, i in enumerate(pick.tolist()):
                        expect = page_bytes(make_cache(), 0) if ids[i] in failed else page_bytes(src, i)
                        assert page_bytes(dst, j) == expect
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        stats = store.stats()
        assert stats.stored_blocks <= 10 and stats.evictions > 0 and stats.blocks_loaded > 0


def test_closed_store_refuses(backend):
    store = dram(backend, 2)
    store.close()
    store.close()
    with pytest.raises(StoreClosedError):
        store.lookup(ids_for(6, 1))


def test_second_dump_of_a_block_in_flight_ends_when_it_is_stored():
    backend = GatedBackend()
    src = make_cache(7)
    ids = ids_for(7, 2)
    with dram(backend, 4) as store:
        first = store.dump(ids, BlockPages(src, torch.tensor([0, 1])))
        second = store.dump(ids[:1], BlockPages(src, torch.tensor([0])))
        assert not first.done() and not second.done() and store.lookup(ids) == [False, False]
        backend.gate.set()
        second.wait()
        assert store.lookup(ids) == [True, True] and store.stats().dumps_skipped == 1
        first.wait()


@pytest.mark.parametrize("transfer", ["kernel", "dma"])
def test_transfer_modes_round_trip_through_scattered_rows(backend, monkeypatch, transfer):
    """Both ways across PCIe (on the CPU backend: the same code paths) deliver identical bytes, including the dma
    path's chunking through a small staging buffer and its runs of consecutive / scattered arena rows."""
    monkeypatch.setattr("ucm.store.dram._DEVICE_STAGING_BYTES", 3 * WIDTH)
    src = make_cache(8)
    ids = ids_for(8, 12)
    config = {"max_cache_size": 8 * WIDTH, "kv_block_size": WIDTH, "transfer": transfer}
    with create_store("UcmDram", config, backend) as store:
        store.dump(ids[:8], BlockPages(src, torch.arange(8))).wait()
        store.load(ids[1:8:2], BlockPages(make_cache(), torch.arange(4))).wait()  # odd blocks most recent
        store.dump(ids[8:12], BlockPages(src, torch.arange(8, 12))).wait()  # into rows 0, 2, 4, 6
        assert store.lookup(ids) == [i % 2 == 1 or i >= 8 for i in range(12)]
        live = [i for i in range(12) if i % 2 == 1 or i >= 8]
        dst = make_cache()
        store.load([ids[i] for i in live], BlockPages(dst, torch.arange(len(live)) + 2)).wait()
        assert all(page_bytes(dst, 2 + j) == page_bytes(src, i) for j, i in enumerate(live))
        layer = make_cache()[2]  # a sub-range load always reads the arena in place
        store.load([ids[9]], BlockPages(layer, torch.tensor([3]), row_offset=2 * WIDTH // 3)).wait()
        assert torch.equal(layer[1][3], src[2][1][9])


def test_bad_transfer_mode(backend):
    with pytest.raises(UcmConfigError, match="transfer.*'auto'.*'kernel'.*'dma'"):
        create_store("UcmDram", {"max_cache_size": WIDTH, "kv_block_size": WIDTH, "transfer": "rdma"}, backend)


def test_pinned_blocks_load_by_index_and_survive_eviction_until_unpinned(backend):
    src = make_cache(3)
    a, b, c, d, e, missing = ids_for(5, 6)
    with dram(backend, 3) as store:
        store.dump([a, b, c], BlockPages(src, torch.tensor([0, 1, 2]))).wait()
        pin = store.pin([a, missing, c])
        with pytest.raises(StoreDumpError, match="full") as full:
            store.dump([d, e], BlockPages(src, torch.tensor([3, 4]))).wait()  # only b is evictable: e finds no row
        assert full.value.failed_ids == [e]
        assert store.lookup([a, b, c, d, e]) == [True, False, True, True, False]
        dst = make_cache()
        other = store.pin([b, c])
        store.load_pinned([(pin, [2, 0]), (other, [1])], BlockPages(dst, torch.tensor([7, 5, 3]))).wait()
        assert page_bytes(dst, 7) == page_bytes(src, 2) and page_bytes(dst, 5) == page_bytes(src, 0)
        assert page_bytes(dst, 3) == page_bytes(src, 2)
        store.unpin(other)
        # an id that was not stored when pinned stays unloadable through the pin, named in the failure
        task = store.load_pinned([(pin, [1, 0])], BlockPages(make_cache(), torch.tensor([0, 1])))
        with pytest.raises(StoreLoadError) as info:
            task.wait()
        assert info.value.failed_ids == [missing] and store.stats().blocks_loaded == 4
        store.unpin(pin)
        store.unpin(pin)  # idempotent
        store.dump([e], BlockPages(src, torch.tensor([4]))).wait()  # now an unpinned block makes room
        assert store.lookup([e]) == [True]
        with pytest.raises(ValueError, match="released"):
            store.load_pinned([(pin, [0])], BlockPages(make_cache(), torch.tensor([0])))


class CountingBackend(CpuBackend):
    """The CPU backend, counting the device calls of loads."""

    def __init__(self):
        super().__init__()
        self.many_calls: list[int] = []  # jobs per scatter_blocks_many call

    def scatter_blocks_many(self, jobs, stream=None, background=False):
        self.many_calls.append(len(jobs))
        return super().scatter_blocks_many(jobs, stream, background)


def test_pinned_loads_into_several_layers_are_one_task_and_one_device_call():
    """Every layer's loads of a step (each layer its own blocks, pages and row sub-range) in one task and one
    device call; a block that was not stored when pinned fails in the layers that asked for it, the rest load."""
    backend = CountingBackend()
    src = make_cache(7)
    ids = ids_for(7, 6)
    layer_bytes = row_bytes([src[0]])
    with dram(backend, 8) as store:
        store.dump(ids[:5], BlockPages(src, torch.arange(5))).wait()
        pin = store.pin(ids)  # ids[5] is not stored
        dst = make_cache()
        wanted = {0: [4, 1], 1: [0, 5, 2], 2: [3]}
        items = [([(pin, positions)], BlockPages(dst[layer], torch.arange(len(positions)) + 10 * layer,
                                                  row_offset=layer * layer_bytes))
                 for layer, positions in wanted.items()]
        task = store.load_pinned_layers(items)
        with pytest.raises(StoreLoadError) as info:
            task.wait()
        assert info.value.failed_ids == [ids[5]] and backend.many_calls == [3]
        for layer, positions in wanted.items():
            for j, position in enumerate(positions):
                got = [t[10 * layer + j] for t in dst[layer]]
                want = [t[position] for t in src[layer]] if position < 5 else [torch.zeros_like(got[0])] * 2
                assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), (layer, position)
        for other, layer in ((dst[0], 1), (dst[1], 0)):  # nothing written outside each layer's own slots
            assert not other[0][10 * layer : 10 * layer + 3].any()
        assert store.stats().blocks_loaded == 5
        store.unpin(pin)


class HeldCopyBackend(CpuBackend):
    """The CPU backend, but the first `gather_blocks` (a dump's device copy) signals `entered`, waits for
    `release`, then raises when `fail` is set (a device fault, e.g. no memory for the DMA staging buffer): other
    threads act while a dump is between claiming its blocks and queuing its copy."""

    def __init__(self, fail: bool):
        super().__init__()
        self.fail = fail
        self.entered, self.release = threading.Event(), threading.Event()
        self._held = False

    def gather_blocks(self, *args, **kwargs):
        if not self._held:
            self._held = True
            self.entered.set()
            assert self.release.wait(10)
            if self.fail:
                raise RuntimeError("CUDA error: out of memory (injected)")
        return super().gather_blocks(*args, **kwargs)


def _in_thread(fn) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(_outcome(fn)), daemon=True)
    thread.start()
    return thread, out


def _outcome(fn):
    try:
        return fn()
    except BaseException as exc:  # returned to the test thread
        return exc


def test_failed_dump_fails_the_second_dump_of_the_same_block_and_close_returns():
    backend = HeldCopyBackend(fail=True)
    src = make_cache(9)
    ids = ids_for(9, 2)
    store = dram(backend, 4)
    first, out = _in_thread(lambda: store.dump(ids, BlockPages(src, torch.tensor([0, 1]))))
    assert backend.entered.wait(10)
    second = store.dump(ids[:1], BlockPages(src, torch.tensor([0])))  # waits on the first's copy
    assert not second.done()
    backend.release.set()
    first.join(10)
    with pytest.raises(StoreDumpError, match="out of memory") as info:
        out[0].wait(timeout=5)
    with pytest.raises(StoreDumpError, match="another task.*out of memory") as info:
        second.wait(timeout=5)
    assert info.value.failed_ids == ids[:1] and store.lookup(ids) == [False, False]
    store.dump(ids, BlockPages(src, torch.tensor([0, 1]))).wait(timeout=5)  # the claims were released
    assert store.lookup(ids) == [True, True]
    closer, _ = _in_thread(store.close)
    closer.join(10)
    assert not closer.is_alive()


def test_second_dump_waits_while_the_first_is_queuing_its_copy():
    backend = HeldCopyBackend(fail=False)
    src = make_cache(10)
    ids = ids_for(10, 1)
    with dram(backend, 2) as store:
        first, out = _in_thread(lambda: store.dump(ids, BlockPages(src, torch.tensor([3]))))
        assert backend.entered.wait(10)
        second = store.dump(ids, BlockPages(src, torch.tensor([3])))
        assert not second.done()
        backend.release.set()
        second.wait(timeout=5)  # ends once the first has published, even if nobody polls the first
        first.join(10)
        assert store.lookup(ids) == [True] and out[0].done()


def test_close_racing_a_dump_waits_for_it_and_later_calls_raise_closed():
    """close() while a dump is queuing its copy: the dump completes (close waits for it), every call that starts
    after close raises StoreClosedError, and close returns."""
    backend = HeldCopyBackend(fail=False)
    src, dst = make_cache(11), make_cache()
    ids = ids_for(11, 2)
    config = {"max_cache_size": 4 * WIDTH, "kv_block_size": WIDTH, "transfer": "dma"}
    store = create_store("UcmDram", config, backend)
    dumper, out = _in_thread(lambda: store.dump(ids, BlockPages(src, torch.tensor([0, 1]))))
    assert backend.entered.wait(10)
    closer, _ = _in_thread(store.close)
    deadline = time.monotonic() + 10
    while not isinstance(_outcome(lambda: store.lookup(ids)), StoreClosedError):  # close has begun
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(StoreClosedError):
        store.dump(ids_for(12, 1), BlockPages(src, torch.tensor([2])))
    with pytest.raises(StoreClosedError):
        store.load(ids, BlockPages(dst, torch.tensor([0, 1])))
    backend.release.set()
    closer.join(10)
    dumper.join(10)
    assert not closer.is_alive() and not dumper.is_alive()
    out[0].wait(timeout=5)  # the racing dump succeeded
    with pytest.raises(StoreClosedError):
        store.pin(ids)


@pytest.mark.parametrize("slot", [-1, NUM_PAGES])
def test_slot_outside_the_pages_is_refused(backend, slot):
    src, dst = make_cache(13), make_cache()
    ids = ids_for(13, 2)
    with dram(backend, 4) as store:
        with pytest.raises(UcmConfigError, match=f"BlockPages.slots.*{slot}.*{ids[1]}"):
            store.dump(ids, BlockPages(src, torch.tensor([0, slot])))
        assert store.lookup(ids) == [False, False]
        store.dump(ids, BlockPages(src, torch.tensor([0, 1]))).wait()  # no claim was left behind
        with pytest.raises(UcmConfigError, match="BlockPages.slots"):
            store.load(ids, BlockPages(dst, torch.tensor([slot, 1])))
        assert page_bytes(dst, NUM_PAGES - 1) == page_bytes(make_cache(), 0)
        pin = store.pin(ids)
        with pytest.raises(UcmConfigError, match="BlockPages.slots"):
            store.load_pinned([(pin, [0, 1])], BlockPages(dst, torch.tensor([1, slot])))
        store.unpin(pin)


def test_layers_with_fewer_pages_bound_the_slots(backend):
    """A slot that exists in some layers but not in others is refused before anything is claimed."""
    src = make_cache(14)
    src[1] = (src[1][0][:8], src[1][1][:8])
    ids = ids_for(14, 1)
    with dram(backend, 2) as store:
        for _ in range(2):
            with pytest.raises(UcmConfigError, match=r"\[0, 8\)"):
                store.dump(ids, BlockPages(src, torch.tensor([10])))
        store.dump(ids, BlockPages(src, torch.tensor([5]))).wait(timeout=5)
        assert store.lookup(ids) == [True]


def test_max_cache_size_that_cannot_be_allocated(backend):
    # Sizes beyond physical memory are refused before allocating (test_connector_config); a smaller one the
    # allocator still refuses (80 of 128 GiB could not be pinned on a GPU host) fails as config, with its reason.
    class Unpinnable(type(backend)):
        def alloc_pinned(self, nbytes: int) -> torch.Tensor:
            raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")

    with pytest.raises(UcmConfigError, match=r"ucm_connector_config\.max_cache_size=1048576.*host memory.*0.0 GiB was "
                       r"asked and allocating it failed \(RuntimeError: CUDA error: out of memory") as info:
        create_store("UcmDram", {"max_cache_size": 1 << 20, "kv_block_size": WIDTH}, Unpinnable())
    assert "\n" not in str(info.value)


def test_an_id_listed_twice_in_one_dump_is_copied_once(backend):
    src = make_cache(15)
    (a,) = ids_for(15, 1)
    with dram(backend, 2) as store:
        store.dump([a, a], BlockPages(src, torch.tensor([2, 2]))).wait(timeout=5)
        assert store.lookup([a]) == [True] and store.stats().stored_blocks == 1


class FlakyBackend(CpuBackend):
    """The CPU backend, but every device copy takes a millisecond (other threads race it) and every third one
    raises (the bytes it would move never move)."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        self._calls = 0

    def _flaky(self) -> None:
        time.sleep(0.001)
        with self._lock:
            self._calls += 1
            if self._calls % 3 == 0:
                raise RuntimeError("CUDA error: out of memory (injected)")

    def gather_blocks(self, *args, **kwargs):
        self._flaky()
        return super().gather_blocks(*args, **kwargs)

    def scatter_blocks(self, *args, **kwargs):
        self._flaky()
        return super().scatter_blocks(*args, **kwargs)


def _race_dumps_and_loads(store, src, ids, threads: int, rounds: int, slots=lambda pick, k, i: pick) -> None:
    """`threads` threads each dump 3 random blocks of `ids` (pages `slots(pick, thread, round)` of `src`) and load
    them back, `rounds` times: every task ends within its timeout (a TimeoutError is a hang) and a load gives the
    exact bytes or names the block failed (its page untouched)."""
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            gen = torch.Generator().manual_seed(k)
            for i in range(rounds):
                pick = torch.randperm(len(ids), generator=gen)[:3]
                try:
                    store.dump([ids[j] for j in pick], BlockPages(src, slots(pick, k, i))).wait(timeout=10)
                except StoreDumpError:
                    pass
                dst = make_cache()
                task = store.load([ids[j] for j in pick], BlockPages(dst, torch.arange(3)))
                try:
                    task.wait(timeout=10)
                except StoreLoadError:
                    pass
                for n, j in enumerate(pick.tolist()):
                    failed = ids[j] in task.failed_ids
                    assert page_bytes(dst, n) == (page_bytes(make_cache(), 0) if failed else page_bytes(src, j))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert not any(t.is_alive() for t in workers) and not errors, errors[:1]


def test_threads_racing_dumps_of_the_same_blocks_through_faults():
    """6 threads dump and load the same few blocks while a third of the copies fail: every task ends within its
    timeout, a load delivers the exact bytes or names the block failed (pages untouched), and close returns."""
    backend = FlakyBackend()
    src = make_cache(16)
    ids = ids_for(16, 6)
    store = dram(backend, 4)
    _race_dumps_and_loads(store, src, ids, threads=6, rounds=40)
    closer, _ = _in_thread(store.close)
    closer.join(10)
    assert not closer.is_alive()
    assert store.stats().dump_failures > 0


class _FaultyEvent(_GateEvent):
    def query(self) -> bool:
        if not self.gate.is_set():
            return False
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    def synchronize(self) -> None:
        self.gate.wait()
        self.query()


class InFlightFaultBackend(GatedBackend):
    """The gated CPU backend, but while `fail` is set a queued copy reports a device error once the gate opens
    (an asynchronous fault: the copy was queued fine)."""

    fail = True

    def record_event(self, stream=None):
        return _FaultyEvent(self.gate) if self.fail else super().record_event(stream)


def test_copy_that_faults_in_flight_fails_its_blocks_and_frees_their_rows():
    backend = InFlightFaultBackend()
    src = make_cache(17)
    ids = ids_for(17, 2)
    with dram(backend, 2) as store:
        first = store.dump(ids, BlockPages(src, torch.tensor([0, 1])))
        second = store.dump(ids, BlockPages(src, torch.tensor([0, 1])))  # waits on the first's copy
        assert not second.done()
        backend.gate.set()
        for task in (second, first):
            with pytest.raises(StoreDumpError, match="illegal memory access") as info:
                task.wait(timeout=5)
            assert info.value.failed_ids == ids
        stats = store.stats()
        assert store.lookup(ids) == [False, False] and (stats.dump_failures, stats.dumps_skipped) == (2, 2)
        backend.fail = False
        store.dump(ids, BlockPages(src, torch.tensor([0, 1]))).wait(timeout=5)  # both rows were freed
        backend.fail = True
        dst = make_cache()
        with pytest.raises(StoreLoadError, match="illegal memory access"):
            store.load(ids, BlockPages(dst, torch.tensor([3, 4]))).wait()
        backend.fail = False
        store.dump(ids_for(18, 2), BlockPages(src, torch.tensor([2, 3]))).wait(timeout=5)  # load unpinned: evictable
        assert store.lookup(ids) == [False, False]


@pytest.mark.parametrize("transfer", ["kernel", "dma"])
def test_dumps_that_really_fail_race_good_dumps_of_the_same_blocks(backend, transfer):
    """No injected backend: half the dumps give slots on the meta device, whose gather really raises (the host slot
    check cannot read them). 4 threads dump and load the same 8 blocks through 4 rows (evictions keep the dumps
    racing): every task ends within its timeout, a load gives the exact bytes or names the block failed, and
    close returns. A failed dump used to drop its claim without a handle: a racing dump of its blocks hung."""
    src = make_cache(19)
    ids = ids_for(19, 8)
    store = create_store("UcmDram", {"max_cache_size": 4 * WIDTH, "kv_block_size": WIDTH, "transfer": transfer},
                         backend)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so dumps land inside each other's claims
    try:
        _race_dumps_and_loads(store, src, ids, threads=4, rounds=60,
                              slots=lambda pick, k, i: pick.to("meta") if (i + k) % 2 else pick)
    finally:
        sys.setswitchinterval(old)
    assert store.stats().dump_failures > 0
    closer, _ = _in_thread(store.close)
    closer.join(10)
    assert not closer.is_alive()
