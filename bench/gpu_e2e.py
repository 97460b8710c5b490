"""Decode speed in the real vLLM engine: ESA vs dense attention, Llama-3-8B shape, random weights.

Settings (one engine per setting and context length, each in its own subprocess so GPU memory is freed between
them; engines are reused across the batch sizes of one context):

- ``dense``: plain vLLM, no KV connector;
- ``dense-ucm``: ``UnifiedCacheConnectorV1`` with UcmDram and no sparse method (prefix reuse + dumps only);
- ``esa``: the connector with UcmDram (``--dram-gib``) and ESA (sparse_ratio 0.2, retrieval_stride 10,
  init_window_sz 1, local_window_sz 2, min_blocks 4);
- ``esa-static``: the same with one retrieval per request (its first decode step) and none after: the speed of
  the sparse attention and hooks alone, the reference that the time split of ``esa`` is read against.

The ESA rows carry the connector's sparse counters of the longest request (``sparse``: engine-wide while it ran:
decode steps, retrievals, blocks loaded from the store per layer, host ms in the hooks and waiting for loads) and
their per-step means (``split``), the first decode step's full initial load included.

Cases (``--cases``): ``<context>x<batch>`` (``32Kx1``, ``32Kx8``, ``128Kx1``, ``128Kx4`` by default) and
``capacity``: as many ``--capacity-context`` requests as the setting holds (dense settings: the KV capacity that
the engine reports, num_gpu_blocks x block_size; esa: ``--esa-capacity-batch``, by default what UcmDram holds,
since every prompt block stays in host memory for the sparse loads).

Every case runs ``--reps`` times (default 2) in one engine with vLLM's prefix cache reset before each repetition;
the last repetition is reported (with the connector its prompt blocks come from UcmDram; prefill is outside the
decode window anyway). ``LLMEngine.step()`` is driven by hand and every step that returns tokens is timestamped:

- ``ttft_s``: from adding the requests until every request has its first token;
- steady decode window: from ``--warmup-steps`` steps after that point to the step in which the first request
  finishes (all requests decode in every step of the window); ``decode_tok_s`` = tokens in the window / its
  time, ``tpot_ms_median`` / ``tpot_ms_p90`` = step intervals in the window;
- ``resident_share``: mean over the requests of ``kv_transfer_params["ucm"]["sparse"]["resident_share"]`` (the
  connector's own summary, the request's own decode steps), None without a sparse method.

With batch > 1, prefill is chunked over several steps; the output length is ``--max-tokens`` plus the number of
steps the prefill needs (about batch x context / max_num_batched_tokens), so that the window is
``--max-tokens``-ish steps long. Random prompt token ids (seeded per case), greedy, ``ignore_eos``.

Results: ``--out`` (JSON, rewritten after every case), the same name with ``.md`` (table with ESA/dense ratios)
and ``.png`` (tok/s vs context, when matplotlib is importable); `bench/gpu_e2e_summary.py` makes the report of every
case's current standing, ``bench/results/gpu_e2e.{json,md,png}``, from such files. ``--time-budget-s`` stops
cleanly before a limit (no engine or case is started that cannot finish in time; a running one is killed at the
deadline).

UcmDram must hold every prompt block of a case (Llama-3-8B: 128 KiB per token, 4 GiB per 32K request, 64 GiB
for 128K x 4): ``--dram-gib`` (default 40 GiB) bounds the esa capacity case at 9 requests of 32K, fewer than
dense holds in HBM (~26); on this host the capacity comparison is DRAM-bound. On the GPU machines (128 GiB of host
memory) one pinned buffer of 66 or 80 GiB failed at engine start (torch rounds pinned allocations up to a power of
two: 128 GiB); UcmDram now pins its arena in power-of-two chunks, so 128K x 4 needs ``--dram-gib`` ~70.

On the H200 (vLLM 0.26, CUDA graphs on, FA3). The default cases and settings take roughly 15-20 min (6 engine
starts; every case is prefilled twice, 32K x ~26 and 128K x 4 take ~30-40 s per repetition). In one go, or, under
a 10-minute limit per command, one context per command (``--merge`` keeps the rows of the other)::

    VLLM_USE_FLASHINFER_SAMPLER=0 python bench/gpu_e2e.py --out bench/results/gpu_runs/e2e.json --time-budget-s 1700
    VLLM_USE_FLASHINFER_SAMPLER=0 python bench/gpu_e2e.py --cases 32Kx1,32Kx8,capacity --time-budget-s 560
    VLLM_USE_FLASHINFER_SAMPLER=0 python bench/gpu_e2e.py --cases 128Kx1,128Kx4 --merge --time-budget-s 560

CPU smoke test (tiny random Llama from ``ucm.eval.models.make_tiny_llama``, ~1200-token prompts, batch 1 and 2,
enforce_eager, block 32, engines in-process, OpenMP threads pinned)::

    .venv/bin/python bench/gpu_e2e.py --smoke --out /tmp/gpu_e2e_smoke.json

Exit code 0 when every engine started (a case can still report an error; an engine stopped at the time budget
is not an error), 3 when an engine failed to start or died, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import os
import platform
import queue
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

CONNECTOR = "UnifiedCacheConnectorV1"
MODULE = "ucm.integration.vllm.uc_connector"
ERROR_LINE = re.compile(r"\b[A-Z]\w*(Error|Exception): ")
ROW_TAG = "GPU_E2E_ROW "
ENGINE_TAG = "GPU_E2E_ENGINE "
SETTINGS = ("dense", "dense-ucm", "esa", "esa-static", "dense-v1pw", "esa-full", "esa-repr", "esa-noahead",
            "esa-ahead")
#: dense-v1pw: plain vLLM on the V1 model runner with piecewise CUDA graphs only (what a sparse engine runs on by
#: default), to tell what the sparse hooks cost from what that configuration costs; esa-full: ESA with
#: ucm_sparse_full_graphs (steady steps as full CUDA graphs, the retrieval steps piecewise) and ESA's other defaults
#: (initial_selection "attention" from 2026-12-06 on; earlier rows: "representations"); esa-repr: esa-full with
#: initial_selection "representations" (each request's first selection by the block representations); esa-noahead /
#: esa-ahead: esa-full with prefetch_ratio 0 / --ahead-ratio (every new block loaded at the consume step / the first
#: ones loaded ahead into spare slots during the stride). ESA's default is 0.4 since the runs of 2026-12-06's
#: seventh session (0 before them; esa-full rows of commits 8245441 and e1fcb3f ran with 0.25, the default then)
V1_PIECEWISE_ENV = {"VLLM_USE_V2_MODEL_RUNNER": "0"}
STATIC_STRIDE = 1 << 30  # esa-static: no retrieval after the first decode step within any run
ESA_CONFIG = {"sparse_ratio": 0.2, "retrieval_stride": 10, "init_window_sz": 1, "local_window_sz": 2, "min_blocks": 4}
DEFAULT_CASES = "32Kx1,32Kx8,128Kx1,128Kx4,capacity"
SMOKE_CASES = "1200x1,1200x2,capacity"
# Llama-3-8B shape; max_position_embeddings leaves room for 128K prompts plus their output tokens
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072 + 8192,
    "rope_theta": 500000.0,  # transformers < 5 reads this key, >= 5 reads rope_parameters
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "dtype": "bfloat16",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
# make_tiny_llama defaults (2 layers, 2 KV heads, head dim 64, bf16, vocab 2048, 8192 positions)
TINY = {"num_hidden_layers": 2, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 2048,
        "max_position_embeddings": 8192}


def log(msg: str) -> None:
    print(f"[gpu_e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_context(text: str) -> int:
    text = text.strip().upper()
    if text.endswith("K"):
        return int(float(text[:-1]) * 1024)
    return int(text)


def parse_case(text: str) -> dict:
    text = text.strip()
    if text.lower() == "capacity":
        return {"name": "capacity"}
    try:
        ctx, batch = text.lower().split("x")
        return {"name": text, "context": parse_context(ctx), "batch": int(batch)}
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad case {text!r}: expected <context>x<batch> or 'capacity'") from exc


def extra_tokens(batch: int, context: int, mnbt: int) -> int:
    """Output tokens added so that every request is decoding before the first one finishes (chunked prefill)."""
    if batch <= 1:
        return 0
    return int(math.ceil(1.5 * batch * context / max(1, mnbt - batch))) + 8


def kv_bytes_per_token(model: dict) -> int:
    """Bytes of K and V of all layers for one token (bf16)."""
    return model["num_hidden_layers"] * 2 * model["num_key_value_heads"] * model["head_dim"] * 2


# ============================================================================ worker (one engine, one subprocess)
def make_prompts(tag: str, context: int, batch: int, vocab: int, seed: int) -> list[list[int]]:
    out = []
    for i in range(batch):
        rng = random.Random(f"{seed}-{tag}-{context}-{i}")
        out.append([rng.randrange(10, vocab - 10) for _ in range(context)])
    return out


def run_requests(engine, prompts: list[list[int]], max_tokens: int, tag: str, profiler=None) -> dict:
    """Add all requests at once and step the engine by hand until they finish; timestamps per token step.
    ``profiler`` (a cProfile.Profile): on from the step after every request has its first token to the end, so
    it sees decode steps only (the prefill's prefix loads would blur the per-step costs)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    index: dict[str, int] = {}
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        name = f"{tag}-{i}"
        rid = engine.add_request(name, TokensPrompt(prompt_token_ids=prompt), params)
        index[name] = i
        if isinstance(rid, str):
            index[rid] = i  # vLLM may know the request under an internal id
    n = len(prompts)
    counts, first, finished = [0] * n, [None] * n, [None] * n
    summaries: list[dict | None] = [None] * n
    steps: list[tuple[float, int]] = []  # (time the step returned, new tokens), steps that returned tokens only
    profiled_steps = None
    while engine.has_unfinished_requests():
        if profiler is not None and profiled_steps is None and all(f is not None for f in first):
            profiler.enable()
            profiled_steps = 0
        outs = engine.step()
        now = time.perf_counter()
        if profiled_steps is not None:
            profiled_steps += 1
        new, firsts, finishes = 0, [], []
        for out in outs:
            i = index.get(out.request_id)
            if i is None:
                continue
            count = len(out.outputs[0].token_ids)
            if count > counts[i]:
                new += count - counts[i]
                counts[i] = count
                if first[i] is None:
                    firsts.append(i)
            if out.finished and finished[i] is None:
                finishes.append(i)
                summaries[i] = (out.kv_transfer_params or {}).get("ucm")
        if new or finishes:
            k = len(steps)
            steps.append((now, new))
            for i in firsts:
                first[i] = k
            for i in finishes:
                finished[i] = k
    if profiled_steps is not None:
        profiler.disable()
    return {"t0": t0, "steps": steps, "first": first, "finished": finished, "counts": counts,
            "summaries": summaries, "wall_s": time.perf_counter() - t0, "profiled_steps": profiled_steps}


def triton_cache_entries() -> int:
    """Kernels in Triton's on-disk cache (shared by the engine's processes): one entry per compiled variant."""
    root = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    with contextlib.suppress(OSError):
        return sum(1 for _ in root.iterdir())
    return 0


def summarize(run: dict, warmup: int, max_tokens: int) -> dict:
    steps, first, finished = run["steps"], run["first"], run["finished"]
    res: dict = {"complete": all(c == max_tokens for c in run["counts"]), "wall_s": round(run["wall_s"], 2)}
    summaries = [s for s in run["summaries"] if s]
    shares = [s["sparse"]["resident_share"] for s in summaries if s.get("sparse")]
    res["resident_share"] = round(sum(shares) / len(shares), 4) if shares else None
    res["resident_share_max"] = round(max(shares), 4) if shares else None
    for key in ("hit_blocks", "loaded_blocks", "load_failed_blocks"):
        res[key] = sum(s.get(key, 0) for s in summaries) if summaries else None
    sparse = [s["sparse"] for s in summaries if s.get("sparse")]
    if sparse:
        longest = max(sparse, key=lambda c: c.get("steps", 0))
        res["sparse"] = longest
        engine = longest.get("engine", {})  # the engine's counters while that request ran
        steps_n = engine.get("steps") or 0
        if steps_n:
            res["split"] = {
                "host_ms_per_step": round(engine.get("host_ms", 0) / steps_n, 3),
                "load_wait_ms_per_step": round(engine.get("load_wait_ms", 0) / steps_n, 3),
                # of the host time, after the step's forward was queued (loads ahead, end-of-step selections)
                "end_ms_per_step": round(engine.get("end_ms", 0) / steps_n, 3),
                "layer_blocks_loaded_per_step": round(engine.get("blocks_loaded", 0) / steps_n, 1),
                "layer_blocks_prefetched_per_step": round(engine.get("blocks_prefetched", 0) / steps_n, 1),
                # loads ahead queued held, and those released by the hold's timeout (not by the next step)
                "ahead_held": engine.get("ahead_held", 0),
                "ahead_released_late": engine.get("ahead_released_late", 0),
                "retrievals_per_step": round(engine.get("retrievals", 0) / steps_n, 2),
                "view_step_share": round(engine.get("view_steps", 0) / steps_n, 3),
            }
    if not steps or None in first or None in finished:
        return dict(res, decode_tok_s=None, tpot_ms_median=None, tpot_ms_p90=None, ttft_s=None, steady_steps=0,
                    note="a request returned no token")
    all_first, end = max(first), min(finished)
    res["ttft_s"] = round(steps[all_first][0] - run["t0"], 3)
    start = all_first + warmup
    note = None
    if end - start < 3:
        start, note = all_first, "steady window shorter than the warm-up: warm-up steps not excluded"
    if end - start < 1:
        return dict(res, decode_tok_s=None, tpot_ms_median=None, tpot_ms_p90=None, steady_steps=0,
                    note="no step in which every request decodes: raise --max-tokens")
    dt = steps[end][0] - steps[start][0]
    tokens = sum(n for _, n in steps[start + 1 : end + 1])
    timeline = [steps[i][0] - steps[i - 1][0] for i in range(start + 1, end + 1)]
    gaps = sorted(timeline)
    # where the window's time goes: its slowest step intervals (position in the window, ms) and its time per tenth,
    # which tell a stall (one slow stretch, e.g. work left from the prefill) from a uniformly slower step
    slowest = sorted(range(len(timeline)), key=timeline.__getitem__, reverse=True)[:5]
    tenths = [round(1e3 * sum(timeline[i * len(timeline) // 10 : (i + 1) * len(timeline) // 10]), 1)
              for i in range(10)] if len(timeline) >= 10 else None
    res.update(
        decode_tok_s=round(tokens / dt, 2),
        tpot_ms_median=round(1e3 * statistics.median(gaps), 3),
        tpot_ms_p90=round(1e3 * gaps[max(0, math.ceil(0.9 * len(gaps)) - 1)], 3),
        steady_steps=end - start,
        slowest_steps_ms=[[i, round(1e3 * timeline[i], 2)] for i in sorted(slowest)],
        window_ms_per_tenth=tenths,
    )
    if note:
        res["note"] = note
    return res


def profile_text(profiler, out_dir: str, name: str, steps: int | None = None) -> str:
    """The host profile of one repetition's decode steps: written in full under ``out_dir``, the top entries
    returned (the first line says over how many engine steps)."""
    import io
    import pstats

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    profiler.dump_stats(str(Path(out_dir) / f"{name}.prof"))
    text = io.StringIO()
    text.write(f"decode engine steps profiled: {steps}\n")
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(45)
    (Path(out_dir) / f"{name}.txt").write_text(text.getvalue())
    return text.getvalue()[-6000:]


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - informational only
        pass
    model = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"cpu: {model} ({len(os.sched_getaffinity(0))} cores usable)"


def emit(tag: str, obj: dict) -> None:
    print(tag + json.dumps(obj), flush=True)


def worker_main(spec: dict) -> int:
    import vllm
    from vllm import LLM
    from vllm.config import KVTransferConfig

    setting, context = spec["setting"], spec["context"]
    kwargs = dict(spec["engine_kwargs"])
    if spec["extra_config"] is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector=CONNECTOR, kv_connector_module_path=MODULE, kv_role="kv_both",
            kv_connector_extra_config=spec["extra_config"],
        )
    started = time.perf_counter()
    try:
        llm = LLM(**kwargs)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which records it
        traceback.print_exc()
        emit(ENGINE_TAG, {"start_error": f"{type(exc).__name__}: {exc}"[-2000:]})
        return 3
    engine = llm.llm_engine
    start_s = time.perf_counter() - started
    cache = getattr(getattr(engine, "vllm_config", None), "cache_config", None) or getattr(engine, "cache_config", None)
    num_blocks = getattr(cache, "num_gpu_blocks", None)
    block_size = getattr(cache, "block_size", None)
    info = {"engine_start_s": round(start_s, 1), "num_gpu_blocks": num_blocks, "block_size": block_size,
            "kv_capacity_tokens": (num_blocks - 1) * block_size if num_blocks and block_size else None,
            "vllm": vllm.__version__, "gpu": device_name()}
    emit(ENGINE_TAG, info)
    log(f"{setting} @ {context}: engine up in {start_s:.1f} s, {info}")

    mnbt = kwargs["max_num_batched_tokens"]
    for case in spec["cases"]:
        row = {"case": case["name"], "context": context, "setting": setting, "gpu": info["gpu"],
               "vllm": info["vllm"], "commit": spec["commit"], "num_gpu_blocks": num_blocks,
               "block_size": block_size, "kv_capacity_tokens": info["kv_capacity_tokens"],
               "engine_start_s": info["engine_start_s"]}
        if time.time() + spec["case_reserve_s"] > spec["deadline"]:
            emit(ROW_TAG, dict(row, batch=case.get("batch"), decode_tok_s=None, error="skipped: time budget"))
            continue
        try:
            batch = case.get("batch")
            if batch is None:  # capacity of a dense setting: what the engine's KV cache holds
                if not (num_blocks and block_size):
                    raise RuntimeError("cannot read num_gpu_blocks / block_size from the engine")
                usable = num_blocks - 1
                batch = max(1, usable // math.ceil((context + spec["max_tokens"]) / block_size))
                while batch > 1:
                    need = math.ceil((context + spec["max_tokens"] + extra_tokens(batch, context, mnbt)) / block_size)
                    if batch * need <= usable:
                        break
                    batch -= 1
            max_tokens = spec["max_tokens"] + extra_tokens(batch, context, mnbt)
            max_tokens = min(max_tokens, kwargs["max_model_len"] - context)
            row["batch"], row["max_tokens"] = batch, max_tokens
            if spec["dram_bytes"] and batch * context * spec["kv_bytes_per_token"] > spec["dram_bytes"]:
                row["dram_overcommit"] = True  # prompt blocks do not all fit UcmDram: some loads must fail
            prompts = make_prompts(case["name"], context, batch, spec["vocab"], spec["seed"])
            reps = []
            for rep in range(spec["reps"]):
                if hasattr(llm, "reset_prefix_cache"):
                    llm.reset_prefix_cache()
                profiler = None
                if spec.get("profile") and rep == spec["reps"] - 1:
                    import cProfile

                    profiler = cProfile.Profile()
                compiled = triton_cache_entries()
                run = run_requests(engine, prompts, max_tokens, f"{setting}-{case['name']}-r{rep}", profiler)
                reps.append(summarize(run, spec["warmup_steps"], max_tokens))
                # kernels compiled during the repetition (a first request of a new size may compile new variants)
                reps[-1]["triton_kernels_compiled"] = triton_cache_entries() - compiled
                if profiler is not None:
                    reps[-1]["profiled_decode_steps"] = run["profiled_steps"]
                    reps[-1]["profile"] = profile_text(profiler, spec["profile_out"], f"{setting}-{case['name']}",
                                                       run["profiled_steps"])
                log(f"{setting} {case['name']} (batch {batch}, {max_tokens} tokens) rep {rep}: {reps[-1]}")
            row.update(reps[-1])
            row["ttft_s_rep1"] = reps[0].get("ttft_s")
            row["decode_tok_s_reps"] = [r.get("decode_tok_s") for r in reps]
            row["triton_kernels_compiled_reps"] = [r.get("triton_kernels_compiled") for r in reps]
            row["host_ms_per_step_reps"] = [(r.get("split") or {}).get("host_ms_per_step") for r in reps]
            row["window_ms_per_tenth_reps"] = [r.get("window_ms_per_tenth") for r in reps]
            row["slowest_steps_ms_reps"] = [r.get("slowest_steps_ms") for r in reps]
        except Exception as exc:  # noqa: BLE001 - one failed case must not lose the others
            traceback.print_exc()
            row.setdefault("batch", case.get("batch"))
            row.update(decode_tok_s=None, error=f"{type(exc).__name__}: {exc}"[-1000:])
        emit(ROW_TAG, row)
    with contextlib.suppress(Exception):
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    return 0


# ============================================================================ parent (plan, subprocesses, output)
def git_commit(repo: Path) -> str:
    if os.environ.get("UCM_COMMIT"):
        return os.environ["UCM_COMMIT"]  # a copied tree (the GPU machine's) whose git metadata may be stale
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=20, env=env).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=60, env=env).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("UCM_COMMIT", "unknown")
    if not head:
        return os.environ.get("UCM_COMMIT", "unknown")
    return head + ("+dirty" if dirty else "")


def write_model(args: argparse.Namespace) -> tuple[str, dict]:
    root = Path(args.model_dir)
    root.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        from ucm.eval.models import make_tiny_llama

        return make_tiny_llama(root / "tiny-llama"), dict(TINY)
    (root / "config.json").write_text(json.dumps(LLAMA3_8B, indent=1))
    return str(root), dict(LLAMA3_8B)


def engine_kwargs(args: argparse.Namespace, model_path: str, max_model_len: int) -> dict:
    kw = {"model": model_path, "skip_tokenizer_init": True, "seed": 0, "max_model_len": max_model_len,
          "max_num_batched_tokens": args.max_num_batched_tokens, "dtype": "bfloat16"}
    if args.max_num_seqs:
        kw["max_num_seqs"] = args.max_num_seqs
    if args.block_size:
        kw["block_size"] = args.block_size
    if args.smoke:
        kw.update(enforce_eager=True, kv_cache_memory_bytes=args.kv_cache_bytes)
    else:
        kw.update(load_format="dummy", gpu_memory_utilization=args.gpu_memory_utilization)
        if args.capture_sizes:
            # the batch sizes the cases run at, for every setting alike: capturing vLLM's default ~50 sizes is
            # most of an engine's start, and decode at a captured size replays the same graph either way
            kw["compilation_config"] = {"cudagraph_capture_sizes": args.capture_sizes}
    return kw


def setting_kwargs(setting: str, kwargs: dict) -> dict:
    if setting != "dense-v1pw":
        return kwargs
    compilation = dict(kwargs.get("compilation_config") or {}, cudagraph_mode="PIECEWISE")
    return dict(kwargs, compilation_config=compilation)


def extra_config(setting: str, args: argparse.Namespace) -> dict | None:
    if setting in ("dense", "dense-v1pw"):
        return None
    extra = {"ucm_connector_name": "UcmDram", "ucm_connector_config": {"max_cache_size": args.dram_bytes}}
    if setting.startswith("esa"):
        esa = dict(ESA_CONFIG)
        if setting == "esa-static":
            esa["retrieval_stride"] = STATIC_STRIDE
        if setting in ("esa-full", "esa-repr", "esa-noahead", "esa-ahead"):
            extra["ucm_sparse_full_graphs"] = True
        if setting == "esa-repr":
            esa["initial_selection"] = "representations"
        if setting in ("esa-noahead", "esa-ahead"):
            esa["prefetch_ratio"] = 0.0 if setting == "esa-noahead" else args.ahead_ratio
        extra.update(ucm_sparse_method="ESA", ucm_sparse_config={"ESA": esa})
    return extra


def build_plan(args: argparse.Namespace, model: dict) -> list[dict]:
    """One job per (context, setting): contexts outer so that dense/esa pairs complete first under a budget."""
    by_context: dict[int, list[dict]] = {}
    for case in args.cases:
        ctx = case.get("context", args.capacity_context)
        by_context.setdefault(ctx, []).append(case)
    jobs = []
    for ctx, cases in by_context.items():
        for setting in args.settings:
            resolved = []
            for case in cases:
                c = dict(case)
                if c["name"] == "capacity" and setting.startswith("esa"):
                    c["batch"] = args.esa_capacity_batch
                elif c["name"] == "capacity" and args.dense_capacity_batch:
                    c["batch"] = args.dense_capacity_batch
                resolved.append(c)
            biggest = max([c.get("batch") or 64 for c in resolved])  # unknown dense capacity: room for 64
            max_model_len = ctx + args.max_tokens + extra_tokens(biggest, ctx, args.max_num_batched_tokens)
            jobs.append({"setting": setting, "context": ctx, "cases": resolved, "max_model_len": max_model_len})
    return jobs


class Results:
    def __init__(self, args: argparse.Namespace, meta: dict) -> None:
        self.out = Path(args.out)
        self.meta = meta
        self.rows: list[dict] = []
        if args.merge and self.out.exists():
            with contextlib.suppress(ValueError, KeyError):
                self.rows = json.loads(self.out.read_text())["rows"]

    def add(self, row: dict) -> None:
        key = (row["case"], row["setting"])
        if str(row.get("error", "")).startswith("skipped") and any(
                (r.get("case"), r.get("setting")) == key and r.get("decode_tok_s") for r in self.rows):
            return  # --merge: a case skipped now keeps its earlier measurement
        self.rows = [r for r in self.rows if (r.get("case"), r.get("setting")) != key]
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dict(self.meta, rows=self.rows), indent=1))
        os.replace(tmp, self.out)
        self.out.with_suffix(".md").write_text(markdown(self.meta, self.rows))
        with contextlib.suppress(Exception):
            plot(self.rows, self.out.with_suffix(".png"), self.meta)


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ratio(a: dict, b: dict) -> str:
    if a.get("decode_tok_s") and b.get("decode_tok_s"):
        return f"{a['decode_tok_s'] / b['decode_tok_s']:.2f}x"
    return "-"


