"""Connector configuration and KV-layout checks (no engine: fast). Each bad input must give one
`UcmConfigError` naming the field, the value and what is accepted."""

from __future__ import annotations

import types

import pytest
import torch

from ucm.errors import UcmConfigError
from ucm.integration.vllm.config import ConnectorConfig, ModelBlockShape, check, resolve_async_load
from ucm.integration.vllm.kv_layout import detect_layout
from ucm.integration.vllm.metadata import UcmWorkerMetadata
from ucm.integration.vllm.stats import UcmConnectorStats
from ucm.store.config import physical_memory_bytes

BLOCK = ModelBlockShape(block_size=128, num_layers=2, page_bytes=65536, dtype="bfloat16")
DRAM = {"ucm_connector_name": "UcmDram", "ucm_connector_config": {"max_cache_size": 1 << 20}}


def nfs(tmp_path, **store) -> dict:
    return {"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": str(tmp_path), **store}}


def error(extra) -> UcmConfigError:
    with pytest.raises(UcmConfigError) as info:
        ConnectorConfig.parse(extra, BLOCK)
    return info.value


def test_valid_config_derives_kv_block_size(tmp_path) -> None:
    cfg = ConnectorConfig.parse({**nfs(tmp_path), "ucm_sparse_method": "ESA"}, BLOCK)
    assert cfg.store_config["kv_block_size"] == 131072
    assert cfg.sparse_method == "ESA" and cfg.prefix_reuse and cfg.save_blocks
    assert cfg.load_failure_policy == "recompute"
    assert not cfg.store_is_process_local
    dram = ConnectorConfig.parse(
        {"ucm_connector_name": "UcmDram", "ucm_connector_config": {"max_cache_size": 1 << 20, "kv_block_size": 131072}},
        BLOCK,
    )
    assert dram.store_is_process_local and dram.sparse_method is None


@pytest.mark.parametrize("scheduling", [True, False])
def test_loads_are_asynchronous_where_vllm_schedules_asynchronously_unless_set(scheduling) -> None:
    vllm_config = types.SimpleNamespace(scheduler_config=types.SimpleNamespace(async_scheduling=scheduling))
    auto = ConnectorConfig.parse(DRAM, BLOCK)
    assert auto.async_load == "auto"
    assert resolve_async_load(auto, vllm_config).async_load is scheduling
    for given in (True, False):
        assert resolve_async_load(ConnectorConfig.parse({**DRAM, "ucm_async_load": given}, BLOCK),
                                  vllm_config).async_load is given


def test_unknown_store_lists_the_known_ones() -> None:
    err = error({"ucm_connector_name": "UcmS3", "ucm_connector_config": {}})
    assert err.field == "ucm_connector_name" and err.value == "UcmS3"
    assert "'UcmDram'" in str(err) and "'UcmNfsStore'" in str(err)


def test_unknown_sparse_method_lists_the_known_ones(tmp_path) -> None:
    err = error({**nfs(tmp_path), "ucm_sparse_method": "Quest"})
    assert err.field == "ucm_sparse_method" and "'ESA'" in str(err)


