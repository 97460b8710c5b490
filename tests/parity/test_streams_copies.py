"""Streams, events, asynchronous copies and the pinned-buffer pool behave the same on every implementation.

On a GPU the side-stream work is made long enough that a missing wait would read stale data.
"""

from __future__ import annotations

import time

import pytest
import torch
from parity_impls import random_tensor

from ucm.device import PinnedBufferPool
from ucm.device.backend import Backend
from ucm.errors import PinnedPoolExhaustedError

N = 1 << 20


def busy(x: torch.Tensor, rounds: int = 30) -> torch.Tensor:
    """Slow, deterministic work: x ends up as x + rounds."""
    for _ in range(rounds):
        x.add_(1.0)
        x.mul_(1.0)
    return x


def wait_done(handle, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not handle.done():
        assert time.monotonic() < deadline, "handle never reported done"
        time.sleep(0.001)


def test_event_orders_work_across_streams(impl: Backend):
    x = torch.zeros(N, device=impl.device)
    impl.synchronize()
    side = impl.new_stream()
    with impl.use_stream(side):
        busy(x)
        event = impl.record_event(side)
    impl.wait_event(event)  # the current stream waits for the side stream's work, on the device
    y = x * 2
    impl.synchronize()
    assert bool((y == 60.0).all())
    event.synchronize()
    assert event.query()


def test_side_stream_waits_for_current_stream_event(impl: Backend):
    x = torch.zeros(N, device=impl.device)
    impl.synchronize()
    busy(x)
    event = impl.record_event()
    side = impl.new_stream()
    impl.wait_event(event, side)
    with impl.use_stream(side):
        y = x + 1
        done = impl.record_event(side)
    done.synchronize()
    assert bool((y == 31.0).all())


@pytest.mark.parametrize("direction", ["h2d", "d2h", "d2d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_copy_async_on_side_stream(impl: Backend, direction: str, dtype: torch.dtype):
    src_host = random_tensor((N,), dtype, torch.device("cpu"))
    pinned = impl.alloc_pinned(N * src_host.element_size()).view(dtype)
    device_a = torch.empty(N, dtype=dtype, device=impl.device)
    device_b = torch.empty(N, dtype=dtype, device=impl.device)
    if direction == "h2d":
        pinned.copy_(src_host)
        dst, src = device_a, pinned
    elif direction == "d2h":
        device_a.copy_(src_host)
        dst, src = pinned, device_a
    else:
        device_a.copy_(src_host)
        dst, src = device_b, device_a
    handle = impl.copy_async(dst, src, stream=impl.new_stream())
    handle.wait()
    assert handle.done()
    assert torch.equal(dst.cpu(), src_host)


def test_copy_async_sees_earlier_current_stream_work(impl: Backend):
    """A copy queued on a side stream starts after the work already queued on the current stream."""
    x = torch.zeros(N, device=impl.device)
    impl.synchronize()
    busy(x)  # queued on the current stream
    host = impl.alloc_pinned(N * 4).view(torch.float32)
    handle = impl.copy_async(host, x, stream=impl.new_stream())
    wait_done(handle)
    assert bool((host == 30.0).all())


def test_block_copy_handle_polls_done(impl: Backend):
    cache = random_tensor((64, 4, 16, 32), torch.float16, impl.device)
    out = impl.alloc_pinned(64 * 4 * 16 * 32 * 2).view(64, -1)
    handle = impl.gather_blocks(cache, torch.arange(64).flip(0), out, stream=impl.new_stream())
    wait_done(handle)
    assert torch.equal(out.cpu(), cache.flip(0).reshape(64, -1).view(torch.uint8).cpu())


def test_pinned_pool_reuses_and_bounds(impl: Backend):
    pool = PinnedBufferPool(impl, max_bytes=64 * 1024)
    a = pool.acquire(10_000)
    assert a.numel() == 10_000 and a.dtype == torch.uint8
    if impl.device.type != "cpu":
        assert a.is_pinned()
    ptr = a.data_ptr()
    pool.release(a)
    b = pool.acquire(9_000)  # same size class: the same memory comes back
    assert b.data_ptr() == ptr and pool.allocated_bytes == 16 * 1024
    c = pool.acquire(32 * 1024)
    with pytest.raises(PinnedPoolExhaustedError) as err:
        pool.acquire(32 * 1024)  # 16 + 32 in use, 32 more would pass the 64 KiB bound
    assert err.value.max_bytes == 64 * 1024
    pool.release(b)
    pool.release(c)
    d = pool.acquire(64 * 1024)  # idle buffers of other sizes are freed to make room
    assert d.numel() == 64 * 1024 and pool.allocated_bytes == 64 * 1024
    pool.release(d)
