"""Does holding one CUDA stream on the device (`ucm.backends.cuda.stream_gate`) hold other streams too?

The GPU serves streams through a few hardware queues (CUDA_DEVICE_MAX_CONNECTIONS, default 8); a stream waiting on
a memory word may block every stream that shares its queue. This holds one side stream, then times a small copy on
the current stream and on each of ``--streams`` fresh side streams (polled up to 0.3 s: longer counts as
blocked), and the held copy itself before and after the gate opens (``--timeout-s`` bounds that wait). Writes JSON
(``--out``); run it with and without CUDA_DEVICE_MAX_CONNECTIONS=32 to compare.

    python bench/stream_gate_check.py --out bench/results/stream_gate_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def _wait(event, limit_s: float) -> float | None:
    started = time.monotonic()
    while not event.query():
        if time.monotonic() - started > limit_s:
            return None
        time.sleep(0.0005)
    return round((time.monotonic() - started) * 1e3, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=12)
    parser.add_argument("--timeout-s", type=float, default=2.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from ucm.backends.cuda import stream_gate

    from ucm.device import get_backend

    backend = get_backend("cuda")
    src = torch.ones(1 << 16, dtype=torch.int32).pin_memory()
    dst = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    held_stream = backend.new_stream()
    gate = stream_gate.hold(held_stream, timeout_s=args.timeout_s + 5)
    with backend.use_stream(held_stream):
        dst.copy_(src, non_blocking=True)
    held_done = backend.record_event(held_stream)
    others = []
    for name, stream in [("current", torch.cuda.current_stream())] + [
            (f"side{i}", backend.new_stream()) for i in range(args.streams)]:
        out = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
        with backend.use_stream(stream):
            out.copy_(src, non_blocking=True)
        ms = _wait(backend.record_event(stream), 0.3)
        others.append({"stream": name, "copy_ms": ms, "blocked": ms is None})
    before_open = held_done.query()
    opened = time.monotonic()
    gate.open()
    after_open_ms = _wait(held_done, args.timeout_s)
    torch.cuda.synchronize()
    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "cuda_device_max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"),
        "gate_held": gate.held, "unavailable_reason": stream_gate.unavailable_reason(),
        "held_copy_done_before_open": before_open, "held_copy_ms_after_open": after_open_ms,
        "open_to_sync_ms": round((time.monotonic() - opened) * 1e3, 2),
        "other_streams": others, "blocked": [e["stream"] for e in others if e["blocked"]],
    }
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
