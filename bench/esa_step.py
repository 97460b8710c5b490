"""One ESA decode-attention step vs dense decode attention on a CUDA GPU, with the time split.

ESA step (per layer, resident blocks of a paged cache): block scores of the candidates (`Backend.block_scores`),
top-k (`Backend.topk_masked`), then attention over the kept blocks, in two forms:
- fused (`ucm.sparse.esa.step.esa_decode_attention`): the attention kernel (`ucm.kernels.sparse_paged_attention`)
  reads the top-k output and the engine's block table itself; its launch configuration is swept per case;
- table (the previous form): the sparse block table (`ucm.sparse.esa.step.sparse_block_tables`, small torch ops),
  then the paged kernel (`ucm.kernels.paged_attention`) over it.
Dense baselines: torch SDPA on contiguous K/V (GQA) and the paged kernel over the full block table. Also measured:
the one-time block means after prefill, and the delta load of changed blocks from pinned host memory (offload
mode; it runs on a side stream, once per retrieval_stride steps).

    python bench/esa_step.py --out bench/results/esa_step.json

Needs `ucm.kernels` / `ucm.backends.cuda` importable (an installed checkout). Writes JSON and prints markdown.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import platform
import statistics
import time
import traceback

import torch

from ucm.device import BlockSelection, get_backend
from ucm.sparse.budget import window_layout
from ucm.sparse.config import EsaConfig
from ucm.sparse.esa.step import esa_decode_attention, sparse_block_tables

HQ, HKV, D, BS = 32, 8, 128, 16
# fused-kernel launch configurations swept per case: (tokens per tile, warps, pipeline stages, splits x default)
CONFIGS = [(64, 4, 2, 1), (64, 4, 3, 1), (64, 4, 2, 2), (128, 4, 2, 1), (128, 8, 3, 1), (32, 4, 3, 2), (64, 8, 2, 1),
           (32, 2, 3, 4)]


def timed(fn, iters: int, warmup: int = 5) -> float:
    """Mean milliseconds per call over `iters` back-to-back calls (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


def graphed(fn):
    """`fn` captured in a CUDA graph (replay), or None when a part of it cannot be captured."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as exc:  # report, fall back to eager numbers
        print(f"  (CUDA graph capture failed: {type(exc).__name__}: {str(exc)[:120]})")
        return None


def run_case(backend, context: int, batch: int, ratio: float, iters: int) -> dict:
    from ucm.kernels.paged_attention import num_splits_for, paged_decode_attention
    from ucm.kernels.sparse_paged_attention import sparse_paged_decode_attention

    dev = torch.device("cuda")
    dtype = torch.bfloat16
    config = EsaConfig(sparse_ratio=ratio)
    blocks = context // BS
    num_blocks = batch * blocks + 1
    k_cache = torch.randn(num_blocks, BS, HKV, D, device=dev, dtype=dtype)
    v_cache = torch.randn(num_blocks, BS, HKV, D, device=dev, dtype=dtype)
    table = (torch.randperm(num_blocks - 1, device=dev) + 1).view(batch, blocks).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    query = torch.randn(batch, HQ, D, device=dev, dtype=dtype)

    layout = window_layout(context - 1, BS, config)  # the prompt: every token but the one being decoded
    sink, local_start, k = layout.sink_end, layout.local_start, layout.num_work
    cand_ids = table[:, sink:local_start].reshape(-1).long()
    n_cand = local_start - sink
    means_ms = timed(lambda: backend.block_means(k_cache, cand_ids), max(3, iters // 10), warmup=2)
    reps = backend.block_means(k_cache, cand_ids).to(dtype)  # stored in the cache dtype
    cu_host = torch.arange(batch + 1, dtype=torch.int64) * n_cand
    lengths_host = cu_host[1:] - cu_host[:-1]
    local_dev = torch.full((batch,), local_start, dtype=torch.int64, device=dev)
    max_tail = blocks - local_start
    kept_tokens = (sink + k + max_tail) * BS
    total_blocks = sink + k + max_tail

    state = {}

    def scores():
        state["scores"] = backend.block_scores(query, reps, cu_host)

    def topk():
        state["sel"] = backend.topk_masked(state["scores"], k, lengths_host)

    def tables():
        sel, counts = state["sel"]
        state["table"] = sparse_block_tables(table, seq_lens, sel, counts, sink, local_dev, BS, max_tail)

    def sparse_attention():
        t, lens = state["table"]
        state["out"] = paged_decode_attention(query, k_cache, v_cache, t, lens, kept_tokens)

    def esa_step():
        scores()
        topk()
        tables()
        sparse_attention()

    side = torch.cuda.Stream()

    def esa_pipelined():
        # ESA's schedule: this step attends with the last selection while the next retrieval runs on a side stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            state["next"] = backend.select_blocks(query, reps, cu_host, k)
        tables()
        sparse_attention()
        torch.cuda.current_stream().wait_stream(side)

    def dense_paged():
        state["dense"] = paged_decode_attention(query, k_cache, v_cache, table, seq_lens, context)

    # fused form: no table; the attention reads the selection and the engine's table
    def fused_step():
        state["fused"], state["fsel"], _ = esa_decode_attention(
            backend, query, reps, cu_host, k_cache, v_cache, table, seq_lens, sink, local_dev, k, kept_tokens
        )

    def fused_attention(config=None):
        sel, counts = state["sel"]
        kwargs = {}
        if config is not None:
            block_t, warps, stages, mult = config
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            splits = num_splits_for(batch, HKV, kept_tokens, block_t, sms) * mult
            kwargs = dict(block_t=block_t, num_warps=warps, num_stages=stages, num_splits=splits)
        selection = BlockSelection(table, seq_lens, sel, counts, sink, local_dev, kept_tokens)
        state["fused_out"] = sparse_paged_decode_attention(query, k_cache, v_cache, selection, **kwargs)

    def fused_staggered():
        # the same serial step, two half-batches on two streams, the second started once the first is scored:
        # the first half's top-k (a few SMs, latency bound) overlaps the second half's scoring
        cur, h = torch.cuda.current_stream(), batch // 2
        scores_a = backend.block_scores(query[:h], reps, cu_host[: h + 1])
        side.wait_stream(cur)
        outs = []
        for lo, hi, stream in ((h, batch, side), (0, h, cur)):
            with torch.cuda.stream(stream):
                sc = scores_a if lo == 0 else backend.block_scores(query[lo:hi], reps, cu_host[lo : hi + 1])
                sel_half, counts_half = backend.topk_masked(sc, k, lengths_host[lo:hi])
                half = BlockSelection(table[lo:hi], seq_lens[lo:hi], sel_half, counts_half, sink, local_dev[lo:hi],
                                      kept_tokens)
                outs.append(backend.sparse_decode_attention(query[lo:hi], k_cache, v_cache, half))
        cur.wait_stream(side)
        state["staggered"] = outs[::-1]

    def fused_pipelined():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            state["next"] = backend.select_blocks(query, reps, cu_host, k)
        fused_attention()
        torch.cuda.current_stream().wait_stream(side)

    esa_step()
    torch.cuda.synchronize()
    eager_out = state["out"].clone()
    split = {name: timed(fn, iters) for name, fn in
             (("scores", scores), ("topk", topk), ("table", tables), ("attention", sparse_attention))}
    split_graph = {}
    for name, fn in (("scores", scores), ("topk", topk), ("table", tables), ("attention", sparse_attention)):
        replay = graphed(fn)
        split_graph[name] = timed(replay, iters) if replay else None
    esa_ms = timed(esa_step, iters)
    esa_graph = graphed(esa_step)
    esa_graph_ms = timed(esa_graph, iters) if esa_graph else None
    graph_output_matches = bool(torch.equal(state["out"], eager_out)) if esa_graph else None
    pipelined_ms = timed(esa_pipelined, iters)
    pipelined_graph = graphed(esa_pipelined)
    pipelined_graph_ms = timed(pipelined_graph, iters) if pipelined_graph else None
    dense_paged_ms = timed(dense_paged, iters)
    stage = {n: (split_graph[n] if split_graph[n] is not None else split[n]) for n in split}
    amortized_ms = stage["table"] + stage["attention"] + (stage["scores"] + stage["topk"]) / 10

    # fused form: the step as `esa_decode_attention` runs it (default launch config), then the config sweep
    fused_step()
    torch.cuda.synchronize()
    fused_eager_out = state["fused"].clone()
    selection_matches = bool(torch.equal(state["fsel"], state["sel"][0]))
    fused_matches_table = bool(torch.equal(fused_eager_out, eager_out))
    fused_err_vs_table = (fused_eager_out.float() - eager_out.float()).abs().max().item()
    fused_ms = timed(fused_step, iters)
    fused_graph = graphed(fused_step)
    fused_graph_ms = timed(fused_graph, iters) if fused_graph else None
    fused_graph_matches = bool(torch.equal(state["fused"], fused_eager_out)) if fused_graph else None
    fused_attention_ms = timed(fused_attention, iters)
    replay = graphed(fused_attention)
    fused_attention_graph_ms = timed(replay, iters) if replay else None
    staggered_ms = staggered_matches = None
    if batch > 1:
        fused_staggered()
        torch.cuda.synchronize()
        staggered = torch.cat(state["staggered"])
        staggered_matches = bool(torch.allclose(staggered.float(), fused_eager_out.float(), atol=2e-3, rtol=2e-2))
        replay = graphed(fused_staggered)
        staggered_ms = timed(replay, iters) if replay else timed(fused_staggered, iters)
    fused_pipelined_ms = timed(fused_pipelined, iters)
    replay = graphed(fused_pipelined)
    fused_pipelined_graph_ms = timed(replay, iters) if replay else None
    sweep = []
    for config in CONFIGS:
        fused_attention(config)
        torch.cuda.synchronize()
        ok = bool(torch.allclose(state["fused_out"].float(), fused_eager_out.float(), atol=2e-3, rtol=2e-2))
        replay = graphed(lambda c=config: fused_attention(c))
        ms = timed(replay, iters) if replay else timed(lambda c=config: fused_attention(c), iters)
        sweep.append({"block_t": config[0], "num_warps": config[1], "num_stages": config[2],
                      "splits_x": config[3], "ms": ms, "matches_default": ok})
    best = min([row for row in sweep if row["matches_default"]] or sweep, key=lambda row: row["ms"])
    best_config = (best["block_t"], best["num_warps"], best["num_stages"], best["splits_x"])

    def fused_step_best():
        state["sel"] = backend.select_blocks(query, reps, cu_host, k)
        fused_attention(best_config)

    replay = graphed(fused_step_best)
    fused_best_graph_ms = timed(replay, iters) if replay else timed(fused_step_best, iters)
    kv_bytes = 2 * total_blocks * BS * HKV * D * 2 * batch
    f_attn = fused_attention_graph_ms if fused_attention_graph_ms is not None else fused_attention_ms
    fused_amortized_ms = f_attn + (stage["scores"] + stage["topk"]) / 10

    # correctness of this very run: selection sizes, and the sparse output vs a float32 reference on row 0
    sel, counts = state["sel"]
    assert int(counts.min()) == k and state["table"][1].max().item() == kept_tokens
    from ucm.sparse.attention import paged_decode_attention as reference

    t, lens = state["table"]
    ref = reference(query[:1].float(), k_cache, v_cache, t[:1], lens[:1])
    err_sparse = (state["out"][:1].float() - ref).abs().max().item()
    err_fused = (fused_eager_out[:1].float() - ref).abs().max().item()
    ref_dense = reference(query[:1].float(), k_cache, v_cache, table[:1], seq_lens[:1])
    err_dense = (state["dense"][:1].float() - ref_dense).abs().max().item()

    # dense SDPA on contiguous K/V (the same bytes as the paged cache, laid out per request)
    k_contig = k_cache[table.long()].reshape(batch, context, HKV, D).transpose(1, 2).contiguous()
    v_contig = v_cache[table.long()].reshape(batch, context, HKV, D).transpose(1, 2).contiguous()
    q4 = query[:, :, None, :]
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q4, k_contig, v_contig, enable_gqa=True)  # noqa: E731
    sdpa_ms = timed(sdpa, iters)
    err_sdpa = (sdpa()[:1, :, 0].float() - ref_dense).abs().max().item()
    k_contig = v_contig = None  # free 2 x the KV bytes before the next measurement

    # offload mode: delta load of changed blocks (10% of the selection) from pinned host, both K and V pages
    changed = max(1, k // 10) * batch
    host = backend.alloc_pinned(changed * 2 * BS * HKV * D * 2).view(changed, -1)
    slots = table[:, sink : sink + changed // batch].reshape(-1).long()
    load_ms = timed(lambda: backend.scatter_blocks(host, (k_cache, v_cache), slots), max(3, iters // 5))

    serial = min(x for x in (esa_ms, esa_graph_ms) if x is not None)
    pipelined = min(x for x in (pipelined_ms, pipelined_graph_ms) if x is not None)
    f_serial = min(x for x in (fused_ms, fused_graph_ms) if x is not None)
    f_pipelined = min(x for x in (fused_pipelined_ms, fused_pipelined_graph_ms) if x is not None)
    return {
        "context": context, "batch": batch, "sparse_ratio": ratio, "block_size": BS,
        "candidates": n_cand, "k": k, "kept_blocks": total_blocks, "dense_blocks": blocks,
        "kept_fraction": total_blocks / blocks,
        "ms": {
            "sdpa_dense": sdpa_ms, "paged_dense": dense_paged_ms, "esa_step": esa_ms, "esa_step_graph": esa_graph_ms,
            "esa_pipelined": pipelined_ms, "esa_pipelined_graph": pipelined_graph_ms,
            "esa_amortized_stride10": amortized_ms,
            **{f"esa_{n}": v for n, v in split.items()},
            **{f"esa_{n}_graph": v for n, v in split_graph.items()},
            "block_means_once": means_ms, "delta_load_10pct": load_ms,
            "fused_step": fused_ms, "fused_step_graph": fused_graph_ms, "fused_attention": fused_attention_ms,
            "fused_attention_graph": fused_attention_graph_ms, "fused_pipelined": fused_pipelined_ms,
            "fused_pipelined_graph": fused_pipelined_graph_ms, "fused_amortized_stride10": fused_amortized_ms,
            "fused_step_best_config_graph": fused_best_graph_ms, "fused_two_streams_graph": staggered_ms,
        },
        "fused": {
            "speedup_vs_sdpa": sdpa_ms / f_serial, "speedup_vs_paged_dense": dense_paged_ms / f_serial,
            "speedup_pipelined_vs_sdpa": sdpa_ms / f_pipelined,
            "speedup_amortized_stride10_vs_sdpa": sdpa_ms / fused_amortized_ms,
            "speedup_best_config_vs_sdpa": sdpa_ms / fused_best_graph_ms,
            "speedup_two_streams_vs_sdpa": sdpa_ms / staggered_ms if staggered_ms else None,
            "two_streams_output_close": staggered_matches, "selection_equals_table_path": selection_matches,
            "max_abs_err_vs_fp32_reference": err_fused,
            "attention_tb_per_s": kv_bytes / (f_attn * 1e-3) / 1e12,
            "output_equals_table_path": fused_matches_table, "max_abs_diff_vs_table_path": fused_err_vs_table,
            "graph_output_matches_eager": fused_graph_matches,
            "sweep": sweep, "best_config": best,
        },
        "speedup_vs_sdpa": sdpa_ms / serial, "speedup_vs_paged_dense": dense_paged_ms / serial,
        "speedup_pipelined_vs_sdpa": sdpa_ms / pipelined,
        "speedup_amortized_stride10_vs_sdpa": sdpa_ms / amortized_ms,
        "graph_output_matches_eager": graph_output_matches,
        "max_abs_err_vs_fp32_reference": {"esa": err_sparse, "paged_dense": err_dense, "sdpa": err_sdpa},
        "delta_load_bytes": changed * 2 * BS * HKV * D * 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/esa_step.json")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    backend = get_backend("cuda")
    root = pathlib.Path(__file__).resolve().parent.parent
    kernel_sha1 = {name: hashlib.sha1((root / "kernels" / name).read_bytes()).hexdigest()[:12]
                   for name in ("block_scores.py", "topk_masked.py", "paged_attention.py", "sparse_paged_attention.py")}
    rows = []
    started = time.time()
    for context in map(int, args.contexts.split(",")):
        for batch in map(int, args.batches.split(",")):
            try:
                row = run_case(backend, context, batch, args.ratio, args.iters)
            except Exception:  # keep the other cases' numbers; the traceback says what to fix
                traceback.print_exc()
                continue
            rows.append(row)
            torch.cuda.empty_cache()
            ms = row["ms"]
            print(f"{context}x{batch}: sdpa {ms['sdpa_dense']:.3f} paged {ms['paged_dense']:.3f} "
                  f"esa {ms['esa_step']:.3f} graph {ms['esa_step_graph']} pipelined {ms['esa_pipelined_graph']} "
                  f"-> {row['speedup_vs_sdpa']:.2f}x / {row['speedup_pipelined_vs_sdpa']:.2f}x; fused "
                  f"{ms['fused_step_graph']} ({row['fused']['speedup_vs_sdpa']:.2f}x, best config "
                  f"{row['fused']['speedup_best_config_vs_sdpa']:.2f}x)", flush=True)
    result = {
        "command": "python bench/esa_step.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
        "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "dtype": "bfloat16", "block_size": BS},
        "seconds": time.time() - started, "kernel_sha1": kernel_sha1, "rows": rows,
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(args.out.removesuffix(".json") + ".md", "w") as f:
        f.write(table + f"\n\nCommand: `{result['command']}` ({result['device']}, torch {result['torch']}).\n")
    print(table)


def _ms(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "n/a"


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "n/a"


def markdown(result: dict) -> str:
    lines = [
        f"ESA decode-attention step vs dense decode attention, {result['device']}, {HQ} q / {HKV} kv heads, head "
        f"dim {D}, bf16, block {BS}, sparse_ratio {result['rows'][0]['sparse_ratio']}. Per layer, ms (mean of "
        "back-to-back calls; ESA columns replayed as CUDA graphs, eager numbers in the JSON).",
        "",
        "- serial, table (before): scores -> top-k -> sparse block table (torch ops) -> paged attention;",
        "- serial, fused: scores -> top-k -> attention reading the selection itself (`esa_decode_attention`, default "
        "launch config); best config: the same with the fastest configuration of the sweep below; 2 streams: the "
        "serial fused step as two half-batches on two streams, the second half scored while the first half's top-k "
        "runs (same outputs, nothing stale);",
        "- pipelined: attention over the current selection while the next retrieval (scores + top-k) runs on a side"
        " stream (retrieval every step, the worst case of retrieval_stride 1);",
        "- amortized s=10: attention every step, scores + top-k every 10th step (retrieval_stride 10).",
        "",
        "| context x batch | kept | SDPA dense | paged dense | serial, table (before) | serial, fused | serial, fused "
        "best config | serial, fused, 2 streams | pipelined, fused | amortized s=10, fused | serial table vs SDPA | "
        "**serial fused vs SDPA** | best config vs SDPA | 2 streams vs SDPA | pipelined vs SDPA | amortized vs SDPA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ms, f = r["ms"], r["fused"]
        lines.append(
            f"| {r['context'] // 1024}K x {r['batch']} | {r['kept_fraction']:.1%} | {_ms(ms['sdpa_dense'])} | "
            f"{_ms(ms['paged_dense'])} | {_ms(ms['esa_step_graph'])} | {_ms(ms['fused_step_graph'])} | "
            f"{_ms(ms['fused_step_best_config_graph'])} | {_ms(ms['fused_two_streams_graph'])} | "
            f"{_ms(ms['fused_pipelined_graph'])} | {_ms(ms['fused_amortized_stride10'])} | "
            f"{r['speedup_vs_sdpa']:.2f}x | **{f['speedup_vs_sdpa']:.2f}x** | "
            f"{f['speedup_best_config_vs_sdpa']:.2f}x | {_x(f['speedup_two_streams_vs_sdpa'])} | "
            f"{f['speedup_pipelined_vs_sdpa']:.2f}x | "
            f"{f['speedup_amortized_stride10_vs_sdpa']:.2f}x |"
        )
    lines += [
        "",
        "Time split (each stage replayed alone as a CUDA graph, ms):",
        "",
        "| context x batch | scores | top-k | table (before) | attention over the table (before) | fused attention "
        "| fused attention K/V rate | fused output vs table path | best config (tile, warps, stages, splits x) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ms, f = r["ms"], r["fused"]
        best = f["best_config"]
        same = "identical" if f["output_equals_table_path"] else f"max diff {f['max_abs_diff_vs_table_path']:.1e}"
        lines.append(
            f"| {r['context'] // 1024}K x {r['batch']} | {_ms(ms['esa_scores_graph'])} | {_ms(ms['esa_topk_graph'])} | "
            f"{_ms(ms['esa_table_graph'])} | {_ms(ms['esa_attention_graph'])} | {_ms(ms['fused_attention_graph'])} | "
            f"{f['attention_tb_per_s']:.2f} TB/s | {same} | {best['block_t']}, {best['num_warps']}, "
            f"{best['num_stages']}, {best['splits_x']} ({best['ms']:.3f}) |"
        )
    lines += [
        "",
        "| context x batch | block means after prefill (once) | delta load of 10% of the selection, H2D (every "
        "retrieval, side stream) | max abs err vs fp32 reference (ESA table / ESA fused / paged dense / SDPA) |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        ms, err = r["ms"], r["max_abs_err_vs_fp32_reference"]
        lines.append(
            f"| {r['context'] // 1024}K x {r['batch']} | {_ms(ms['block_means_once'])} | "
            f"{_ms(ms['delta_load_10pct'])} ({r['delta_load_bytes'] / 2**20:.1f} MiB) | "
            f"{err['esa']:.1e} / {r['fused']['max_abs_err_vs_fp32_reference']:.1e} / {err['paged_dense']:.1e} / "
            f"{err['sdpa']:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
