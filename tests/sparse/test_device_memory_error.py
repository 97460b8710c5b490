"""A sparse method that runs out of device memory stops the step with one error saying why and what to change."""

from __future__ import annotations

import pytest
import torch

from ucm.device.cpu import CpuBackend
from ucm.integration.vllm.compat.base import BatchRow
from ucm.integration.vllm.sparse_worker import SparseDeviceMemoryError, SparseWorkerRuntime
from ucm.sparse import UcmSparseRole, create_sparse

BS, NKV, NQ, HD = 4, 2, 4, 16


class _FullDevice(CpuBackend):
    """A device whose memory is used up once armed: block representations fail as a CUDA allocation would."""

    armed = False

    def block_means(self, *args, **kwargs):
        if self.armed:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().block_means(*args, **kwargs)


def test_out_of_device_memory_in_a_hook_names_the_budget_to_change():
    backend = _FullDevice()
    sparse = create_sparse("ESA", {"ESA": {"sparse_ratio": 0.2}}, UcmSparseRole.WORKER, block_size=BS,
                           backend=backend, offload=False)
    k_cache, v_cache = torch.randn(32, BS, NKV, HD), torch.randn(32, BS, NKV, HD)
    sparse.register_kv_caches({"layer.0": (k_cache, v_cache)})  # its warm-up allocates fine
    runtime = SparseWorkerRuntime(sparse, BS)
    prompt = 40
    runtime.begin_step([BatchRow("r", prompt, 0, prompt, list(range(10, 20)), 0)])
    query = torch.randn(prompt, NQ, HD)
    assert runtime.attention_begin("layer.0", query, None, None, (k_cache, v_cache), None, None) is None
    backend.armed = True  # the end of the prefill computes the request's block representations
    with pytest.raises(SparseDeviceMemoryError, match="gpu_memory_utilization") as info:
        runtime.attention_finished("layer.0", query, None, None, None, (k_cache, v_cache))
    assert info.value.method == "ESA" and info.value.hook == "attention_finished"
    assert "2.00 GiB" in str(info.value) and isinstance(info.value.__cause__, torch.OutOfMemoryError)
