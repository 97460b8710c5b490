"""Does holding one CUDA stream on the device (`ucm.backends.cuda.stream_gate`) hold other streams too?

The GPU serves streams through a few hardware queues (CUDA_DEVICE_MAX_CONNECTIONS, default 8); a stream waiting on
a memory word may block every stream that shares its queue. This holds one side stream, then times a small copy on
the current stream and on each of ``--streams`` fresh side streams (polled up to 0.3 s: longer counts as
blocked), and the held copy itself before and after the gate opens (``--timeout-s`` bounds that wait). Writes JSON
(``--out``); run it with and without CUDA_DEVICE_MAX_CONNECTIONS=32 to compare.

Then whether a gate opened from the device (`StreamGate.open_after`) opens only after the other stream's work:
behind ~0.3 s of ``torch.cuda._sleep`` on torch's default stream and on a side stream, the times (ms from the
``open_after`` call) at which the sleep ended, the gate's word was written and the held copy ended, and the write's
CUresult; for the default stream also the write on handle 1 and on handle 0. Measured on an H100
(bench/results/gpu_runs/stream_gate_order_h100_992ef74.json): every form ordered except the first check of the
process, whichever it was: the first launch of the (lazily loaded) sleep kernel returned only once the gate's
timeout had opened it (the word was written and the held copy done before the sleep began). ``--warm-sleep``
launches the sleep kernel once before the checks.

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


def _poll_times(events: dict[str, object], gate, limit_s: float) -> dict[str, float | None]:
    """ms from now until each event completed and until the gate's word was written (None: not within limit)."""
    started, times = time.monotonic(), {}
    pending = dict(events, word=None)
    while pending and time.monotonic() - started < limit_s:
        now = round((time.monotonic() - started) * 1e3, 2)
        for name, event in list(pending.items()):
            if (gate.is_open if event is None else event.query()):
                times[name] = now
                del pending[name]
        time.sleep(0.0002)
    return {name: times.get(name) for name in list(events) + ["word"]}


def _order_check(backend, stream_gate, compute_kind: str, how: str) -> dict:
    """One held copy opened after a sleep on the compute stream; ``how``: "open_after" (the gate's own path) or
    a direct write on stream handle "1" / "0" (what open_after did before it relayed the default stream)."""
    src = torch.ones(1 << 20, dtype=torch.int32).pin_memory()
    dst = torch.zeros(1 << 20, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    held_stream = backend.new_stream()
    gate = stream_gate.hold(held_stream, timeout_s=3.0)
    with backend.use_stream(held_stream):
        dst.copy_(src, non_blocking=True)
    held_done = backend.record_event(held_stream)
    compute = torch.cuda.current_stream() if compute_kind == "default" else backend.new_stream()
    codes = []
    write = gate._write

    def logged(handle, address, value, flags):
        rc = write(handle, address, value, flags)
        codes.append({"handle": int(handle) if handle else 0, "rc": rc})
        return rc

    gate._write = logged
    with backend.use_stream(compute):
        torch.cuda._sleep(600_000_000)
        sleep_done = backend.record_event(compute)
    if how == "open_after":
        gate.open_after(compute)
    else:
        codes.append({"handle": int(how), "rc": write(int(how), gate._address, gate._value, 0)})
    times = _poll_times({"sleep_done": sleep_done, "held_copy_done": held_done}, gate, 3.5)
    torch.cuda.synchronize()
    gate.open()
    ordered = None not in (times["sleep_done"], times["held_copy_done"]) and \
        times["held_copy_done"] >= times["sleep_done"]
    return {"compute_stream": compute_kind, "how": how, "writes": codes, "ms": times, "ordered": ordered,
            "copy_correct": bool(torch.equal(dst.cpu(), src))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=12)
    parser.add_argument("--timeout-s", type=float, default=2.0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--warm-sleep", action="store_true",
                        help="launch torch.cuda._sleep once (and synchronize) before the order checks")
    args = parser.parse_args()
    from ucm.backends.cuda import stream_gate

    from ucm.device import get_backend

    backend = get_backend("cuda")
    if args.warm_sleep:
        torch.cuda._sleep(1000)
        torch.cuda.synchronize()
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
        "open_after_order": [_order_check(backend, stream_gate, kind, how) for kind, how in
                             [("side", "open_after"), ("default", "open_after"), ("default", "1"), ("default", "0")]],
    }
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
