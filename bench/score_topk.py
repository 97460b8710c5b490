"""Block scoring + top-k (ESA retrieval) vs dense SDPA decode attention on the same shapes, on a CUDA GPU.

Shapes: 32 query / 8 KV heads, head dim 128, block size 16, contexts 32K and 128K, batch 1 and 8. Retrieval
scores every block of every request from its float32 block mean (`block_scores`) and keeps the best 20%
outside the init (1 block) and local (2 blocks) windows (`topk_masked`); `select_blocks` does both. Dense
baseline: `torch.nn.functional.scaled_dot_product_attention` decode (one query token, bf16 K/V, GQA).

Times are GPU time per call: the calls are queued behind a `torch.cuda._sleep`, so launch overhead on the CPU
does not show (as in a decode step, where retrieval is queued on a side stream while the GPU computes). The
CPU-bound wall time per call is reported too. The kernel selection is checked against the reference ops.

Also the cost of ESA's ``initial_selection: "attention"`` (`attention_mass` + top-k: the exact attention mass the
last ``initial_queries`` = 8 prompt queries pay to each block of the prompt, read from the paged bf16 K): once per
request and layer, at the request's first decode step, against one decode step's SDPA at batch 1 and the
representation selection it replaces. Checked against an unchunked softmax.

    python bench/score_topk.py            # writes bench/results/score_topk.json and score_topk.md

Needs a CUDA GPU and an installed checkout (`pip install -e .`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ucm.device import Backend, get_backend, reference

HQ, HKV, D, BS = 32, 8, 128, 16
TARGET_SHARE = 0.10
RATIO, INIT, LOCAL = 0.2, 1, 2


def gpu_ms(fn, iters: int, cpu_ms_per_call: float = 1.0) -> float:
    """GPU milliseconds per call: `iters` calls queued behind a sleep kernel, timed by CUDA events.

    The sleep lasts twice as long as the CPU needs to queue the calls, so the GPU never waits for the CPU.
    """
    fn()
    torch.cuda.synchronize()
    sleep_cycles = int(2e6 * max(20.0, 2 * iters * cpu_ms_per_call))  # ~2 GHz SM clock
    samples = []
    for _ in range(3):
        torch.cuda._sleep(sleep_cycles)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


def wall_ms(fn, iters: int) -> float:
    """Wall milliseconds per call, back to back, synchronized at the end (includes CPU launch overhead)."""
    for _ in range(iters):  # steady state: pinned staging buffers of the launchers are cached by then
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / iters


def run_case(backend: Backend, context: int, batch: int, iters: int) -> dict:
    blocks = context // BS
    query = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    reps = torch.randn(batch * blocks, HKV, D, device="cuda", dtype=torch.float32)
    cu_blocks = torch.arange(batch + 1, dtype=torch.int64) * blocks  # on the host, as the scheduler knows it
    lengths = cu_blocks[1:] - cu_blocks[:-1]
    j = torch.arange(blocks)[None, :]
    exclude = (j < INIT) | (j >= lengths[:, None] - LOCAL)
    k = int((blocks - INIT - LOCAL) * RATIO)
    scores = backend.block_scores(query, reps, cu_blocks)

    # Dense decode attention on the same shapes (contiguous bf16 K/V, GQA).
    q4 = query.view(batch, HQ, 1, D)
    keys = torch.randn(batch, HKV, context, D, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)

    reps_bf16 = reps.to(torch.bfloat16)  # what a store of means in the cache dtype holds
    calls = {
        "select_blocks": lambda: backend.select_blocks(query, reps, cu_blocks, k, exclude),
        "select_blocks_no_mask": lambda: backend.select_blocks(query, reps, cu_blocks, k),
        "select_blocks_bf16_reps": lambda: backend.select_blocks(query, reps_bf16, cu_blocks, k, exclude),
        "block_scores": lambda: backend.block_scores(query, reps, cu_blocks),
        "topk_masked": lambda: backend.topk_masked(scores, k, lengths, exclude),
        "torch_ops_select": lambda: reference.topk_masked(
            reference.block_scores(query, reps, cu_blocks), k, lengths.cuda(), exclude.cuda()
        ),
        "sdpa_decode": lambda: F.scaled_dot_product_attention(q4, keys, values, enable_gqa=True),
    }
    row = {"context": context, "batch": batch, "blocks_per_request": blocks, "k": k}
    for name, fn in calls.items():
        row[f"{name}_wall_ms"] = round(wall_ms(fn, iters), 4)
        row[f"{name}_gpu_ms"] = round(gpu_ms(fn, iters, row[f"{name}_wall_ms"]), 4)
    row["select_share_of_sdpa"] = round(row["select_blocks_gpu_ms"] / row["sdpa_decode_gpu_ms"], 4)
    row["select_no_mask_share_of_sdpa"] = round(row["select_blocks_no_mask_gpu_ms"] / row["sdpa_decode_gpu_ms"], 4)
    row["select_bf16_reps_share_of_sdpa"] = round(
        row["select_blocks_bf16_reps_gpu_ms"] / row["sdpa_decode_gpu_ms"], 4
    )
    row["torch_ops_share_of_sdpa"] = round(row["torch_ops_select_gpu_ms"] / row["sdpa_decode_gpu_ms"], 4)

    # Correctness: same counts as the reference, and no left-out block beats a kept one (up to rounding).
    idx, counts = backend.select_blocks(query, reps, cu_blocks, k, exclude)
    ref_scores = reference.block_scores(query.cpu(), reps.cpu(), cu_blocks)
    _, ref_counts = reference.topk_masked(ref_scores, k, lengths, exclude)
    ok = torch.equal(counts.cpu(), ref_counts)
    idx = idx.cpu()
    for b in range(batch):
        kept = idx[b, : int(counts[b])]
        rest = torch.ones(blocks, dtype=torch.bool)
        rest[kept] = False
        rest &= ~exclude[b]
        ok &= bool(ref_scores[b, kept].min() >= ref_scores[b, rest].max() - 1e-2)
    row["correct"] = bool(ok)
    print(json.dumps(row), flush=True)
    return row


INITIAL_QUERIES = 8


def initial_attention_case(context: int, iters: int, by_case: dict) -> dict:
    """GPU cost of one request's initial selection by attention in one layer (`ucm.sparse.esa.retriever`)."""
    from ucm.sparse.esa.retriever import attention_mass

    blocks = context // BS
    key_view = torch.randn(blocks + 7, BS, HKV, D, device="cuda", dtype=torch.bfloat16)  # one layer's paged K
    ids = torch.randperm(blocks + 7, device="cuda")[:blocks]  # the request's blocks, scattered in the cache
    queries = torch.randn(INITIAL_QUERIES, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = int((blocks - INIT - LOCAL) * RATIO)

    def select() -> torch.Tensor:
        return attention_mass(queries, key_view, ids)[INIT : blocks - LOCAL].topk(k).indices

    row = {"context": context, "initial_queries": INITIAL_QUERIES, "blocks_per_request": blocks, "k": k}
    row["attention_select_wall_ms"] = round(wall_ms(select, iters), 4)
    row["attention_select_gpu_ms"] = round(gpu_ms(select, iters, row["attention_select_wall_ms"]), 4)
    b1 = by_case[(context, 1)]
    row["sdpa_decode_b1_gpu_ms"] = b1["sdpa_decode_gpu_ms"]
    row["representation_select_b1_gpu_ms"] = b1["select_blocks_no_mask_gpu_ms"]
    row["attention_over_sdpa_b1"] = round(row["attention_select_gpu_ms"] / b1["sdpa_decode_gpu_ms"], 3)
    row["attention_over_representation_select"] = round(
        row["attention_select_gpu_ms"] / b1["select_blocks_no_mask_gpu_ms"], 2)
    # once per request: spread over the decode steps of a request it costs this share of SDPA per step
    row["amortized_share_of_sdpa_b1_over_1024_tokens"] = round(row["attention_over_sdpa_b1"] / 1024, 5)

    # check: the chunked log-sum-exp equals one softmax over all the request's keys
    keys = key_view.index_select(0, ids).float()  # [n, B, kvh, d]
    q = queries.float().view(INITIAL_QUERIES, HKV, HQ // HKV, D) * D**-0.5
    probs = torch.softmax(torch.einsum("wkgd,nbkd->wkgnb", q, keys).flatten(-2), dim=-1)
    want = probs.view(*probs.shape[:-1], blocks, BS).sum((0, 1, 2, 4))
    got = attention_mass(queries, key_view, ids)
    row["max_abs_error_vs_softmax"] = float((got - want).abs().max())
    picked = set(select().tolist())
    wanted = set(want[INIT : blocks - LOCAL].topk(k).indices.tolist())
    row["topk_overlap_vs_softmax"] = round(len(picked & wanted) / k, 4)
    row["correct"] = bool(torch.allclose(got, want, rtol=1e-3, atol=1e-4) and row["topk_overlap_vs_softmax"] > 0.99)
    print(json.dumps(row), flush=True)
    return row


def sweep(backend: Backend, iters: int, save) -> list[dict]:
    """Top-k kernel launch shapes (warps per row) at the benchmark's row widths."""
    from ucm.kernels import topk_masked

    default = topk_masked._num_warps
    rows = []
    for width in (2048, 8192):
        for batch in (1, 8):
            scores = torch.randn(batch, width, device="cuda")
            k = int(width * RATIO)
            want = reference.topk_masked(scores, k)
            for warps in (4, 8, 16):
                topk_masked._num_warps = lambda chunk, w=warps: w
                got = backend.topk_masked(scores, k)
                row = {"width": width, "batch": batch, "num_warps": warps}
                row["gpu_ms"] = round(gpu_ms(functools.partial(backend.topk_masked, scores, k), iters), 4)
                row["correct"] = bool(torch.equal(got[0], want[0]))
                rows.append(row)
                print(json.dumps(row), flush=True)
                save(rows)
    topk_masked._num_warps = default
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# ESA retrieval (block scores + top-k) vs dense SDPA decode attention",
        "",
        "`select_blocks` = `CudaBackend.select_blocks` (scoring kernel, which also counts the scores' key bins, then "
        "the top-k kernel) with the init/local windows passed as an exclude mask; 'no mask' = as ESA calls it "
        "(candidates only); 'top-k alone' = `topk_masked` on given scores (no histogram: bitwise search); "
        "'torch ops' = the reference ops on the GPU.",
        "",
        f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}. 32 query / 8 KV heads, head dim 128, "
        "block size 16, keep 20% of the candidate blocks (init 1 / local 2 blocks excluded). Block representations "
        "float32 (the contract) and, for comparison, bf16. GPU ms per call (calls queued behind a sleep kernel, "
        "CUDA events); wall = CPU-bound back-to-back calls, steady state.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "| context | batch | SDPA decode ms | select_blocks ms | share of SDPA | no mask: ms (share) | "
        "scores ms | top-k alone ms | bf16 reps: ms (share) | torch ops ms (share) | select wall ms | correct |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['context'] // 1024}K | {r['batch']} | {r['sdpa_decode_gpu_ms']:.4f} | "
            f"{r['select_blocks_gpu_ms']:.4f} | {100 * r['select_share_of_sdpa']:.1f}% | "
            f"{r['select_blocks_no_mask_gpu_ms']:.4f} ({100 * r['select_no_mask_share_of_sdpa']:.1f}%) | "
            f"{r['block_scores_gpu_ms']:.4f} | {r['topk_masked_gpu_ms']:.4f} | "
            f"{r['select_blocks_bf16_reps_gpu_ms']:.4f} ({100 * r['select_bf16_reps_share_of_sdpa']:.1f}%) | "
            f"{r['torch_ops_select_gpu_ms']:.4f} ({100 * r['torch_ops_share_of_sdpa']:.0f}%) | "
            f"{r['select_blocks_wall_ms']:.4f} | {r['correct']} |"
        )
    initial = meta.get("initial_attention") or []
    if initial:
        lines += [
            "",
            f"Initial selection by attention (ESA `initial_selection: \"attention\"`, {INITIAL_QUERIES} prompt "
            "queries, once per request and layer at its first decode step): GPU ms per request and layer, against one "
            "decode step's SDPA at batch 1 and the representation selection (`select_blocks`, no mask, batch 1) it "
            "replaces; x32 layers = per request of the Llama-3-8B shape.",
            "",
            "| context | attention select ms | x32 layers ms | SDPA decode b1 ms | / SDPA b1 | "
            "representation select ms | / representation | wall ms | max abs error vs softmax | top-k overlap | "
            "correct |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in initial:
            lines.append(
                f"| {r['context'] // 1024}K | {r['attention_select_gpu_ms']:.4f} | "
                f"{32 * r['attention_select_gpu_ms']:.2f} | {r['sdpa_decode_b1_gpu_ms']:.4f} | "
                f"{r['attention_over_sdpa_b1']:.2f}x | {r['representation_select_b1_gpu_ms']:.4f} | "
                f"{r['attention_over_representation_select']:.1f}x | {r['attention_select_wall_ms']:.3f} | "
                f"{r['max_abs_error_vs_softmax']:.2e} | {r['topk_overlap_vs_softmax']:.4f} | {r['correct']} |"
            )
    met = [f"{r['context'] // 1024}K x {r['batch']}" for r in rows if r["select_share_of_sdpa"] <= TARGET_SHARE]
    missed = [
        f"{r['context'] // 1024}K x {r['batch']} ({100 * r['select_share_of_sdpa']:.1f}%, "
        f"{100 * r['select_no_mask_share_of_sdpa']:.1f}% without the mask)"
        for r in rows
        if r["select_share_of_sdpa"] > TARGET_SHARE
    ]
    lines += [
        "",
        f"Target: select_blocks <= {100 * TARGET_SHARE:.0f}% of SDPA decode. Met: {', '.join(met) or 'none'}. "
        f"Missed: {', '.join(missed) or 'none'}.",
        "",
        "Why: float32 block means are 1/16 of the bf16 K+V bytes that dense decode reads, so scoring alone costs "
        "at least ~6% of a bandwidth-bound SDPA (bf16 means halve that: see the bf16 column). At batch 1 the GPU "
        "is not filled: a select is a small copy of the offsets, a memset of the score histogram and two "
        "launches, and each request's top-k runs in one program (one SM): select minus scoring is ~11 us at 2K "
        "candidates and ~25 us at 8K, against a 54 us / 183 us SDPA. The ESA call (no mask) is 5-14 us faster: the "
        "mask is one more host-to-device copy. The host time per call (wall column) is 0.2-0.8 ms of Python and "
        "launch overhead; it overlaps GPU work when retrieval is queued on a side stream.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--sweep", action="store_true", help="also time top-k kernel variants")
    args = parser.parse_args()
    import triton

    backend = get_backend("cuda")
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": "python " + " ".join(["bench/score_topk.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    os.makedirs(args.out_dir, exist_ok=True)
    rows: list[dict] = []
    swept: list[dict] = []

    def save(_=None) -> None:  # after every row: a run cut short keeps what it measured
        with open(os.path.join(args.out_dir, "score_topk.json"), "w") as f:
            json.dump({"meta": meta, "results": rows, "sweep": swept}, f, indent=1)

    for ctx in (32 << 10, 128 << 10):
        for b in (1, 8):
            rows.append(run_case(backend, ctx, b, args.iters))
            save()
    by_case = {(r["context"], r["batch"]): r for r in rows}
    meta["initial_attention"] = []
    for ctx in (32 << 10, 128 << 10):
        meta["initial_attention"].append(initial_attention_case(ctx, args.iters, by_case))
        save()
    if args.sweep:
        def save_sweep(done: list[dict]) -> None:
            swept[:] = done
            save()

        sweep(backend, args.iters, save_sweep)
    with open(os.path.join(args.out_dir, "score_topk.md"), "w") as f:
        f.write(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