def test_missing_storage_path(tmp_path) -> None:
    err = error({"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"kv_block_size": 131072}})
    assert err.field == "ucm_connector_config.storage_backends" and "directory" in str(err)


def test_kv_block_size_must_match_the_model(tmp_path) -> None:
    err = error(nfs(tmp_path, kv_block_size=33554432))
    assert err.field == "ucm_connector_config.kv_block_size" and err.value == 33554432
    assert "131072 for this model (2 layers x 65536 B" in str(err)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"ucm_connector_name": "UcmNfsStore"}, "ucm_connector_config"),
        ({"ucm_connector_config": {}}, "ucm_connector_name"),
        ({"ucm_connector_name": "UcmDram", "ucm_connector_config": {"kv_block_size": 131072}},
         "ucm_connector_config.max_cache_size"),
        ({"ucm_connector_name": "UcmDram", "ucm_connector_config": {"max_cache_size": "5GB"}},
         "ucm_connector_config.max_cache_size"),  # at parse time: the scheduler side reads it as an int
        ({"ucm_connector_name": "UcmDram", "ucm_connector_config": {"max_cache_size": 1, "bogus": 2}},
         "ucm_connector_config.bogus"),
        ({"ucm_connector_name": "UcmDram", "ucm_connector_config": {"max_cache_size": 1 << 20},
          "ucm_prefix_reuse": "yes"}, "ucm_prefix_reuse"),
        ({"ucm_connector_name": "UcmDram", "ucm_connector_config": {"max_cache_size": 1 << 20},
          "ucm_load_failure_policy": "ignore"}, "ucm_load_failure_policy"),
        ({"ucm_connector_name": "UcmDram", "ucm_connector_config": {"max_cache_size": 1 << 20},
          "ucm_sparse_metod": "ESA"}, "kv_connector_extra_config.ucm_sparse_metod"),
        ({"ucm_connector_name": "UcmDram", "ucm_connector_config": {"max_cache_size": 1 << 20},
          "ucm_device_backend": "tpu"}, "ucm_device_backend"),
    ],
)
def test_bad_fields_name_the_field(extra, field) -> None:
    assert error(extra).field == field


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        # values of the wrong type used to escape as TypeError / ValueError
        ({**DRAM, "ucm_connector_name": ["UcmDram"]}, "ucm_connector_name"),
        ({**DRAM, "ucm_sparse_method": ["ESA"]}, "ucm_sparse_method"),
        ({**DRAM, "ucm_device_backend": ["cpu"]}, "ucm_device_backend"),
        ({**DRAM, "ucm_load_failure_policy": ["fail"]}, "ucm_load_failure_policy"),
        ({**DRAM, "ucm_async_load": "yes"}, "ucm_async_load"),
        ({**DRAM, "ucm_async_load": 1}, "ucm_async_load"),
        ({**DRAM, "ucm_sparse_method": "ESA", "ucm_sparse_full_graphs": "yes"}, "ucm_sparse_full_graphs"),
        ({**DRAM, "ucm_sparse_method": "ESA", "ucm_sparse_config": {"ESA": 0.2}}, "ucm_sparse_config.ESA"),
        ({**DRAM, "ucm_sparse_method": "ESA", "ucm_sparse_config": {"ESA": [1, 2]}}, "ucm_sparse_config.ESA"),
        ({**DRAM, "ucm_sparse_method": "ESA", "ucm_sparse_config": {"ESA": "abc"}}, "ucm_sparse_config.ESA"),
        ({**DRAM, "ucm_sparse_method": "ESA", "ucm_sparse_config": [1, 2]}, "ucm_sparse_config"),
        ({**DRAM, "ucm_sparse_method": "ESA", "ucm_sparse_config": "abc"}, "ucm_sparse_config"),
        ({"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": "/tmp\0x"}},
         "ucm_connector_config.storage_backends"),
        ({"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": [""]}},
         "ucm_connector_config.storage_backends"),
        ({**DRAM, "ucm_connector_config": {"max_cache_size": "1GB"}}, "ucm_connector_config.max_cache_size"),
        ({**DRAM, "ucm_connector_config": {"max_cache_size": 1 << 20, "kv_block_size": "131072"}},
         "ucm_connector_config.kv_block_size"),
    ],
)
def test_malformed_values_give_one_config_error(extra, field) -> None:
    assert error(extra).field == field


@pytest.mark.parametrize("method", ["", False, 0, "esa"])
def test_sparse_method_is_a_known_name_or_absent(method) -> None:
    # "", False and 0 used to run dense without a word
    err = error({**DRAM, "ucm_sparse_method": method, "ucm_sparse_config": {"ESA": {}}})
    assert err.field == "ucm_sparse_method" and "'ESA'" in str(err) and "dense attention" in str(err)
    assert ("names are case-sensitive: 'ESA', not 'esa'" in str(err)) == (method == "esa")


def test_sparse_config_without_a_method_is_refused() -> None:
    err = error({**DRAM, "ucm_sparse_config": {"ESA": {"sparse_ratio": 0.3}}})
    assert err.field == "ucm_sparse_method" and err.value == "<missing>" and "'ESA'" in str(err)
    assert ConnectorConfig.parse({**DRAM, "ucm_sparse_config": {}}, BLOCK).sparse_method is None


