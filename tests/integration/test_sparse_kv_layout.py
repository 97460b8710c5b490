"""The K view the sparse algorithm reads (`compat.v1_engine.key_view`) against what vLLM's CPU attention kernel
really writes: the kernel packs a block's K per head by ISA ("vec": a strided view; "amx": `AmxKeys`), the view
must address every token's key exactly."""

from __future__ import annotations

import pytest
import torch

from ucm.errors import UcmConfigError
from ucm.integration.vllm.compat.v1_engine import AmxKeys, key_view
from ucm.sparse.base import PackedKeys
from ucm.sparse.esa.retriever import attention_mass, block_representations

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
    ops.cpu_attn_reshape_and_cache(key, value, k_rows, v_rows, slots, "vec", k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    view = key_view(cache, block_size, num_kv_heads, head_size, "CPU_ATTN", "vec")
    assert view.shape == (num_blocks, block_size, num_kv_heads, head_size)
    assert view.data_ptr() == cache.data_ptr()  # a view: later writes show through
    assert torch.equal(view.reshape(-1, num_kv_heads, head_size)[block_size : block_size + n], key)
    # the block mean the sparse algorithm ranks blocks with is the mean of the keys written
    torch.testing.assert_close(view[1].float().mean(0), key[:block_size].float().mean(0))


@pytest.mark.parametrize(("block_size", "head_size"), [(32, 64), (128, 64), (64, 128)])
def test_amx_keys_read_what_the_cpu_amx_kernel_wrote(block_size: int, head_size: int) -> None:
    """vLLM-CPU picks the "amx" kernel for bf16 on AMX CPUs; its K packing needs `AmxKeys`. The packing op itself
    is plain code (it runs on any x86 CPU, AMX or not), so the reader is checked on every machine. Representations
    from it equal those of the plain keys."""
    from vllm import _custom_ops as ops

    from ucm.device import get_backend

    num_blocks, num_kv_heads, n = 4, 2, 2 * block_size + 5
    cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_size, dtype=torch.bfloat16)
    k_rows, v_rows = cache.view(num_blocks, num_kv_heads, 2 * block_size, head_size).chunk(2, dim=2)
    key = torch.randn(n, num_kv_heads, head_size, dtype=torch.bfloat16)
    value = torch.randn(n, num_kv_heads, head_size, dtype=torch.bfloat16)
    slots = torch.arange(n, dtype=torch.int64) + block_size  # from block 1 on
    ops.cpu_attn_reshape_and_cache(key, value, k_rows, v_rows, slots, "amx", k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    keys = key_view(cache, block_size, num_kv_heads, head_size, "CPU_ATTN", "amx")
    assert isinstance(keys, AmxKeys) and isinstance(keys, PackedKeys)
    assert keys.shape == (num_blocks, block_size, num_kv_heads, head_size) and keys.dim() == 4
    got = keys.read_blocks(torch.tensor([2, 1]))
    assert torch.equal(got[1], key[:block_size]) and torch.equal(got[0], key[block_size : 2 * block_size])
    # the vec view of the same bytes is not the keys: the packing differs
    assert not torch.equal(key_view(cache, block_size, num_kv_heads, head_size, "CPU_ATTN", "vec")[1], got[1])
    reps = block_representations(get_backend("cpu"), keys, torch.tensor([1, 2]), parts=block_size // 16)
    plain = key[: 2 * block_size].view(2, block_size, num_kv_heads, head_size)
    expected = block_representations(get_backend("cpu"), plain, torch.tensor([0, 1]), parts=block_size // 16)
    torch.testing.assert_close(reps, expected)
    # the initial selection by attention reads the packed keys too
    query = torch.randn(3, 2 * num_kv_heads, head_size)
    ids = torch.tensor([1, 2])
    torch.testing.assert_close(attention_mass(query, keys, ids), attention_mass(query, plain, torch.tensor([0, 1])))


def test_unknown_cache_shape_is_a_config_error() -> None:
    with pytest.raises(UcmConfigError, match="kv cache shape"):
        key_view(torch.zeros(4, 3, 5), 32, 2, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 32])
def test_key_view_reads_what_the_flash_attention_cache_write_wrote(block_size: int) -> None:
    """CUDA: the FLASH_ATTN page (logical [blocks, heads, block, 2*head], physical [block][head][k|v]) filled by
    vLLM's own ``reshape_and_cache_flash``; the sparse K view must address every key, without a copy."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the H200: bench/results/gpu_hooks_vllm026.txt)")
    from vllm import _custom_ops as ops

    num_blocks, num_kv_heads, head_size, n = 6, 8, 128, 70
    physical = torch.zeros(num_blocks, block_size, num_kv_heads, 2 * head_size, dtype=torch.bfloat16, device="cuda")
    cache = physical.permute(0, 2, 1, 3)  # the logical view vLLM registers (stride order of FLASH_ATTN)
    key_cache, value_cache = cache.transpose(1, 2).split(head_size, dim=-1)  # what the backend writes through
    key = torch.randn(n, num_kv_heads, head_size, dtype=torch.bfloat16, device="cuda")
    value = torch.randn(n, num_kv_heads, head_size, dtype=torch.bfloat16, device="cuda")
    slots = torch.arange(n, dtype=torch.int64, device="cuda") + block_size  # tokens land from block 1 on
    scale = torch.ones((), dtype=torch.float32, device="cuda")
    ops.reshape_and_cache_flash(key, value, key_cache, value_cache, slots, "auto", scale, scale)
    view = key_view(cache, block_size, num_kv_heads, head_size, "FLASH_ATTN")
    assert view.shape == (num_blocks, block_size, num_kv_heads, head_size)
    assert view.data_ptr() == cache.data_ptr()
    assert torch.equal(view.reshape(-1, num_kv_heads, head_size)[block_size : block_size + n], key)
