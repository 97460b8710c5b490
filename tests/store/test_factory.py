"""`create_store`: names map to classes; unknown names and fields raise one UcmConfigError listing what is
accepted; bad values name the field."""

from __future__ import annotations

import pytest

from ucm.errors import UcmConfigError
from ucm.store import create_store, registered_stores
from ucm.store.dram import DramStore
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