def _tri(rs: list[dict], key: str, digits: int = 2) -> str:
    return " / ".join(_fmt(r.get(key), digits) for r in rs)


def _tok(r: dict) -> str:
    if r.get("error"):
        return f"error: {r['error'][:80]}"
    return _fmt(r.get("decode_tok_s"))


def host_speed() -> dict:
    """The host CPU and how fast it runs small Python and numpy work, as ESA's hooks do: the sparse steps are
    host-bound, so the same tree decodes at different rates on hosts of one GPU kind (three H100 leases at 32K x 8:
    engine start and hook time per step rose together); a run's rows compare with another's only beside these."""
    import numpy as np

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    started, total = time.perf_counter(), 0
    for i in range(1_000_000):
        total += i
    loop_ns = (time.perf_counter() - started) * 1e3
    rng = np.random.default_rng(0)
    selected, current = rng.integers(0, 2000, 409), rng.integers(0, 2000, 409)
    started = time.perf_counter()
    for _ in range(5000):  # a membership mask and a gather, the shape of ESA's per-layer delta
        held = np.zeros(2002, dtype=bool)
        held[current] = True
        selected[~held[selected]]
    numpy_us = (time.perf_counter() - started) / 5000 * 1e6
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python_loop_ns": round(loop_ns, 1),
            "numpy_delta_us": round(numpy_us, 2)}


