"""Moving the small index tensors a launcher needs (block ids, rows, offsets) onto the kernel's device.

Shared by the launchers in `ucm.kernels`. Host tensors are packed into one int64 tensor and copied with a single
asynchronous copy from pinned memory (a copy from pageable memory may synchronize with the stream).
"""

from __future__ import annotations

import torch


def to_device_int64(tensors: list[torch.Tensor | list[int]], device: torch.device) -> list[torch.Tensor]:
    """Each tensor (or list of ints) as a flat int64 tensor on `device`, queued on the current stream."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    host: list[tuple[int, torch.Tensor]] = []
    for i, t in enumerate(tensors):
        if isinstance(t, torch.Tensor) and t.device == device:
            out[i] = t.reshape(-1).to(torch.int64)
        else:
            t = t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.int64)
            host.append((i, t.reshape(-1).to("cpu", torch.int64)))
    if host:
        packed = torch.cat([t for _, t in host]) if len(host) > 1 else host[0][1]
        if device.type != "cpu" and packed.numel():
            packed = packed.pin_memory().to(device, non_blocking=True)
        start = 0
        for i, t in host:
            out[i] = packed[start : start + t.numel()]
            start += t.numel()
    return out  # type: ignore[return-value]


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; a host tensor goes through pinned memory so the copy never blocks the host."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type != "cpu":
        return t.contiguous().pin_memory().to(device, non_blocking=True)
    return t.to(device)
