"""The vllm-ascend adapter of the sparse hooks (`ucm.integration.vllm.compat.ascend`), checked on CPU tensors.

No NPU here: the metadata is a dataclass with vllm-ascend's ``AscendMetadata`` field names, the caches are
(k, v) tuples in its layout ``[num_blocks, block_size, num_kv_heads, head_size]``, and the attention
implementation is a CPU stand-in that reads the same fields the NPU kernels read (``block_tables`` and
``seq_lens_list``). The sparse algorithm is the real ESA worker (resident mode) on the CPU backend.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from ucm.errors import UcmConfigError
from ucm.integration.vllm.compat import ascend
from ucm.integration.vllm.compat.v0_32 import Vllm032Bindings
from ucm.integration.vllm.compat.v1_engine import key_view
from ucm.sparse.attention import paged_decode_attention
from ucm.sparse.base import SparseAttentionView

BS, NKV, NQ, HD = 4, 2, 4, 16


@dataclasses.dataclass
class AscendMetadata:  # the field names of vllm_ascend.attention.attention_v1.AscendMetadata
    attn_state: str = "DecodeOnly"
    num_actual_tokens: int = 0
    seq_lens: torch.Tensor = None
    seq_lens_cpu: torch.Tensor = None
    seq_lens_list: list = None
    actual_seq_lengths_q: list = None
    query_start_loc: torch.Tensor = None
    max_query_len: int = 1
    block_tables: torch.Tensor = None
    slot_mapping: torch.Tensor = None


def test_importable_without_vllm_ascend_and_install_is_a_no_op() -> None:
    if importlib.util.find_spec("vllm_ascend") is not None:
        pytest.skip("vllm-ascend is installed here")
    assert ascend.vllm_ascend_available() is False
    bindings = Vllm032Bindings()
    assert ascend.install(bindings) is False
    with pytest.raises(UcmConfigError, match="AscendMetadata"):
        bindings.adapter_for(AscendMetadata())  # not registered without vllm-ascend


def test_key_view_of_a_kv_tuple_is_the_k_cache_itself() -> None:
    k = torch.randn(8, BS, NKV, HD)
    v = torch.randn(8, BS, NKV, HD)
    assert key_view((k, v), BS, NKV, HD) is k
    with pytest.raises(UcmConfigError, match="k cache shape"):
        key_view((k[:, :2], v), BS, NKV, HD)


def test_metadata_takes_the_view_in_every_length_field() -> None:
    table = torch.arange(12, dtype=torch.int32).view(3, 4)
    lens = torch.tensor([13, 5, 9], dtype=torch.int32)
    md = AscendMetadata(seq_lens=lens, seq_lens_cpu=lens.clone(), seq_lens_list=lens.tolist() + [1],
                        block_tables=table)
    bindings = Vllm032Bindings()
    bindings.register_adapter("AscendMetadata", ascend.AscendMetadataAdapter())  # what install does on Ascend
    adapter = bindings.adapter_for(md)
    assert isinstance(adapter, ascend.AscendMetadataAdapter)
    assert adapter.block_table(md) is table and adapter.seq_lens(md) is lens
    view = SparseAttentionView(torch.tensor([[0, 3, 0, 0], [4, 5, 0, 0], [8, 9, 10, 0]], dtype=torch.int32),
                               torch.tensor([7, 5, 9], dtype=torch.int32), 9)
    new = adapter.with_view(md, view, layer=None, impl=None)
    assert torch.equal(new.block_tables, view.block_table) and torch.equal(new.seq_lens, view.seq_lens)
    assert new.seq_lens_cpu.tolist() == [7, 5, 9]
    assert new.seq_lens_list == [7, 5, 9, 1]  # a padded graph row keeps its length
    # the engine's metadata is shared by every layer of the step: it must stay untouched
    assert md.block_tables is table and md.seq_lens_list == [13, 5, 9, 1] and md.seq_lens_cpu.tolist() == [13, 5, 9]


class AscendLikeImpl:
    """CPU stand-in of AscendAttentionBackendImpl: decode reads ``block_tables`` and ``seq_lens_list``."""

    def __init__(self) -> None:
        self.seen: list[AscendMetadata] = []

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, **kwargs):
        self.seen.append(attn_metadata)
        if attn_metadata.attn_state == "DecodeOnly":
            k_cache, v_cache = kv_cache
            lengths = torch.tensor(attn_metadata.seq_lens_list[: query.shape[0]])
            output[:] = paged_decode_attention(query, k_cache, v_cache, attn_metadata.block_tables, lengths)
        return output


def test_sparse_decode_on_ascend_layout_attends_the_selected_blocks() -> None:
    from ucm.device import get_backend
    from ucm.integration.vllm.compat.base import BatchRow
    from ucm.integration.vllm.compat.v1_engine import SparseAttentionForward
    from ucm.integration.vllm.sparse_worker import SparseWorkerRuntime
    from ucm.sparse import UcmSparseRole, create_sparse

    torch.manual_seed(0)
    num_blocks, prompt = 32, 40  # 10 prompt blocks: sink [0], candidates [1, 8), local [8, 10); k = 1
    k_cache = torch.randn(num_blocks, BS, NKV, HD) * 0.1
    v_cache = torch.randn(num_blocks, BS, NKV, HD)
    block_ids = list(range(10, 21))  # logical position p -> physical block 10 + p; 20 holds the decode token
    needle_pos = 5
    direction = torch.randn(HD)
    k_cache[block_ids[needle_pos]] = direction * 3.0  # every key of the needle block points along the query
    sparse = create_sparse("ESA", {"ESA": {"sparse_ratio": 0.15, "init_window_sz": 1, "local_window_sz": 2}},
                           UcmSparseRole.WORKER, block_size=BS, backend=get_backend("cpu"), offload=False)
    sparse.register_kv_caches({"layer.0": (k_cache, v_cache)})
    runtime = SparseWorkerRuntime(sparse, BS)

    class AscendBindings(Vllm032Bindings):  # what install() sets up on an Ascend worker, runtime included
        def worker_runtime(self):
            return runtime

    bindings = AscendBindings()
    bindings.register_adapter("AscendMetadata", ascend.AscendMetadataAdapter())
    impl = AscendLikeImpl()
    forward = SparseAttentionForward("layer.0", impl.forward, bindings)

    def run_step(step: BatchRow, query: torch.Tensor, state: str, table: list[int], seq_len: int):
        md = AscendMetadata(
            attn_state=state, seq_lens=torch.tensor([seq_len], dtype=torch.int32),
            seq_lens_cpu=torch.tensor([seq_len], dtype=torch.int32), seq_lens_list=[seq_len],
            block_tables=torch.tensor([table + [0] * (16 - len(table))], dtype=torch.int32),
        )
        runtime.begin_step([step])
        out = forward(None, query, None, None, (k_cache, v_cache), md, output=torch.zeros_like(query))
        runtime.end_step()
        return out, md

    # prefill: the last prompt token's query points at the needle, ESA builds its block means and selection
    prefill_query = torch.randn(prompt, NQ, HD) * 0.1
    prefill_query[-1] = direction
    run_step(BatchRow("r", prompt, 0, prompt, block_ids[:10], 0), prefill_query, "PrefillNoCache",
             block_ids[:10], prompt)
    # first decode step: the kernel must read sink + needle + local + tail only
    query = direction.expand(1, NQ, HD).clone()
    out, dense_md = run_step(BatchRow("r", prompt, prompt, 1, block_ids, 0), query, "DecodeOnly",
                             block_ids, prompt + 1)
    seen = impl.seen[-1]
    expected_row = [block_ids[0], block_ids[needle_pos], block_ids[8], block_ids[9], block_ids[10]]
    assert seen.block_tables[0, :5].tolist() == expected_row
    assert seen.seq_lens_list == [4 * BS + 1] and seen.seq_lens.tolist() == [4 * BS + 1]
    expected = paged_decode_attention(query, k_cache, v_cache, torch.tensor([expected_row]), torch.tensor([17]))
    torch.testing.assert_close(out, expected)
    dense = paged_decode_attention(query, k_cache, v_cache, dense_md.block_tables, torch.tensor([prompt + 1]))
    assert not torch.allclose(out, dense)  # the view really changed what was attended