def markdown(meta: dict, rows: list[dict]) -> str:
    cases: list[str] = []
    for r in rows:
        if r["case"] not in cases:
            cases.append(r["case"])
    get = {(r["case"], r["setting"]): r for r in rows}
    lines = [
        f"# vLLM decode speed: ESA vs dense ({meta.get('model_name')})",
        "",
        f"GPU: {meta.get('gpu')}; vLLM {meta.get('vllm')}; commit {meta.get('commit')}; {meta.get('engine')}.",
        *([f"Host: {host['cpu'] or 'CPU model unknown'}, {host['cores']} cores; a Python loop step "
           f"{host['python_loop_ns']} ns, an ESA-like numpy delta {host['numpy_delta_us']} us (ESA's steps are "
           "host-bound: compare rates across runs only beside these)."] if (host := meta.get("host")) else []),
        f"Command: `{meta.get('command')}`",
        "",
        "decode tok/s over the steady window (every request decoding, first "
        f"{meta.get('warmup_steps')} decode steps excluded), repetition {meta.get('reps')} of {meta.get('reps')} "
        "(prefix cache reset before each). TPOT = step interval in the window. TTFT = until every request has its "
        "first token. resident share = ESA's resident blocks / full blocks from the connector's summary.",
        "",
        "| case | context | batch (dense / dense-ucm / esa / esa-static / dense-v1pw / esa-full / esa-repr / "
        "esa-noahead / esa-ahead) | dense tok/s | dense-ucm tok/s | esa tok/s | esa-static tok/s | dense-v1pw tok/s | "
        "esa-full tok/s | esa-repr tok/s | esa-noahead tok/s | esa-ahead tok/s | **esa / dense** | "
        "esa-static / dense | dense-ucm / dense | esa-full / dense | esa-repr / dense | esa-noahead / dense | "
        "esa-ahead / dense | TPOT median ms (same order) | TPOT p90 ms | TTFT s | esa resident share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        rs = [get.get((case, s)) or {} for s in SETTINGS]
        d, u, e, st, v1, efull, erepr, enoahead, eahead = rs
        ctx = next((r.get("context") for r in rs if r.get("context")), None)
        lines.append(
            f"| {case} | {ctx} | {_tri(rs, 'batch')} | {_tok(d)} | {_tok(u)} | {_tok(e)} | {_tok(st)} | {_tok(v1)} | "
            f"{_tok(efull)} | {_tok(erepr)} | {_tok(enoahead)} | {_tok(eahead)} | **{_ratio(e, d)}** | "
            f"{_ratio(st, d)} | {_ratio(u, d)} | {_ratio(efull, d)} | {_ratio(erepr, d)} | {_ratio(enoahead, d)} | "
            f"{_ratio(eahead, d)} | "
            f"{_tri(rs, 'tpot_ms_median')} | {_tri(rs, 'tpot_ms_p90')} | {_tri(rs, 'ttft_s')} | "
            f"{_fmt(e.get('resident_share'), 3)} |"
        )
    split_rows = [r for r in rows if r.get("split")]
    if split_rows:
        model = meta.get("model") or {}
        layer_block = (2 * model.get("num_key_value_heads", 0) * model.get("head_dim", 0) * 2
                       * (split_rows[0].get("block_size") or 0))
        lines += [
            "",
            "ESA time split (means per decode step over each setting's longest request, its first decode step's "
            "initial load included; host = time in the sparse hooks, of which after the step's forward was queued "
            "(loads ahead, selections) and waiting for store loads; loaded = per-layer blocks from UcmDram over PCIe):",
            "",
            "| setting | case | decode steps | TPOT median ms | host ms / step | of which after the forward | "
            "load wait ms / step | retrievals / step | layer blocks loaded / step | of which ahead | "
            "MiB loaded / step | held loads ahead (released late) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in split_rows:
            sp = r["split"]
            mib = sp["layer_blocks_loaded_per_step"] * layer_block / (1 << 20)
            lines.append(
                f"| {r['setting']} | {r['case']} | {r['sparse'].get('steps')} | {_fmt(r.get('tpot_ms_median'), 2)} | "
                f"{sp['host_ms_per_step']:.2f} | {_fmt(sp.get('end_ms_per_step'), 2)} | "
                f"{sp['load_wait_ms_per_step']:.2f} | {sp['retrievals_per_step']:.1f} | "
                f"{sp['layer_blocks_loaded_per_step']:.0f} | {sp.get('layer_blocks_prefetched_per_step', 0):.0f} | "
                f"{mib:.1f} | {sp.get('ahead_held', '-')} ({sp.get('ahead_released_late', '-')}) |"
            )
    notes = [f"- {r['setting']} {r['case']}: {r['note']}" for r in rows if r.get("note")]
    notes += [f"- {r['setting']} {r['case']}: prompts exceed UcmDram ({meta.get('dram_gib')} GiB)" for r in rows
              if r.get("dram_overcommit")]
    notes += [f"- {r['setting']} {r['case']}: not every request reached its max_tokens" for r in rows
              if r.get("complete") is False]
    notes += [f"- engine {e}" for e in meta.get("engine_errors", [])]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"dense": ("tab:blue", "o"), "dense-ucm": ("tab:green", "s"), "esa": ("tab:red", "^"),
              "esa-static": ("tab:orange", "v"), "dense-v1pw": ("tab:purple", "d"), "esa-full": ("tab:brown", "x"),
              "esa-repr": ("tab:pink", "P"), "esa-noahead": ("tab:gray", "*"), "esa-ahead": ("tab:olive", "h")}
    for setting in SETTINGS:
        for kind, dash in (("batch 1", "-"), ("multi", "--"), ("capacity", ":")):
            pts = []
            for r in rows:
                if r["setting"] != setting or not r.get("decode_tok_s"):
                    continue
                k = "capacity" if r["case"] == "capacity" else ("batch 1" if r.get("batch") == 1 else "multi")
                if k == kind:
                    pts.append((r["context"], r["decode_tok_s"], r.get("batch")))
            if not pts:
                continue
            pts.sort()
            color, marker = styles[setting]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], dash, color=color, marker=marker,
                    label=f"{setting}, {kind}")
            for x, y, b in pts:
                ax.annotate(f"b{b}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s (steady window)")
    ax.set_title(f"ESA vs dense decode, {meta.get('model_name')}\n{meta.get('gpu')}, vLLM {meta.get('vllm')}",
                 fontsize=8)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_job(job: dict, args: argparse.Namespace, deadline: float, env: dict, tmp: Path) -> tuple[list[dict], dict]:
    """Run one engine subprocess, recording its rows as they come. Returns (rows, engine info or error)."""
    spec_path = tmp / f"job-{job['setting']}-{job['context']}.json"
    spec_path.write_text(json.dumps(job))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(spec_path)]
    env = dict(env, **job.get("env", {}))
    if job.get("profile"):
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, where cProfile sees it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, bufsize=1)
    lines: queue.Queue = queue.Queue()

    def reader() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    rows: list[dict] = []
    info: dict = {}
    tail: list[str] = []
    causes: list[str] = []  # "XxxError: ..." lines: in multiprocess mode the root cause is only in the log
    killed = False
    while True:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            if time.time() > deadline and not killed:
                log(f"time budget reached: stopping {job['setting']} @ {job['context']}")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                killed = True
            continue
        if line is None:
            break
        sys.stdout.write(line)
        sys.stdout.flush()
        if ERROR_LINE.search(line) and len(causes) < 50:
            causes.append(line.strip()[-400:])
        tail = (tail + [line])[-40:]
        if line.startswith(ROW_TAG):
            row = json.loads(line[len(ROW_TAG):])
            rows.append(row)
            yield_row(row)
        elif line.startswith(ENGINE_TAG):
            info = json.loads(line[len(ENGINE_TAG):])
    rc = proc.wait()
    if killed:
        info.setdefault("error", "killed at the time budget")
    elif rc != 0 or "start_error" in info:
        info["error"] = info.get("start_error") or f"engine process exited with {rc}: " + "".join(tail[-8:])[-1500:]
        if causes:
            info["error"] += " | first error in the log: " + causes[0]
    return rows, info


