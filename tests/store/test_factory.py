"""`create_store`: names map to classes; unknown names and fields raise one UcmConfigError listing what is
accepted; bad values name the field."""

from __future__ import annotations

import numpy as np
import pytest

from ucm.errors import UcmConfigError
from ucm.store import create_store, registered_stores
from ucm.store.dram import DramStore
from ucm.store.factory import check_config
from ucm.store.nfs import NfsStore


def test_names_map_to_classes(backend, tmp_path):
    assert {"UcmDram", "UcmNfsStore"} <= set(registered_stores())
    with create_store("UcmDram", {"max_cache_size": 4096, "kv_block_size": 1024}, backend) as store:
        assert isinstance(store, DramStore) and store.stats().capacity_bytes == 4096
    with create_store("UcmNfsStore", {"storage_backends": str(tmp_path), "kv_block_size": 1024}, backend) as store:
        assert isinstance(store, NfsStore)


def test_unknown_name_lists_known(backend):
    with pytest.raises(UcmConfigError, match="ucm_connector_name.*'UcmDram'.*'UcmNfsStore'"):
        create_store("UcmMooncake", {}, backend)


def test_unknown_field_lists_accepted(backend):
    with pytest.raises(UcmConfigError, match="max_cache_sise.*max_cache_size.*kv_block_size"):
        create_store("UcmDram", {"max_cache_sise": 1, "kv_block_size": 1024}, backend)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"max_cache_size": 4096}, "kv_block_size"),
        ({"max_cache_size": "4GB", "kv_block_size": 1024}, "max_cache_size"),
        ({"max_cache_size": 4096, "kv_block_size": 0}, "kv_block_size"),
        ({"max_cache_size": 1000, "kv_block_size": 1024}, "max_cache_size"),  # a block bigger than the store
        ({"max_cache_size": 4096, "kv_block_size": True}, "kv_block_size"),
    ],
)
def test_bad_dram_values(backend, config, field):
    with pytest.raises(UcmConfigError, match=field):
        create_store("UcmDram", config, backend)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"io_threads": 0}, "io_threads"),
        ({"checksum": "md5"}, "checksum"),
        ({"o_direct": "yes"}, "o_direct"),
        ({"max_storage_size": 100}, "max_storage_size"),
        ({"kv_block_size": 1000, "o_direct": True}, "o_direct"),
        ({"staging_bytes": 10}, "staging_bytes"),
    ],
)
def test_bad_nfs_values(backend, tmp_path, extra, field):
    config = {"storage_backends": str(tmp_path), "kv_block_size": 4096, **extra}
    with pytest.raises(UcmConfigError, match=field):
        create_store("UcmNfsStore", config, backend)


def test_missing_storage_dir_at_configuration(backend, tmp_path):
    with pytest.raises(UcmConfigError, match="storage_backends.*nope.*existing directories"):
        create_store("UcmNfsStore", {"storage_backends": [str(tmp_path), str(tmp_path / "nope")],
                                     "kv_block_size": 4096}, backend)
    with pytest.raises(UcmConfigError, match="storage_backends"):
        create_store("UcmNfsStore", {"storage_backends": [], "kv_block_size": 4096}, backend)


@pytest.mark.parametrize("paths", ["", [""], ["TMP", ""], "TMP/a\0b", ["TMP", "TMP\0"], [b"/tmp"]])
def test_nfs_paths_must_name_directories(backend, tmp_path, paths):
    # "" would be the current directory; a NUL byte used to escape as a raw ValueError
    def fill(path):
        return path.replace("TMP", str(tmp_path)) if isinstance(path, str) else path

    paths = [fill(p) for p in paths] if isinstance(paths, list) else fill(paths)
    with pytest.raises(UcmConfigError) as info:
        create_store("UcmNfsStore", {"storage_backends": paths, "kv_block_size": 4096}, backend)
    assert info.value.field == "ucm_connector_config.storage_backends" and "non-empty paths" in str(info.value)


