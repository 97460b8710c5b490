"""How close can any block selection at a given budget get to full attention's tokens? (emulated in transformers)

Issue 13's goal has two parts: every answer full attention gives, and token agreement >= 90% over 32 generated
tokens. This script separates what ESA's selection loses from what the budget itself loses. For each prompt of the
accuracy harness's grid (plain-text prompts, as `python -m ucm.eval` builds them), prefill is dense once; then 32
tokens are decoded greedily under each decode mode below, every mode starting from the same prefill:

- ``dense``: every prompt key (this script's own reference: the same float32 numerics as the sparse modes);
- ``esa``: ESA's defaults as the engine runs them: the initial selection by the attention mass of the last 8
  prompt queries, attended until the first later retrieval lands; later retrievals score the candidates with the
  query of decode step 2, 12, 22 against 16-token slice means (a block scores its best slice), attended from step
  11, 21, 31 (`ucm.sparse.esa.schedule`, stride 10, layer hooks);
- ``esa-keep<F>``: as ``esa``, but each later retrieval keeps the initial selection's best int(F x k) blocks and
  fills the rest of k by the representations' ranking;
- ``initial``: the initial selection kept for all 32 tokens (no later retrieval);
- ``oracle@R``: at every decode step and layer, the blocks the step's own query pays the most attention to
  (exact softmax over the prompt keys, summed over heads), top int(candidates x R). No selection made ahead of
  the step can know this; it is the ceiling of block selection at budget R.

Every sparse mode attends the init window (1 block), the local window (2 blocks and the generated tokens) and k
candidate blocks per layer, as ESA does. Token agreement = common prefix with ``dense`` / 32 (the harness's
measure). Writes JSON + markdown.

    python bench/accuracy/selection_ceiling.py --tasks passkey,needle,multikey --contexts 2K,4K,8K --depths 5 \
        --samples 3 --modes dense,esa,initial,oracle@0.2,oracle@0.4 --out bench/results/accuracy_selection_ceiling
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from esa_reference_decode import EsaEmulation, block_scores, greedy_decode, grid_cases  # noqa: E402

from ucm.sparse.esa.schedule import EsaSchedule  # noqa: E402

# ESA's retrieval schedule at its default stride: a later retrieval scores with the query of a submit step and is
# attended from the step after its consume step (layer hooks)
SCHEDULE = EsaSchedule(10)


class CeilingEmulation(EsaEmulation):
    """Prefill as `EsaEmulation` (dense; the initial selection scored by ``scoring``); decode by ``mode``."""

    def __init__(self, block_size: int):
        super().__init__(block_size, init=1, local=2)
        self.mode = "dense"
        self.pending: dict[int, tuple[int, torch.Tensor]] = {}  # layer -> (first step attending it, scores)

    def start_decode(self) -> None:
        super().start_decode()
        self.pending = {}

    def later_selection(self, layer: int, reps: torch.Tensor) -> torch.Tensor:
        """Scores whose top-k a later retrieval attends: the representations' ranking ("esa"), or with
        "esa-keep<F>" the initial selection's best int(F x k) blocks first and the rest by the representations."""
        share = float(self.mode[len("esa-keep"):]) if self.mode.startswith("esa-keep") else 0.0
        keep = int(share * self.kept(self.prompt_len))
        if not keep:
            return reps
        scores = reps.clone()
        scores[torch.topk(self.prefill_scores[layer], keep).indices] = float("inf")
        return scores

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if query.shape[2] > 1:  # prefill: dense, and the initial selection is scored
            return super().__call__(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if self.mode == "dense":
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        layer, bs, n = module.layer_idx, self.block_size, self.prompt_len
        step = self.decode_calls.get(layer, 0)
        self.decode_calls[layer] = step + 1
        cands = slice(self.init, -(-n // bs) - self.local)
        q, prompt_keys = query[0, :, -1].float(), key[0, :, :n].float()
        if self.mode.startswith("oracle@"):
            self.scores[layer] = block_scores(q, prompt_keys, bs, "oracle")[cands]
        elif self.mode.startswith("esa"):
            due = self.pending.get(layer)
            if due and step >= due[0]:
                self.scores[layer] = self.later_selection(layer, due[1])
            if SCHEDULE.is_submit(step):
                self.pending[layer] = (step + SCHEDULE.lag + 1, block_scores(q, prompt_keys, bs, "sub16max")[cands])
        mask = self.allowed(layer, key.shape[2])
        bias = torch.zeros(1, 1, 1, key.shape[2], dtype=query.dtype)
        bias[..., ~mask] = float("-inf")
        return sdpa_attention_forward(module, query, key, value, bias, scaling=scaling, **kwargs)


def summarize(rows: list[dict], modes: list[str], gen: int) -> list[str]:
    """Markdown rows: per mode, answers kept vs the emulated dense decode, agreement, where tokens first differ."""
    out = ["| mode | answers (of prompts) | answers kept vs dense | token agreement (prefix) | identical 32 tokens "
           "| first difference at tokens 1-11 | at tokens 12-31 |", "|---|---|---|---|---|---|---|"]
    for mode in modes:
        rs = [r["modes"][mode] for r in rows]
        dense_ok = [r["modes"]["dense"]["correct"] for r in rows]
        kept = sum(1 for m, d in zip(rs, dense_ok, strict=True) if d and m["correct"])
        pre = [m["prefix"] for m in rs]
        early = sum(1 for p in pre if 0 < p * gen <= 11 or p == 0)
        late = sum(1 for p in pre if 12 <= p * gen < gen)
        out.append(f"| {mode} | {sum(m['correct'] for m in rs)} / {len(rs)} | {kept} / {sum(dense_ok)} "
                   f"| {100 * sum(pre) / len(pre):.1f}% | {sum(p == 1 for p in pre)} | {early} | {late} |")
    out += ["", "Answers the dense decode gives and a mode loses:", ""]
    for mode in modes[1:]:
        lost = [r["case_id"] for r in rows if r["modes"]["dense"]["correct"] and not r["modes"][mode]["correct"]]
        out.append(f"- **{mode}** ({len(lost)}): {', '.join(lost) or 'none'}")
    return out


def write_report(out: Path, rows: list[dict], args: argparse.Namespace, modes: list[str]) -> None:
    """The markdown beside the JSON: command, summary per mode, the lost answers, and ``args.note`` if given."""
    cmd = (f"python bench/accuracy/selection_ceiling.py --tasks {args.tasks} --contexts {args.contexts} "
           f"--depths {args.depths} --samples {args.samples} --block-size {args.block_size} --ratio {args.ratio:g} "
           f"--modes {args.modes}" + (f" --only {args.only}" if args.only else "") + f" --out {args.out}")
    lines = ["# Block selection against its ceiling: answers and token agreement (emulated)", "",
             f"- Command: `{cmd}`",
             f"- SmolLM2-135M-Instruct in transformers, float32, CPU; block {args.block_size}, init 1, local 2; "
             f"{len(rows)} prompts; {args.gen_tokens} tokens decoded greedily per mode from one dense prefill; "
             "agreement = common prefix with `dense` / 32.", ""]
    lines += summarize(rows, modes, args.gen_tokens)
    if args.note:
        lines += ["", Path(args.note).read_text().rstrip()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from ucm.eval.models import ensure_smollm2
    from ucm.eval.report import common_prefix

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--tasks", default="passkey,needle,multikey")
    p.add_argument("--contexts", default="2K,4K,8K")
    p.add_argument("--depths", default="5")
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--ratio", type=float, default=0.2, help="budget of the esa and initial modes")
    p.add_argument("--modes", default="dense,esa,initial,oracle@0.2,oracle@0.4")
    p.add_argument("--gen-tokens", type=int, default=32, help="the harness's value: prompt length and tokens decoded")
    p.add_argument("--only", default="", help="comma-separated case ids of the grid to run (default: all)")
    p.add_argument("--out", default="bench/results/accuracy_selection_ceiling")
    p.add_argument("--note", default=None, help="markdown file appended to the report (analysis of the results)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the markdown from the JSON at --out")
    args = p.parse_args()
    if args.report_only:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        run = argparse.Namespace(**{**saved["meta"]["args"], "note": args.note})
        write_report(Path(args.out), saved["rows"], run, list(saved["rows"][0]["modes"]))
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ("dense", "esa", "initial") and not (m.startswith("oracle@") and _is_ratio(m[7:])) \
                and not (m.startswith("esa-keep") and _is_ratio(m[8:])):
            p.error(f"--modes: unknown mode {m!r}; expected dense, esa, esa-keep<share in (0, 1]>, initial or "
                    "oracle@<ratio in (0, 1]>")
    if "dense" not in modes:
        modes.insert(0, "dense")
    model_path = args.model or ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(model_path)
    emu = CeilingEmulation(args.block_size)
    emu.scoring = "oracle-p8"  # ESA's initial selection: attention mass of the last 8 prompt queries
    AttentionInterface.register("esa_ceiling", emu)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="esa_ceiling")
    model.eval()
    cases = grid_cases(p, args, tok)
    rows, t0 = [], time.perf_counter()
    with torch.no_grad():
        for case in cases:
            ids = torch.tensor([case.prompt_token_ids])
            emu.mode = "dense"
            pre = model(ids, use_cache=True)
            first = pre.logits[0, -1].argmax()
            per_mode = {}
            for mode in modes:
                emu.mode = mode
                emu.ratio = float(mode[7:]) if mode.startswith("oracle@") else args.ratio
                tokens, text = greedy_decode(model, tok, emu, pre, first, args.gen_tokens)
                per_mode[mode] = {"tokens": tokens, "text": text, "correct": case.correct(text)}
            for m in per_mode.values():
                m["prefix"] = common_prefix(m["tokens"], per_mode["dense"]["tokens"]) / args.gen_tokens
            row = {"case_id": case.case_id, "prompt_digest": case.prompt_digest, "modes": per_mode}
            rows.append(row)
            print(json.dumps({"case_id": case.case_id, **{k: [v["correct"], v["prefix"]] for k, v in
                                                          per_mode.items()}}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model_path, "seconds": round(time.perf_counter() - t0, 1), "args": vars(args)}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    write_report(out, rows, args, modes)
    print(out.with_suffix(".json"), out.with_suffix(".md"))


def _is_ratio(text: str) -> bool:
    try:
        return 0 < float(text) <= 1
    except ValueError:
        return False


if __name__ == "__main__":
    main()