@pytest.mark.parametrize("sparse_config", [{"esa": {"sparse_ratio": 0.3}}, {"ESA": {}, "Quest": {}}])
def test_sparse_config_entries_are_named_after_the_method(sparse_config) -> None:
    # {"esa": ...} used to run ESA with its defaults
    err = error({**DRAM, "ucm_sparse_method": "ESA", "ucm_sparse_config": sparse_config})
    assert err.field in ("ucm_sparse_config.esa", "ucm_sparse_config.Quest") and "method names: 'ESA'" in str(err)
    assert "only the key 'ESA'" in str(err)  # the key to write instead
    assert ("names are case-sensitive: 'ESA', not 'esa'" in str(err)) == (err.field == "ucm_sparse_config.esa")


def test_esa_fields_are_checked_with_the_connector_config() -> None:
    err = error({**DRAM, "ucm_sparse_method": "ESA", "ucm_sparse_config": {"ESA": {"sparse_ratio": 2}}})
    assert err.field == "ucm_sparse_config.ESA.sparse_ratio"
    cfg = ConnectorConfig.parse({**DRAM, "ucm_sparse_method": "ESA", "ucm_sparse_config": {"ESA": {"min_blocks": 8}}},
                                BLOCK)
    assert cfg.sparse_config == {"ESA": {"min_blocks": 8}}


@pytest.mark.parametrize(
    ("store", "field"),
    [
        ({"io_threads": 10**7}, "io_threads"),
        ({"staging_bytes": 2**50}, "staging_bytes"),
        ({"stale_temp_seconds": 0}, "stale_temp_seconds"),
        ({"storage_backends": "nope-missing"}, "storage_backends"),
    ],
)
def test_store_values_are_checked_without_the_model(tmp_path, store, field) -> None:
    # `check` is what runs in the process that builds vLLM's engine config, before the model is known
    with pytest.raises(UcmConfigError) as info:
        check(nfs(tmp_path, **store))
    assert info.value.field == f"ucm_connector_config.{field}"
    assert check(nfs(tmp_path))["store_config"] == {"storage_backends": str(tmp_path)}


def test_max_cache_size_is_bounded_by_physical_memory_before_anything_is_allocated() -> None:
    # 2**60 used to pass every check and fail in the pinned allocator, in the worker, after the model loaded
    from ucm.device import get_backend
    from ucm.store import create_store

    physical = physical_memory_bytes()
    assert physical is not None and physical > 0
    assert check({**DRAM, "ucm_connector_config": {"max_cache_size": physical}})["store_name"] == "UcmDram"
    for size in (physical + 1, 2**60):
        with pytest.raises(UcmConfigError) as info:
            check({**DRAM, "ucm_connector_config": {"max_cache_size": size}})
        assert info.value.field == "ucm_connector_config.max_cache_size" and info.value.value == size
        assert f"an int in [1, {physical}] (pinned host memory: at most this machine's physical memory" in str(
            info.value)
    # the store itself refuses it before allocating (not "allocating it failed")
    with pytest.raises(UcmConfigError, match=r"at most this machine's physical memory") as info:
        create_store("UcmDram", {"max_cache_size": 2**60, "kv_block_size": 4096}, get_backend("cpu"))
    assert "allocating" not in str(info.value)


@pytest.mark.parametrize("size", ["5GB", "5368709120", 5e9])
def test_sizes_are_plain_ints_and_the_error_shows_the_accepted_form(size) -> None:
    # JSON has no 5 << 30: the message shows a literal byte count
    err = error({**DRAM, "ucm_connector_config": {"max_cache_size": size}})
    assert err.field == "ucm_connector_config.max_cache_size" and err.value == size
    assert "a plain integer (bytes, e.g. 5368709120 for 5 GiB, not '5GB'" in str(err)


def test_kv_block_size_is_named_when_too_large(tmp_path) -> None:
    err = error(nfs(tmp_path, kv_block_size=2**40))
    assert err.field == "ucm_connector_config.kv_block_size" and err.value == 2**40


