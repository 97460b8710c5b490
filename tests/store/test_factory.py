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
