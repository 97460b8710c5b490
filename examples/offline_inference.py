"""Offline inference with UCM: the KV cache offloaded to a store and ESA sparse attention in decode.

    python examples/offline_inference.py                      # SmolLM2-135M-Instruct on vLLM-CPU (converted once)
    python examples/offline_inference.py --model /path/to/hf  # any local HF model, e.g. on a GPU machine
    python examples/offline_inference.py --no-sparse          # the connector alone (prefix reuse from UcmDram)

The prompt is a long haystack with one pass key in it; the model is asked for the key. The script prints the
answer, the time (and vLLM's time to first token) and the connector's summary per request (prompt blocks found in
the store, loaded, saved; ESA's share of the KV blocks dense attention would read), and vLLM logs the connector's
interval stats ("KV Transfer metrics: ...") after each run. The same configuration runs unchanged on vLLM for GPUs.
"""

from __future__ import annotations

import argparse
import os
import random
import time


def kv_transfer_config(store_bytes: int, sparse: bool, ratio: float) -> dict:
    extra = {
        "ucm_connector_name": "UcmDram",
        "ucm_connector_config": {"max_cache_size": store_bytes},  # kv_block_size: derived from the model
    }
    if sparse:
        extra["ucm_sparse_method"] = "ESA"
        extra["ucm_sparse_config"] = {
            "ESA": {"init_window_sz": 1, "local_window_sz": 2, "min_blocks": 4, "sparse_ratio": ratio,
                    "retrieval_stride": 10}
        }
    return {
        "kv_connector": "UnifiedCacheConnectorV1",
        "kv_connector_module_path": "ucm.integration.vllm.uc_connector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
    }


def long_prompt(tokenizer, num_tokens: int, seed: int) -> tuple[str, str]:
    """A pass-key question buried in ~num_tokens of filler (chat template applied)."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    per = len(tokenizer.encode(filler))
    lines = [filler] * max(1, num_tokens // per)
    lines.insert(rng.randint(len(lines) // 4, 3 * len(lines) // 4), f"The pass key is {key}. Remember it. ")
    question = "".join(lines) + "\nWhat is the pass key? Answer with the number only."
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model folder or name (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt-tokens", type=int, default=3000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--sparse-ratio", type=float, default=0.2)
    parser.add_argument("--no-sparse", action="store_true", help="dense attention (the connector alone)")
    parser.add_argument("--store-bytes", type=int, default=1 << 30, help="UcmDram capacity (pinned host bytes)")
    parser.add_argument("--kv-cache-bytes", type=int, default=512 << 20, help="vLLM KV cache size")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    model = args.model
    if model is None:
        from ucm.eval.models import ensure_smollm2

        model = ensure_smollm2()
    started = time.perf_counter()
    llm = LLM(
        model=model,
        max_model_len=8192,
        kv_cache_memory_bytes=args.kv_cache_bytes,
        enforce_eager=True,
        kv_transfer_config=KVTransferConfig(**kv_transfer_config(args.store_bytes, not args.no_sparse,
                                                                 args.sparse_ratio)),
        disable_log_stats=False,  # vLLM logs the connector's "KV Transfer metrics" line
    )
    print(f"engine ready in {time.perf_counter() - started:.1f} s (model {model})")
    prompt, key = long_prompt(llm.get_tokenizer(), args.prompt_tokens, seed=7)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    runs = []
    for attempt in ("first run", "second run (prompt blocks reused from the store)"):
        llm.reset_prefix_cache()  # so the second run's hits come from the UCM store, not vLLM's own cache
        started = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        seconds = time.perf_counter() - started
        answer = out.outputs[0].text.strip()
        stats = (out.kv_transfer_params or {}).get("ucm", {})
        ttft = getattr(getattr(out, "metrics", None), "first_token_latency", None)  # vLLM's, with stats logging on
        ttft_text = f", first token after {ttft:.2f} s" if ttft else ""
        print(f"\n== {attempt}: {seconds:.2f} s{ttft_text}, {len(out.prompt_token_ids)} prompt tokens")
        print(f"answer: {answer!r} (pass key {key}: {'found' if key in answer else 'missed'})")
        print(
            "connector: {hit} of {blocks} full prompt blocks found in the store, {loaded} loaded, {failed} failed, "
            "{saved} saved".format(
                hit=stats.get("hit_blocks", 0),
                blocks=len(out.prompt_token_ids) // max(1, stats.get("block_size", 1)),
                loaded=stats.get("loaded_blocks", 0),
                failed=stats.get("load_failed_blocks", 0),
                saved=stats.get("saved_blocks_planned", 0),
            )
        )
        sparse = stats.get("sparse")
        if sparse:
            print(f"ESA: decode attended {sparse['resident_share']:.0%} of the KV blocks dense attention reads "
                  f"({sparse['resident_blocks']} of {sparse['full_blocks']} blocks per step over {sparse['steps']} "
                  f"decode steps, {sparse['engine'].get('blocks_loaded', 0)} block loads from the store)")
        runs.append((seconds, ttft, stats))
        # vLLM logs its interval stats (the connector's "KV Transfer metrics" line among them) every
        # VLLM_LOG_STATS_INTERVAL seconds while requests run; log this run's now
        llm.llm_engine.do_log_stats()
    (first_s, first_ttft, _), (second_s, second_ttft, second) = runs
    ttfts = f", first token {first_ttft:.2f} s -> {second_ttft:.2f} s" if first_ttft and second_ttft else ""
    sparse = second.get("sparse")
    print(f"\n== what the connector did: the second run took {second_s:.2f} s instead of {first_s:.2f} s{ttfts}; "
          f"{second.get('loaded_blocks', 0)} prompt blocks were loaded from the store instead of computed"
          + (f"; ESA attended {sparse['resident_share']:.0%} of the KV blocks in decode" if sparse else ""))


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process on CPU: quicker start
    main()
