"""Drives vLLM's own `AsyncScheduler` with the connector's scheduler half through a failed prefix load, in a
fresh process of one vLLM release line (``python async_scheduling_job.py true|false``; prints one line
``UCM_JOB_RESULT <json>``).

vLLM-CPU turns asynchronous scheduling off and its model runner cannot run it, so no CPU engine reaches this
case; on a GPU it is vLLM's default. Here the real scheduler, KV cache manager and connector run, and the worker
is played by this script: every step's output samples a fresh token id per scheduled request, and the output of
the step whose metadata carries the loads reports one of those blocks failed (with asynchronous loads, also the
request's loads as ended: what `ConnectorWorker` reports in the same case). As the engine does with
asynchronous scheduling, each step is scheduled before the previous step's output is processed.
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
from pathlib import Path

RESULT_TAG = "UCM_JOB_RESULT "
BLOCK = 16
PROMPT = [(i * 7 + 3) % 1900 + 3 for i in range(100)]  # 6 full blocks are loadable, 4 tokens computed
FAILED_POSITION = 2
MAX_TOKENS = 6
NAMESPACE = "async-scheduling-job"


def main(async_load: str) -> None:
    import torch
    from vllm import SamplingParams
    from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
    from vllm.v1.request import Request
    from vllm.v1.structured_output import StructuredOutputManager

    from ucm.device import get_backend
    from ucm.eval.models import make_tiny_llama
    from ucm.integration.vllm.metadata import UcmHandshake
    from ucm.store import BlockPages, block_ids_for_tokens, create_store

    tmp = Path(tempfile.mkdtemp())
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    layers = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    row = len(layers) * spec.page_size_bytes
    store_config = {"storage_backends": str(tmp / "store"), "kv_block_size": row}
    (tmp / "store").mkdir()
    ids = block_ids_for_tokens(PROMPT, BLOCK, NAMESPACE)
    with create_store("UcmNfsStore", store_config, get_backend("cpu")) as store:  # the prompt's blocks, stored
        store.dump(ids, BlockPages(torch.zeros(len(ids), row, dtype=torch.uint8), torch.arange(len(ids)))).wait()
    extra = {"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": str(tmp / "store")},
             "ucm_async_load": json.loads(async_load) if async_load != "auto" else "auto"}
    vllm_config = VllmConfig(
        model_config=ModelConfig(model=make_tiny_llama(tmp / "tiny-llama"), skip_tokenizer_init=True,
                                 max_model_len=1024),
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=False),
        scheduler_config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=1024, max_model_len=1024,
                                         is_encoder_decoder=False),
        kv_transfer_config=KVTransferConfig(kv_connector="UnifiedCacheConnectorV1", kv_role="kv_both",
                                            kv_connector_module_path="ucm.integration.vllm.uc_connector",
                                            kv_connector_extra_config=extra),
        device_config=DeviceConfig("cpu"),
    )
    vllm_config.scheduler_config.async_scheduling = True  # vLLM-CPU's platform turned it off
    vllm_config.cache_config.num_gpu_blocks = 64
    kv_cache_config = KVCacheConfig(num_blocks=64, kv_cache_tensors=[],
                                    kv_cache_groups=[KVCacheGroupSpec(layers, spec)])
    scheduler = AsyncScheduler(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                               structured_output_manager=StructuredOutputManager(vllm_config), block_size=BLOCK)
    scheduler.connector.set_xfer_handshake_metadata({0: UcmHandshake(NAMESPACE, row)})
    request = Request("r", PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), None)
    scheduler.add_request(request)

    frames: list[dict] = []  # one per step: tokens it computed for the request, the token it sampled
    failed_block = None

    def worker(output) -> ModelRunnerOutput:
        nonlocal failed_block
        req_ids = list(output.num_scheduled_tokens)
        sampled = {r: 1000 + len(frames) for r in req_ids}
        frames.append({"scheduled": output.num_scheduled_tokens.get("r", 0), "token": sampled.get("r")})
        invalid, received = set(), set()
        for transfer in output.kv_connector_metadata.loads:
            failed_block = transfer.block_ids[FAILED_POSITION]
            invalid.add(failed_block)
            if scheduler.connector.config.async_load:
                received.add(transfer.req_id)
        return ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[[sampled[r]] for r in req_ids],
            kv_connector_output=KVConnectorOutput(finished_recving=received or None, invalid_block_ids=invalid),
        )

    in_flight: collections.deque = collections.deque()
    for _ in range(40):
        if request.is_finished() and not in_flight:
            break
        if not request.is_finished():
            output = scheduler.schedule()
            in_flight.append((output, worker(output)))
        if len(in_flight) == 2 or request.is_finished():  # one step ahead, as the engine's batch queue
            output, runner_output = in_flight.popleft()
            scheduler.update_from_output(output, runner_output)
    print(RESULT_TAG + json.dumps({
        "async_load": scheduler.connector.config.async_load,
        "failed_block": failed_block,
        "frames": frames,
        "output_tokens": list(request.output_token_ids),
        "finished": request.is_finished(),
    }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