def test_layout_of_vllm_032_cpu_caches_and_its_tag() -> None:
    caches = {f"l{i}": torch.zeros(6, 2, 128, 128, dtype=torch.bfloat16) for i in range(2)}
    layout = detect_layout(caches, ["l0", "l1"], 6, {"l0": "CPU_ATTN", "l1": "CPU_ATTN"})
    assert layout.bytes_per_block == 2 * 2 * 128 * 128 * 2
    assert layout.row_offset("l1") == layout.page_bytes[0]
    assert layout.tag == "CPU_ATTN/t/bfloat16[2, 128, 128]o012"
    # the same logical shape with another physical order (e.g. a [k|v]-per-token backend) gets another tag
    permuted = {n: torch.zeros(6, 128, 2, 128, dtype=torch.bfloat16).transpose(1, 2) for n in caches}
    other = detect_layout(permuted, ["l0", "l1"], 6, {"l0": "CPU_ATTN", "l1": "CPU_ATTN"})
    assert other.tag != layout.tag and other.bytes_per_block == layout.bytes_per_block


def test_layout_splits_stacked_kv_and_accepts_kv_tuples() -> None:
    stacked = detect_layout({"a": torch.zeros(2, 5, 16, 4, 8)}, ["a"], 5)
    assert isinstance(stacked.caches[0], tuple) and stacked.bytes_per_block == 2 * 16 * 4 * 8 * 4
    pair = (torch.zeros(5, 16, 4, 8), torch.zeros(5, 16, 4, 8))
    assert detect_layout({"a": pair}, ["a"], 5).tag.startswith("?/kv/")


def test_layout_rejects_wrong_shapes_and_strided_pages() -> None:
    with pytest.raises(UcmConfigError, match="KV cache layout of layer a"):
        detect_layout({"a": torch.zeros(4, 5, 16)}, ["a"], 5)
    with pytest.raises(UcmConfigError, match="every layer of the KV group"):
        detect_layout({"a": torch.zeros(5, 16)}, ["a", "b"], 5)
    blocks_inside = torch.zeros(16, 5, 8).transpose(0, 1)  # dim 0 = blocks, but a block's page is strided
    with pytest.raises(UcmConfigError, match="page tensor strides"):
        detect_layout({"a": blocks_inside}, ["a"], 5)


def test_stats_sum_and_reduce() -> None:
    a, b = UcmConnectorStats(), UcmConnectorStats()
    a.add(lookup_blocks=4, hit_blocks=3, loaded_blocks=3, loaded_bytes=10)
    b.add(lookup_blocks=4, hit_blocks=1, load_failed_blocks=1, recomputed_blocks=1)
    # two sparse (request, decode step) pairs: 3 and 5 blocks attended of 12 and 12 (averaged over layers)
    b.add(sparse_requests=1, sparse_steps=2, resident_block_steps=8.0, full_block_steps=24.0)
    a.sample("load_durations", 0.5)
    b.sample("load_durations", 0.25)
    a.set_gauge("store_blocks", 0, 7)
    b.set_gauge("store_blocks", 1, 5)
    later = UcmConnectorStats()
    later.set_gauge("store_blocks", 0, 9)  # a later step of rank 0
    total = a.aggregate(b).aggregate(later)
    reduced = total.reduce()
    # a hit whose load failed is no hit: 3 of 8 looked-up blocks came from the store
    assert reduced["hit_blocks"] == 4 and reduced["hit_rate"] == 0.375 and reduced["recomputed_blocks"] == 1
    # block counts per sparse step, not sums over layers and steps
    assert (reduced["sparse_requests"], reduced["sparse_steps"]) == (1, 2)
    assert (reduced["resident_blocks"], reduced["full_blocks"], reduced["resident_share"]) == (4.0, 12.0, 0.3333)
    assert "resident_block_steps" not in reduced and "load_durations" not in reduced
    assert reduced["store_blocks"] == 9 + 5 and total.data["load_durations"] == [0.5, 0.25]
    assert "saved_blocks" not in reduced  # zero counters are left out of the log line
    assert UcmConnectorStats().is_empty() and not total.is_empty()
    rebuilt = UcmConnectorStats(data=dict(total.data))  # what vLLM's build_kv_connector_stats does
    assert rebuilt.reduce() == reduced


def test_worker_metadata_counts_a_block_loaded_only_if_every_worker_loaded_it() -> None:
    a = UcmWorkerMetadata(load_results={"r": [4, 0, 0]}, stored_ids={0: ["aa"]})
    b = UcmWorkerMetadata(load_results={"r": [3, 1, 1]}, stored_ids={1: ["bb"]}, missing_ids={1: ["cc"]})
    merged = a.aggregate(b)
    assert merged.load_results == {"r": [3, 1, 1]}
    assert merged.stored_ids == {0: ["aa"], 1: ["bb"]} and merged.missing_ids == {1: ["cc"]}


