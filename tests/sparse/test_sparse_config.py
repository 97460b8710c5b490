"""Sparse factory and ESA config validation: defaults, ranges, unknown names -> one clear UcmConfigError."""

from __future__ import annotations

import pytest

from ucm.device import get_backend
from ucm.errors import UcmConfigError
from ucm.sparse import (
    INVALID_SLOTS,
    EsaConfig,
    UcmSparseBase,
    UcmSparseRole,
    create_sparse,
    known_methods,
)


def test_defaults_are_ucm_published_setting():
    esa = create_sparse("ESA", None, UcmSparseRole.SCHEDULER, block_size=16)
    assert isinstance(esa, UcmSparseBase) and esa.name == "ESA"
    assert esa.config == EsaConfig(1, 2, 4, 0.2, 10)


def test_config_is_read_from_the_method_entry():
    cfg = {"ESA": {"sparse_ratio": 0.5, "retrieval_stride": 3, "init_window_sz": 0}}
    esa = create_sparse("ESA", cfg, UcmSparseRole.WORKER, block_size=16, backend=get_backend("cpu"), offload=False)
    assert (esa.config.sparse_ratio, esa.config.retrieval_stride, esa.config.init_window_sz) == (0.5, 3, 0)
    assert esa.config.local_window_sz == 2


def test_unknown_method_lists_known():
    with pytest.raises(UcmConfigError, match="ucm_sparse_method") as info:
        create_sparse("KVComp", None, UcmSparseRole.SCHEDULER, block_size=16)
    assert "'ESA'" in str(info.value) and "ESA" in known_methods()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sparse_ratio", 0.0), ("sparse_ratio", 1.5), ("sparse_ratio", "0.2"), ("sparse_ratio", True),
        ("retrieval_stride", 0), ("retrieval_stride", 2.0), ("init_window_sz", -1), ("local_window_sz", 0),
        ("min_blocks", 0), ("local_window", 2), ("initial_selection", "Attention"), ("initial_selection", None),
        ("initial_queries", 0), ("initial_queries", 8.0),
    ],
)
def test_bad_fields_name_the_field(field, value):
    with pytest.raises(UcmConfigError) as info:
        create_sparse("ESA", {"ESA": {field: value}}, UcmSparseRole.SCHEDULER, block_size=16)
    assert field in str(info.value)


def test_bad_block_size_and_config_type():
    with pytest.raises(UcmConfigError, match="block_size"):
        create_sparse("ESA", None, UcmSparseRole.SCHEDULER, block_size=0)
    with pytest.raises(UcmConfigError, match="ucm_sparse_config"):
        create_sparse("ESA", [("ESA", {})], UcmSparseRole.SCHEDULER, block_size=16)


@pytest.mark.parametrize("entry", [0.2, [1, 2], "abc"])
def test_method_entry_must_be_a_mapping(entry):
    with pytest.raises(UcmConfigError) as info:
        create_sparse("ESA", {"ESA": entry}, UcmSparseRole.SCHEDULER, block_size=16)
    assert info.value.field == "ucm_sparse_config.ESA" and "sparse_ratio" in str(info.value)


def test_unhashable_method_name_lists_known():
    with pytest.raises(UcmConfigError) as info:
        create_sparse(["ESA"], None, UcmSparseRole.SCHEDULER, block_size=16)
    assert info.value.field == "ucm_sparse_method" and "'ESA'" in str(info.value)


class _Request:
    def __init__(self, prompt: int, computed: int, outputs: int = 0):
        self.request_id, self.num_prompt_tokens, self.num_computed_tokens = "r", prompt, computed
        self._outputs = outputs

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self._outputs


def test_estimate_num_slots_sparse():
    esa = create_sparse("ESA", None, UcmSparseRole.SCHEDULER, block_size=16)
    assert esa.estimate_num_slots_sparse(_Request(1000, 0), 1000) == INVALID_SLOTS  # prefill: dense
    assert esa.estimate_num_slots_sparse(_Request(40, 40, 1)) == INVALID_SLOTS  # 3 blocks < min_blocks
    # 1000 tokens = 63 blocks: sink 1 + int(60 * 0.2) = 12 + spares int(12 * 0.4) = 4 (the default prefetch_ratio)
    # + local 2 (+ nothing new: token 1000 fits block 62)
    assert esa.estimate_num_slots_sparse(_Request(1000, 1000, 1)) == (1 + 12 + 4 + 2) * 16
