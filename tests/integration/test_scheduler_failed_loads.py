"""The connector's scheduler half passes its workers' failed loads to its lookup-only instance of a shared store,
which checks them again: a corrupt block is no longer offered as a prefix hit (in-process, no engine)."""

from __future__ import annotations

import time
import types
from pathlib import Path

import torch

from ucm.device import get_backend
from ucm.integration.vllm.config import ConnectorConfig, ModelBlockShape
from ucm.integration.vllm.metadata import UcmWorkerMetadata
from ucm.integration.vllm.scheduler_side import ConnectorScheduler
from ucm.store import BlockPages, block_ids_for_tokens, create_store
from ucm.store.blockfile import HEADER_SIZE


def test_a_corrupt_block_a_worker_failed_to_load_is_not_offered_again(tmp_path):
    block = ModelBlockShape(block_size=4, num_layers=2, page_bytes=256, dtype="bfloat16")
    extra = {"ucm_connector_name": "UcmNfsStore",
             "ucm_connector_config": {"storage_backends": str(tmp_path), "kv_block_size": block.bytes_per_block}}
    config = ConnectorConfig.parse(extra, block)
    ids = block_ids_for_tokens(list(range(8)), 4, "test")
    pages = torch.randint(0, 255, (2, block.bytes_per_block), dtype=torch.uint8)
    with create_store("UcmNfsStore", config.store_config, get_backend("cpu")) as worker:
        worker.dump(ids, BlockPages(pages, torch.arange(2))).wait()
    path = next(tmp_path.rglob(f"{ids[0]}.kv"))
    with open(path, "r+b") as f:  # one payload byte flipped
        f.seek(HEADER_SIZE + 3)
        byte = f.read(1)[0]
        f.seek(HEADER_SIZE + 3)
        f.write(bytes([byte ^ 1]))
    scheduler = ConnectorScheduler(config, block.block_size)
    try:
        assert scheduler.store.lookup(ids) == [True, True]
        output = types.SimpleNamespace(kv_connector_worker_meta=UcmWorkerMetadata(missing_ids={0: ids[:1]}))
        scheduler.update_connector_output(output)  # returns at once: the check runs on the store's I/O thread
        deadline = time.monotonic() + 20
        while scheduler.store.lookup(ids) != [False, True]:
            assert time.monotonic() < deadline, scheduler.store.lookup(ids)
            time.sleep(0.02)
        assert not Path(path).exists()
    finally:
        scheduler.store.close()