def test_worker_metadata_takes_one_workers_sparse_counters() -> None:
    # tensor-parallel workers attend the same blocks: counts are one worker's, times the slowest worker's
    a = UcmWorkerMetadata(sparse={"steps": 1, "retrievals": 40, "host_ms": 2.5},
                          sparse_requests={"r": [1, 4.0, 20.0]})
    b = UcmWorkerMetadata(sparse={"steps": 1, "retrievals": 40, "host_ms": 3.0, "blocks_loaded": 6},
                          sparse_requests={"r": [1, 4.0, 20.0], "q": [1, 2.0, 9.0]})
    merged = a.aggregate(b)
    assert merged.sparse == {"steps": 1, "retrievals": 40, "host_ms": 3.0, "blocks_loaded": 6}
    assert merged.sparse_requests == {"r": [1, 4.0, 20.0], "q": [1, 2.0, 9.0]}
    assert not merged.is_empty() and UcmWorkerMetadata(sparse={"steps": 0}).is_empty()


def test_sparse_engines_keep_full_graphs_unless_full_graphs_are_turned_off() -> None:
    from ucm.integration.vllm.uc_connector import UnifiedCacheConnectorV1 as Connector

    esa = {**DRAM, "ucm_sparse_method": "ESA"}
    off = {**esa, "ucm_sparse_full_graphs": False}
    assert ConnectorConfig.parse(esa, BLOCK).sparse_full_graphs is True
    assert ConnectorConfig.parse(off, BLOCK).sparse_full_graphs is False
    assert Connector.requires_piecewise_for_cudagraph(DRAM) is False  # dense: vLLM's own graph modes
    assert Connector.requires_piecewise_for_cudagraph(off) is True
    # the installed release's bindings write steady steps' views into vLLM's metadata: full graphs allowed
    assert Connector.requires_piecewise_for_cudagraph(esa) is False
    assert Connector.requires_piecewise_for_cudagraph({**esa, "ucm_sparse_full_graphs": True}) is False


@pytest.mark.parametrize(
    ("kind", "extra", "path"),
    [
        ("top-level field", {**DRAM, "ucm_save_blocks": 1}, "ucm_save_blocks"),
        ("top-level typo", {**DRAM, "ucm_prefix_resue": False}, "kv_connector_extra_config.ucm_prefix_resue"),
        ("store field", {**DRAM, "ucm_connector_config": {"max_cache_size": 1 << 20, "transfer": "rdma"}},
         "ucm_connector_config.transfer"),
        ("store field needing the model", {**DRAM, "ucm_connector_config": {"max_cache_size": 1 << 10}},
         "ucm_connector_config.max_cache_size"),
        ("sparse method", {**DRAM, "ucm_sparse_method": "Quest"}, "ucm_sparse_method"),
        ("sparse config entry", {**DRAM, "ucm_sparse_method": "ESA", "ucm_sparse_config": {"Quest": {}}},
         "ucm_sparse_config.Quest"),
        ("sparse field", {**DRAM, "ucm_sparse_method": "ESA", "ucm_sparse_config": {"ESA": {"min_blocks": 0}}},
         "ucm_sparse_config.ESA.min_blocks"),
        ("sparse field typo", {**DRAM, "ucm_sparse_method": "ESA", "ucm_sparse_config": {"ESA": {"ratio": 0.3}}},
         "ucm_sparse_config.ESA.ratio"),
    ],
)
def test_every_kind_of_config_error_names_the_users_key_path(kind: str, extra: dict, path: str) -> None:
    # the message starts with the path as written in kv_connector_extra_config, so a user can find the key
    err = error(extra)
    assert err.field == path and str(err).startswith(f"invalid {path}="), kind


def test_the_esa_schedule_names_the_users_key_path() -> None:
    from ucm.sparse.esa.schedule import EsaSchedule

    with pytest.raises(UcmConfigError, match=r"^invalid ucm_sparse_config\.ESA\.retrieval_stride=0:"):
        EsaSchedule(0)
