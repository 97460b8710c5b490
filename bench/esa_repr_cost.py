"""What ESA's sub-block representations (``repr_tokens``) cost on a CUDA GPU, next to dense decode attention.

With 128-token blocks (vLLM-CPU, vLLM-Ascend) the default ``repr_tokens=16`` keeps 8 means per block, so scoring
reads 8x the representations; with 16-token blocks (vLLM's CUDA default) it keeps one, the cost of
`bench/esa_step.py`. Per layer, bf16, 32 q / 8 kv heads, head dim 128: selection (scores + top-k of the
candidates, `ucm.sparse.esa.retriever.select_blocks`, CUDA-graph replay) and the one-time representations after
prefill, for parts 1 and 8, against torch SDPA over the whole context (what one dense decode step reads).

    python bench/esa_repr_cost.py --out bench/results/esa_repr_cost.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from esa_step import HKV, HQ, D, graphed, timed  # noqa: E402

from ucm.device import get_backend  # noqa: E402
from ucm.sparse.budget import window_layout  # noqa: E402
from ucm.sparse.config import EsaConfig  # noqa: E402
from ucm.sparse.esa.retriever import block_representations, select_blocks  # noqa: E402

BS = 128


def run_case(backend, context: int, batch: int, iters: int) -> dict:
    dev, dtype = torch.device("cuda"), torch.bfloat16
    blocks = context // BS
    k_cache = torch.randn(batch * blocks, BS, HKV, D, device=dev, dtype=dtype)
    query = torch.randn(batch, HQ, D, device=dev, dtype=dtype)
    layout = window_layout(context - 1, BS, EsaConfig())
    n_cand = layout.local_start - layout.sink_end
    ids = torch.cat([torch.arange(layout.sink_end, layout.local_start) + b * blocks for b in range(batch)]).to(dev)
    cu = torch.arange(batch + 1, dtype=torch.int64) * n_cand
    row = {"context": context, "batch": batch, "candidates": n_cand, "k": layout.num_work}
    for parts in (1, 8):
        reps = block_representations(backend, k_cache, ids, parts).to(dtype)
        row[f"repr_once_p{parts}"] = timed(lambda p=parts: block_representations(backend, k_cache, ids, p), 3, 2)
        select = lambda r=reps, p=parts: select_blocks(backend, query, r, cu, layout.num_work, p)  # noqa: E731
        replay = graphed(select)
        row[f"select_p{parts}"] = timed(replay or select, iters)
    k = k_cache.view(batch, blocks * BS, HKV, D).transpose(1, 2)
    v = torch.randn_like(k)
    q4 = query[:, :, None]
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=True)  # noqa: E731
    row["sdpa_dense"] = timed(sdpa, iters)
    for parts in (1, 8):
        row[f"select_p{parts}_vs_sdpa"] = row[f"select_p{parts}"] / row["sdpa_dense"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/esa_repr_cost.json")
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    backend = get_backend("cuda")
    rows = [run_case(backend, c, b, args.iters) for c in (32768, 131072) for b in (1, 8)]
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "block_size": BS,
            "heads": f"{HQ} q / {HKV} kv, head dim {D}, bf16", "command": "python bench/esa_repr_cost.py"}  # fmt: skip
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        f"ESA selection with 1 vs 8 representations per 128-token block, {meta['device']}, {meta['heads']}. "
        "Per layer, ms (selection: CUDA-graph replay of scores + top-k; representations: once after prefill).",
        "",
        "| context x batch | candidates | k | SDPA dense | select, 1 part | select, 8 parts | 1 part vs SDPA "
        "| 8 parts vs SDPA | representations once, 1 / 8 parts |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context'] // 1024}K x {r['batch']} | {r['candidates']} | {r['k']} | {r['sdpa_dense']:.3f} "
            f"| {r['select_p1']:.3f} | {r['select_p8']:.3f} | {100 * r['select_p1_vs_sdpa']:.1f}% "
            f"| {100 * r['select_p8_vs_sdpa']:.1f}% | {r['repr_once_p1']:.3f} / {r['repr_once_p8']:.3f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
