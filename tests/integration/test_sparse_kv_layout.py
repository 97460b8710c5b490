"""The K view the sparse algorithm reads (`compat.v1_engine.key_view`) against what vLLM's CPU attention kernel
really writes: the kernel packs a block's K per head by ISA, the view must address every token's key exactly."""

from __future__ import annotations

import pytest
import torch

from ucm.errors import UcmConfigError
from ucm.integration.vllm.compat.v1_engine import CPU_SPARSE_ISA, key_view

pytest.importorskip("vllm")


@pytest.mark.parametrize(("dtype", "head_size"), [(torch.bfloat16, 64), (torch.float32, 32), (torch.float16, 128)])
def test_key_view_reads_what_the_cpu_vec_kernel_wrote(dtype: torch.dtype, head_size: int) -> None:
    from vllm import _custom_ops as ops

    num_blocks, num_kv_heads, block_size, n = 4, 2, 32, 70
    cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
    k_rows, v_rows = cache.view(num_blocks, num_kv_heads, 2 * block_size, head_size).chunk(2, dim=2)
    key = torch.randn(n, num_kv_heads, head_size, dtype=dtype)
    value = torch.randn(n, num_kv_heads, head_size, dtype=dtype)
    slots = torch.arange(n, dtype=torch.int64) + block_size  # tokens 0..69 land in blocks 1, 2, 3
    ops.cpu_attn_reshape_and_cache(key, value, k_rows, v_rows, slots, CPU_SPARSE_ISA, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    view = key_view(cache, block_size, num_kv_heads, head_size, "CPU_ATTN")
    assert view.shape == (num_blocks, block_size, num_kv_heads, head_size)
    assert view.data_ptr() == cache.data_ptr()  # a view: later writes show through
    assert torch.equal(view.reshape(-1, num_kv_heads, head_size)[block_size : block_size + n], key)
    # the block mean the sparse algorithm ranks blocks with is the mean of the keys written
    torch.testing.assert_close(view[1].float().mean(0), key[:block_size].float().mean(0))


def test_unknown_cache_shape_is_a_config_error() -> None:
    with pytest.raises(UcmConfigError, match="kv cache shape"):
        key_view(torch.zeros(4, 3, 5), 32, 2, 64)
