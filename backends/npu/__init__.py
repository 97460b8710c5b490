"""Ascend NPU backend (torch_npu). Importable without torch_npu; constructing it then fails with the reason.

torch_npu registers the PrivateUse1 device "npu", so the device-generic stream/event/copy code of `Backend`
covers it, and the block primitives run as torch ops on the NPU (`ucm.device.reference`). Only availability
detection is NPU-specific.
"""

from __future__ import annotations

import importlib.util

from ucm.device.backend import Backend


class NpuBackend(Backend):
    name = "npu"
    device_type = "npu"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("torch_npu") is None:
            return "torch_npu is not installed (pip install torch-npu matching your torch and CANN versions)"
        import torch
        import torch_npu  # noqa: F401  (registers torch.npu)

        if not torch.npu.is_available():
            return "torch_npu reports no NPU device (check the CANN driver and ASCEND_RT_VISIBLE_DEVICES)"
        return None


__all__ = ["NpuBackend"]
