"""One ESA decode-attention step vs dense decode attention on a CUDA GPU, with the time split.

ESA step (per layer, resident blocks of a paged cache): block scores of the candidates (`Backend.block_scores`),
top-k (`Backend.topk_masked`), the sparse block table (`ucm.sparse.esa.step.sparse_block_tables`), then decode
attention over the kept blocks (`ucm.kernels.paged_attention`). Dense baselines: torch SDPA on contiguous K/V
(GQA) and the same paged kernel over the full block table. Also measured: the one-time block means after
prefill, and the delta load of changed blocks from pinned host memory (offload mode; it runs on a side stream,
once per retrieval_stride steps).

    python bench/esa_step.py --out bench/results/esa_step.json

Needs `ucm.kernels` / `ucm.backends.cuda` importable (an installed checkout). Writes JSON and prints markdown.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from ucm.device import get_backend
from ucm.sparse.budget import window_layout
from ucm.sparse.config import EsaConfig
from ucm.sparse.esa.step import sparse_block_tables

HQ, HKV, D, BS = 32, 8, 128, 16


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
    from ucm.kernels.paged_attention import paged_decode_attention

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

    # correctness of this very run: selection sizes, and the sparse output vs a float32 reference on row 0
    sel, counts = state["sel"]
    assert int(counts.min()) == k and state["table"][1].max().item() == kept_tokens
    from ucm.sparse.attention import paged_decode_attention as reference

    t, lens = state["table"]
    ref = reference(query[:1].float(), k_cache, v_cache, t[:1], lens[:1])
    err_sparse = (state["out"][:1].float() - ref).abs().max().item()
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
    rows = []
    started = time.time()
    for context in map(int, args.contexts.split(",")):
        for batch in map(int, args.batches.split(",")):
            row = run_case(backend, context, batch, args.ratio, args.iters)
            rows.append(row)
            torch.cuda.empty_cache()
            ms = row["ms"]
            print(f"{context}x{batch}: sdpa {ms['sdpa_dense']:.3f} paged {ms['paged_dense']:.3f} "
                  f"esa {ms['esa_step']:.3f} graph {ms['esa_step_graph']} pipelined {ms['esa_pipelined_graph']} "
                  f"-> {row['speedup_vs_sdpa']:.2f}x / {row['speedup_pipelined_vs_sdpa']:.2f}x", flush=True)
    result = {
        "command": "python bench/esa_step.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
        "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "dtype": "bfloat16", "block_size": BS},
        "seconds": time.time() - started, "rows": rows,
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


def markdown(result: dict) -> str:
    lines = [
        f"ESA decode-attention step vs dense decode attention, {result['device']}, {HQ} q / {HKV} kv heads, head "
        f"dim {D}, bf16, block {BS}, sparse_ratio {result['rows'][0]['sparse_ratio']}. Per layer, ms (mean of "
        "back-to-back calls; ESA columns replayed as CUDA graphs, eager numbers in the JSON).",
        "",
        "- serial: scores -> top-k -> sparse table -> attention, one after the other;",
        "- pipelined: ESA's schedule: attention over the current selection while the next retrieval (scores + top-k)"
        " runs on a side stream (retrieval every step, the worst case of retrieval_stride 1);",
        "- amortized s=10: table + attention every step, scores + top-k every 10th step (retrieval_stride 10).",
        "",
        "| context x batch | kept | SDPA dense | paged dense | ESA serial | ESA pipelined | ESA amortized s=10 "
        "| scores | top-k | table | attention | serial vs SDPA | pipelined vs SDPA | amortized vs SDPA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ms = r["ms"]
        lines.append(
            f"| {r['context'] // 1024}K x {r['batch']} | {r['kept_fraction']:.1%} | {_ms(ms['sdpa_dense'])} | "
            f"{_ms(ms['paged_dense'])} | {_ms(ms['esa_step_graph'])} | {_ms(ms['esa_pipelined_graph'])} | "
            f"{_ms(ms['esa_amortized_stride10'])} | {_ms(ms['esa_scores_graph'])} | {_ms(ms['esa_topk_graph'])} | "
            f"{_ms(ms['esa_table_graph'])} | {_ms(ms['esa_attention_graph'])} | {r['speedup_vs_sdpa']:.2f}x | "
            f"{r['speedup_pipelined_vs_sdpa']:.2f}x | {r['speedup_amortized_stride10_vs_sdpa']:.2f}x |"
        )
    lines += [
        "",
        "| context x batch | block means after prefill (once) | delta load of 10% of the selection, H2D (every "
        "retrieval, side stream) | max abs err vs fp32 reference (ESA / paged dense / SDPA) |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        ms, err = r["ms"], r["max_abs_err_vs_fp32_reference"]
        lines.append(
            f"| {r['context'] // 1024}K x {r['batch']} | {_ms(ms['block_means_once'])} | "
            f"{_ms(ms['delta_load_10pct'])} ({r['delta_load_bytes'] / 2**20:.1f} MiB) | "
            f"{err['esa']:.1e} / {err['paged_dense']:.1e} / {err['sdpa']:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
