"""KV stores: where dumped KV blocks live between prefill, decode and later requests.

`create_store(name, config, backend)` builds one; `ucm.store.base` is the contract (read it first),
`ucm.store.naming` names blocks, `ucm.store.dram` / `ucm.store.nfs` are the implementations.
"""

from ucm.store.base import BlockPages, KVStoreBase, StoreStats, StoreTask
from ucm.store.errors import (
    StoreClosedError,
    StoreDumpError,
    StoreError,
    StoreLoadError,
    StoreTransferError,
)
from ucm.store.factory import create_store, register_store, registered_stores, store_class
from ucm.store.naming import block_ids_for_tokens, is_block_id, make_namespace

__all__ = [
    "BlockPages",
    "KVStoreBase",
    "StoreClosedError",
    "StoreDumpError",
    "StoreError",
    "StoreLoadError",
    "StoreStats",
    "StoreTask",
    "StoreTransferError",
    "block_ids_for_tokens",
    "create_store",
    "is_block_id",
    "make_namespace",
    "register_store",
    "registered_stores",
    "store_class",
]