@pytest.mark.parametrize("seconds", [0, -1, 59.5, float("nan"), float("inf"), "600", True])
def test_stale_temp_seconds_is_a_finite_number_of_at_least_a_minute(backend, tmp_path, seconds):
    # with 0, one engine's GC deleted the temporary files another engine was still writing
    config = {"storage_backends": str(tmp_path), "kv_block_size": 4096, "stale_temp_seconds": seconds}
    with pytest.raises(UcmConfigError) as info:
        create_store("UcmNfsStore", config, backend)
    assert info.value.field == "ucm_connector_config.stale_temp_seconds"
    assert "a finite number >= 60" in str(info.value) and "another engine" in str(info.value)
    assert NfsStore.check_values({**config, "stale_temp_seconds": 60})["stale_temp_seconds"] == 60.0


@pytest.mark.parametrize(
    ("extra", "field", "bound"),
    [
        ({"io_threads": 10**7}, "io_threads", "[1, 256]"),
        ({"staging_bytes": 2**50}, "staging_bytes", "4294967296"),
        ({"kv_block_size": 2**40}, "kv_block_size", "[1, 1073741824]"),  # was reported as staging_bytes
        ({"kv_block_size": 2**40, "staging_bytes": 1 << 20}, "kv_block_size", "[1, 1073741824]"),
    ],
)
def test_nfs_sizes_have_upper_bounds_and_errors_name_the_field_set(backend, tmp_path, extra, field, bound):
    config = {"storage_backends": str(tmp_path), "kv_block_size": 4096, **extra}
    with pytest.raises(UcmConfigError) as info:
        create_store("UcmNfsStore", config, backend)
    assert info.value.field == f"ucm_connector_config.{field}" and bound in str(info.value)


def test_nfs_default_staging_holds_a_large_block(tmp_path):
    # only an explicit staging_bytes smaller than a block is an error (checked without building the store)
    config = {"storage_backends": str(tmp_path), "kv_block_size": 100 << 20}
    assert NfsStore.check_values(config)["staging_bytes"] == 100 << 20
    with pytest.raises(UcmConfigError, match="staging_bytes=1048576: expected an int in \\[kv_block_size"):
        NfsStore.check_values({**config, "staging_bytes": 1 << 20})


def test_a_list_as_store_name_is_a_config_error(backend):
    with pytest.raises(UcmConfigError) as info:
        create_store(["UcmDram"], {"max_cache_size": 4096, "kv_block_size": 1024}, backend)
    assert info.value.field == "ucm_connector_name" and "'UcmDram'" in str(info.value)


@pytest.mark.parametrize(
    ("config", "field"),
    [({"max_cache_size": "1GB"}, "max_cache_size"), ({"max_cache_size": 4096, "transfer": ["dma"]}, "transfer"),
     ({"max_cache_size": 1000, "kv_block_size": 1024}, "max_cache_size")],
)
def test_dram_values_are_checked_without_building_the_store(config, field):
    # no pinned memory is allocated: the connector runs this before any engine starts
    with pytest.raises(UcmConfigError) as info:
        DramStore.check_values(config)
    assert info.value.field == f"ucm_connector_config.{field}"
    assert DramStore.check_values({"max_cache_size": 4096}) == {"max_cache_size": 4096, "transfer": "auto"}


@pytest.mark.parametrize("size", ["5GB", "5368709120", 5.0, 5e9, True, None, [5]])
def test_a_size_that_is_not_a_plain_int_is_one_clear_error(backend, size):
    with pytest.raises(UcmConfigError, match=r"ucm_connector_config\.max_cache_size=.*a plain integer") as info:
        create_store("UcmDram", {"max_cache_size": size, "kv_block_size": 1024}, backend)
    assert info.value.field == "ucm_connector_config.max_cache_size" and info.value.value == size
    with pytest.raises(UcmConfigError, match="a plain integer"):  # also before kv_block_size is known
        check_config(DramStore, {"max_cache_size": size})


def test_numpy_ints_are_ints(backend):
    config = {"max_cache_size": np.int64(4096), "kv_block_size": np.int32(1024)}
    with create_store("UcmDram", config, backend) as store:
        assert store.capacity_blocks == 4 and type(store.kv_block_size) is int


@pytest.mark.parametrize("value", ["600", True, float("nan"), -1.0])
def test_bad_numbers_name_the_field(backend, tmp_path, value):
    config = {"storage_backends": str(tmp_path), "kv_block_size": 4096, "stale_temp_seconds": value}
    with pytest.raises(UcmConfigError, match=r"ucm_connector_config\.stale_temp_seconds"):
        create_store("UcmNfsStore", config, backend)
