"""Loads ahead queued from a held stream (`Backend.hold_stream`, CUDA stream memory operations): they start only
once the gate opens, from the host or after another stream's work, a gate nobody opens opens itself, and UcmDram
keeps its other copies off the held path. Needs a CUDA GPU (run on the GPU machine)."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import ids_for, make_cache, page_bytes, row_bytes

from ucm.store import BlockPages, create_store

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")

WIDTH = row_bytes(make_cache())


def _backend():
    from ucm.device import get_backend

    return get_backend("cuda")


def _held_copy(backend, timeout_s: float = 5.0):
    """A copy queued on a held stream. Memory is allocated before the hold: an allocation that calls cudaMalloc
    or cudaHostAlloc synchronizes the device, so it would wait for the gate (until its timeout)."""
    from ucm.backends.cuda import stream_gate

    stream = backend.new_stream()
    src = torch.arange(1 << 20, dtype=torch.int32).pin_memory()
    dst = torch.zeros(1 << 20, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    gate = stream_gate.hold(stream, timeout_s=timeout_s)
    assert gate.held, stream_gate.unavailable_reason()
    with backend.use_stream(stream):
        dst.copy_(src, non_blocking=True)
    return gate, backend.record_event(stream), src, dst


def test_a_copy_on_a_held_stream_waits_until_the_host_opens_the_gate():
    backend = _backend()
    gate, done, src, dst = _held_copy(backend)
    time.sleep(0.2)
    assert not done.query()
    gate.open()
    done.synchronize()
    assert torch.equal(dst.cpu(), src)


@pytest.mark.parametrize("compute_stream", ["default", "side"])
def test_open_after_starts_the_held_copy_once_the_other_streams_work_ran(compute_stream):
    # "default": torch's default (legacy) stream, handle 0; "side": a stream of its own, as vLLM's forward runs
    # (vllm.utils.torch_utils.current_stream). The sleep kernel is launched once before the hold: the first launch
    # of a lazily loaded kernel waits for every stream, the held one too, so it returned only once the gate's
    # timeout had opened it (whichever case ran first in the process failed so:
    # bench/results/gpu_runs/stream_gate_order_h100_992ef74.json)
    from ucm.backends.cuda import stream_gate

    backend = _backend()
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    timed_out = stream_gate.timed_out
    gate, done, src, dst = _held_copy(backend)
    compute = torch.cuda.current_stream() if compute_stream == "default" else backend.new_stream()
    with backend.use_stream(compute):
        torch.cuda._sleep(1_000_000_000)  # ~0.5 s of device time on the compute stream
    gate.open_after(compute)
    after_sleep = backend.record_event(compute)
    time.sleep(0.05)
    assert not done.query()
    done.synchronize()
    assert after_sleep.query()  # the copy ended after the compute stream's sleep, which opened it
    assert stream_gate.timed_out == timed_out  # opened by the device, not by its timeout
    assert torch.equal(dst.cpu(), src)
    gate.open()  # opening again (from the host, after the device did) changes nothing
    assert torch.equal(dst.cpu(), src)


def test_a_gate_nobody_opens_opens_itself_and_a_device_synchronize_returns():
    from ucm.backends.cuda import stream_gate

    backend = _backend()
    before = stream_gate.timed_out
    _, done, src, dst = _held_copy(backend, timeout_s=0.3)
    started = time.monotonic()
    torch.cuda.synchronize()
    assert 0.2 <= time.monotonic() - started < 10
    assert done.query() and stream_gate.timed_out == before + 1
    assert torch.equal(dst.cpu(), src)


def test_a_held_background_load_does_not_hold_the_stores_other_loads():
    backend = _backend()
    blocks = 6
    src = [(k.cuda(), v.cuda()) for k, v in make_cache(3)]
    ids = ids_for(4, blocks)
    config = {"max_cache_size": 16 * WIDTH, "kv_block_size": WIDTH}
    with create_store("UcmDram", config, backend) as store:
        assert store.background_apart
        store.dump(ids, BlockPages(src, torch.arange(blocks, device="cuda"))).wait()
        behind = [(k.cuda(), v.cuda()) for k, v in make_cache()]
        now = [(k.cuda(), v.cuda()) for k, v in make_cache()]
        store.load(ids, BlockPages(now, torch.arange(blocks))).wait()  # allocates the store's device staging
        torch.cuda.synchronize()
        ahead_stream = backend.new_stream()
        from ucm.backends.cuda import stream_gate

        gate = stream_gate.hold(ahead_stream, timeout_s=5.0)
        assert gate.held
        with backend.use_stream(ahead_stream):
            held = store.load(ids, BlockPages(behind, torch.arange(blocks), background=True))
        started = time.monotonic()
        store.load(ids, BlockPages(now, torch.arange(blocks))).wait()
        took = time.monotonic() - started
        assert took < 0.5, f"a load on the store's own stream took {took:.3f} s behind the held one"
        assert not held.done()
        gate.open()
        held.wait()
        host = [(k.cpu(), v.cpu()) for k, v in src]
        for got in (now, behind):
            assert all(page_bytes([(k.cpu(), v.cpu()) for k, v in got], i) == page_bytes(host, i)
                       for i in range(blocks))
