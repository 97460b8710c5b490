"""NVIDIA CUDA backend: torch.cuda streams/events (via the generic `Backend`) plus Triton kernels from
`ucm.kernels` for the block primitives. Importable without a GPU; constructing it then fails with the reason."""

from __future__ import annotations

import torch

from ucm.device.backend import Backend


class CudaBackend(Backend):
    name = "cuda"
    device_type = "cuda"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not torch.cuda.is_available():
            return "torch reports no CUDA device (torch.cuda.is_available() is False)"
        return None


__all__ = ["CudaBackend"]