_RESULTS: Results | None = None


def yield_row(row: dict) -> None:
    if _RESULTS is not None:
        _RESULTS.add(row)
        log(f"row: {row['setting']} {row['case']} batch {row.get('batch')}: {row.get('decode_tok_s')} tok/s, "
            f"tpot {row.get('tpot_ms_median')} ms, ttft {row.get('ttft_s')} s, share {row.get('resident_share')}")


def main(argv: list[str] | None = None) -> int:
    global _RESULTS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny Llama, ~1200-token contexts")
    parser.add_argument("--settings", default="dense,esa,dense-ucm",
                        help=f"comma list of {', '.join(SETTINGS)} (run in this order per context)")
    parser.add_argument("--cases", default=None,
                        help=f"comma list of <context>x<batch> and capacity (default {DEFAULT_CASES}; "
                             f"--smoke: {SMOKE_CASES})")
    parser.add_argument("--capacity-context", default=None, help="context of the capacity case (default 32K; "
                        "--smoke: 1200)")
    parser.add_argument("--esa-capacity-batch", type=int, default=None,
                        help="batch of the esa capacity case (default: the 32K prompts that fit 90%% of "
                             "--dram-gib, since ESA keeps every prompt block in UcmDram; --smoke: 12)")
    parser.add_argument("--dense-capacity-batch", type=int, default=None,
                        help="override the dense capacity batch (default: from the engine's num_gpu_blocks)")
    parser.add_argument("--max-tokens", type=int, default=None, help="decode steps per case before the chunked-"
                        "prefill allowance (default 128; --smoke 32)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="decode steps excluded after every request "
                        "has its first token")
    parser.add_argument("--reps", type=int, default=2, help="repetitions per case in one engine; the last is "
                        "reported")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--ahead-ratio", type=float, default=0.4, help="prefetch_ratio of the esa-ahead setting "
                        "(default: ESA's default)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="vLLM token budget per step (default 16384, vLLM's default for the LLM class on "
                             "H100/H200; --smoke 2048)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="vLLM block_size for every setting (default: vLLM's, 16 on CUDA; --smoke: 32); ESA "
                             "selects, stores and loads whole blocks, so it sets the copy count per retrieval")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="vLLM max_num_seqs (default: vLLM's)")
    parser.add_argument("--capture-sizes", default="1,2,4,8,16,24,32",
                        help="CUDA-graph capture sizes for every setting ('' = vLLM's default list)")
    parser.add_argument("--dram-gib", type=float, default=None,
                        help="UcmDram max_cache_size in GiB (pinned host memory; default 40, --smoke 0.25); "
                             "must hold the prompts of a case (128K x 4 = 64 GiB for Llama-3-8B)")
    parser.add_argument("--kv-cache-bytes", type=int, default=8 << 20, help="--smoke: vLLM kv_cache_memory_bytes")
    parser.add_argument("--cpu-threads-bind", default=None,
                        help="--smoke: VLLM_CPU_OMP_THREADS_BIND for every engine (default: all usable cores, "
                             "e.g. 0-1; 'auto' leaves vLLM's binding, which differs with a connector)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", default=None, help="folder for the model config (default: a temp dir)")
    parser.add_argument("--time-budget-s", type=float, default=None, help="stop cleanly before this many seconds")
    parser.add_argument("--case-reserve-s", type=float, default=None,
                        help="no case starts with less time left (default 150; --smoke 20); an engine needs "
                             "this plus 90 s (--smoke 15)")
    parser.add_argument("--profile", action="store_true",
                        help="host profile (cProfile) of the decode steps of each case's last repetition, engine core "
                             "in-process; rows then time an in-process engine (earlier repetitions' tok/s kept)")
    parser.add_argument("--merge", action="store_true", help="keep rows of other cases/settings already in --out")
    # one file per run; bench/gpu_e2e_summary.py gathers the current row of each case into bench/results/gpu_e2e.*
    parser.add_argument("--out", default="bench/results/gpu_runs/e2e.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(json.loads(Path(args.worker).read_text()))

    smoke = args.smoke
    args.cases = [parse_case(c) for c in (args.cases or (SMOKE_CASES if smoke else DEFAULT_CASES)).split(",") if c]
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    args.capture_sizes = [int(x) for x in args.capture_sizes.split(",") if x.strip()]
    bad = [s for s in args.settings if s not in SETTINGS]
    if bad:
        parser.error(f"unknown settings {bad}: expected {list(SETTINGS)}")
    args.capacity_context = parse_context(args.capacity_context or ("1200" if smoke else "32K"))
    args.max_tokens = args.max_tokens or (32 if smoke else 128)
    args.max_num_batched_tokens = args.max_num_batched_tokens or (2048 if smoke else 16384)
    args.block_size = args.block_size or (32 if smoke else None)  # None: vLLM's own
    args.dram_gib = args.dram_gib if args.dram_gib is not None else (0.25 if smoke else 40.0)
    args.dram_bytes = int(args.dram_gib * (1 << 30))
    args.case_reserve_s = args.case_reserve_s if args.case_reserve_s is not None else (20.0 if smoke else 150.0)
    engine_reserve = args.case_reserve_s + (15.0 if smoke else 90.0)

    started = time.time()
    deadline = started + args.time_budget_s if args.time_budget_s else float("inf")
    if not args.model_dir:
        args.model_dir = tempfile.mkdtemp(prefix="ucm-gpu-e2e-model-")
        atexit.register(shutil.rmtree, args.model_dir, True)
    model_path, model = write_model(args)
    per_token = kv_bytes_per_token(model)
    if args.esa_capacity_batch is None:  # smoke: twice the dense capacity of the default 8 MiB KV cache
        args.esa_capacity_batch = 12 if smoke else max(1, int(0.9 * args.dram_bytes // (args.capacity_context
                                                                                         * per_token)))

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # FlashInfer is not carried on the H200 machine
    if smoke:
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine unless the caller says otherwise
        bind = args.cpu_threads_bind
        if bind is None:
            cores = sorted(os.sched_getaffinity(0))
            bind = f"{cores[0]}-{cores[-1]}" if cores == list(range(cores[0], cores[-1] + 1)) else ",".join(
                map(str, cores))
        if bind != "auto":
            env["VLLM_CPU_OMP_THREADS_BIND"] = bind
    repo = Path(__file__).resolve().parent.parent
    host = host_speed()
    log(f"host: {host}")
    meta = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "model_name": "tiny random Llama (make_tiny_llama, 2 layers, bf16)" if smoke else
        "Llama-3-8B shape, dummy weights, bf16",
        "model": model,
        "engine": (f"vLLM-CPU in-process, enforce_eager, block {args.block_size}, kv_cache_memory_bytes "
                   f"{args.kv_cache_bytes}, OMP bind {env.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')}") if smoke else
        f"CUDA graphs (vLLM default mode), gpu_memory_utilization {args.gpu_memory_utilization}"
        + (f", block_size {args.block_size}" if args.block_size else ""),
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_tokens_base": args.max_tokens,
        "warmup_steps": args.warmup_steps,
        "reps": args.reps,
        "dram_gib": args.dram_gib,
        "esa_config": ESA_CONFIG,
        "ahead_ratio": args.ahead_ratio,
        "dma_source_order": os.environ.get("UCM_DMA_SOURCE_ORDER", "stream"),
        "background_copy": os.environ.get("UCM_BACKGROUND_COPY", "dma"),
        "background_programs": os.environ.get("UCM_BACKGROUND_PROGRAMS"),  # None: the backend's default
        "esa_capacity_batch": args.esa_capacity_batch,
        "commit": git_commit(repo),
        "gpu": None,
        "vllm": None,
        "engines": [],
        "engine_errors": [],
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": host,
    }
    _RESULTS = Results(args, meta)
    plan = build_plan(args, model)
    log(f"plan: {[(j['setting'], j['context'], [c['name'] for c in j['cases']]) for j in plan]}")
    rc = 0
    with tempfile.TemporaryDirectory(prefix="ucm-gpu-e2e-") as tmp:
        for job in plan:
            job.update(
                commit=meta["commit"], deadline=deadline, case_reserve_s=args.case_reserve_s,
                max_tokens=args.max_tokens, warmup_steps=args.warmup_steps, reps=args.reps, seed=args.seed,
                vocab=model["vocab_size"], kv_bytes_per_token=per_token,
                dram_bytes=args.dram_bytes if job["setting"] != "dense" else 0,
                engine_kwargs=setting_kwargs(job["setting"], engine_kwargs(args, model_path, job["max_model_len"])),
                env=V1_PIECEWISE_ENV if job["setting"] == "dense-v1pw" else {},
                profile=args.profile, profile_out=str(Path(args.out).parent / "profiles"),
                extra_config=extra_config(job["setting"], args),
            )
            name = f"{job['setting']} @ {job['context']}"
            if time.time() + engine_reserve > deadline:
                log(f"skipping {name}: time budget")
                for case in job["cases"]:
                    _RESULTS.add({"case": case["name"], "context": job["context"], "setting": job["setting"],
                                  "batch": case.get("batch"), "decode_tok_s": None, "error": "skipped: time budget"})
                continue
            log(f"starting engine {name} (cases {[c['name'] for c in job['cases']]})")
            rows, info = run_job(job, args, deadline, env, Path(tmp))
            meta["engines"].append(dict(info, setting=job["setting"], context=job["context"]))
            meta["gpu"] = meta["gpu"] or info.get("gpu")
            meta["vllm"] = meta["vllm"] or info.get("vllm")
            if info.get("error"):
                if not info["error"].startswith("killed at the time budget"):
                    rc = 3
                meta["engine_errors"].append(f"{name}: {info['error']}")
                log(f"engine {name} failed: {info['error'][:500]}")
                done = {r["case"] for r in rows}
                for case in job["cases"]:
                    if case["name"] not in done:
                        _RESULTS.add({"case": case["name"], "context": job["context"], "setting": job["setting"],
                                      "batch": case.get("batch"), "decode_tok_s": None,
                                      "error": info["error"][:300]})
            _RESULTS.write()
    meta["seconds"] = round(time.time() - started, 1)
    _RESULTS.write()
    log(f"wrote {args.out} (+ .md, .png) in {meta['seconds']} s")
    print(markdown(meta, _RESULTS.rows), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
