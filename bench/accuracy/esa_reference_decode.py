"""ESA's selection emulated in plain transformers: what accuracy the algorithm itself gives, without vLLM or ucm.

For prompts of the accuracy harness, prefill is dense; at the end of prefill each layer scores the candidate blocks
(between init and local windows) with the last prompt token's query (averaged over each GQA group) against the mean
key of each block, keeps the top int(candidates x ratio), and every decode step of that layer then attends only to
the init blocks, the kept blocks, the local window and the generated tokens (a fixed initial selection: what
stride 10 uses for the first 10 steps, which produce the answer). Greedy. The answers are compared with the same
prompts' results of `python -m ucm.eval` (its JSONL log) when given, to tell the algorithm's misses from the
engine integration's. Writes JSON + markdown.

    python bench/accuracy/esa_reference_decode.py --contexts 2K --depths 10 --ratios 0.1,0.2,0.3 \
        --log bench/results/accuracy_smollm2.log.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from pathlib import Path

import torch


class EsaEmulation:
    """A transformers attention function: dense for prefill, fixed per-layer block selection for decode."""

    def __init__(self, block_size: int, init: int, local: int):
        self.block_size, self.init, self.local = block_size, init, local
        self.ratio = 0.2
        self.scoring = "mean"
        self.prompt_len = 0
        self.scores: dict[int, torch.Tensor] = {}  # layer -> candidate block scores (from the prefill's last query)
        self.prefill_scores: dict[int, torch.Tensor] = {}
        #: decode steps (0 = the first decode forward) whose own query re-scores the candidates, the new selection
        #: attended from the next step on (ESA's retrievals submitted at that step, consumed at the next)
        self.reselect_at: set[int] = set()
        self.decode_calls: dict[int, int] = {}
        self.dense_layers = 0  # the first N layers attend every block in decode (as Quest leaves its first two)
        #: the asked needle's blocks (prompt block indices) of the current case: the "needle" scoring keeps them
        #: first, and every scoring records their best rank among the candidates per layer
        self.needle_blocks: list[int] = []
        self.needle_ranks: dict[int, int] = {}

    def start_decode(self) -> None:
        """Every decode run starts from the selection scored at the end of prefill ("-g": one selection for all
        layers, the blocks ranked by their summed per-layer ranks, a Borda count)."""
        self.scores = dict(self.prefill_scores)
        if self.scoring.endswith("-g") and self.scores:
            ranks = torch.stack([s.argsort(descending=True).argsort() for s in self.scores.values()]).float()
            shared = -ranks.sum(0)
            self.scores = {layer: shared for layer in self.scores}
        self.decode_calls = {}

    def kept(self, prompt_len: int) -> int:
        """k: candidate blocks each layer keeps for a prompt of ``prompt_len`` tokens at `ratio`."""
        nb = -(-prompt_len // self.block_size)
        return int(len(range(self.init, nb - self.local)) * self.ratio)

    def allowed(self, layer: int, kv_len: int) -> torch.Tensor:
        bs, n = self.block_size, self.prompt_len
        nb = -(-n // bs)
        candidates = torch.arange(self.init, nb - self.local)
        k = self.kept(n)
        keep = candidates[torch.topk(self.scores[layer], k).indices] if k else candidates[:0]
        mask = torch.zeros(kv_len, dtype=torch.bool)
        mask[: self.init * bs] = True
        mask[(nb - self.local) * bs :] = True  # local window (incl. the partial last block) and generated tokens
        for b in keep.tolist():
            mask[b * bs : (b + 1) * bs] = True
        return mask

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = module.layer_idx
        if query.shape[2] > 1:  # prefill: dense; score the candidates with the last prompt token's query
            self.prompt_len = key.shape[2]
            bs, n = self.block_size, key.shape[2]
            scoring, window, pooled, union = split_scoring(self.scoring)
            if pooled:  # each of the last N prompt queries gives a distribution over blocks; they are summed
                score = sum(block_scores(query[0, :, -j].float(), key[0].float(), bs, scoring, union)
                            for j in range(1, pooled + 1))
            else:  # "-w<N>": the last N prompt queries summed into one query
                score = block_scores(query[0, :, -window:].float().sum(1), key[0].float(), bs, scoring, union)
            nb = -(-n // bs)
            if scoring == "needle":  # the task's truth: the needle blocks first, the rest by attention mass
                score = score.clone()
                score[..., [b for b in self.needle_blocks if b < score.shape[-1]]] += 1e6  # a needle may end the prompt
            if union:
                score = union_of_heads(score[:, self.init : nb - self.local])
            else:
                score = score[self.init : nb - self.local]
            self.scores[layer] = self.prefill_scores[layer] = score
            cands = [b - self.init for b in self.needle_blocks if self.init <= b < nb - self.local]
            if cands:  # 0 = the best candidate; -1: the needle lies in the init or local window (always attended)
                order = score.argsort(descending=True).argsort()
                self.needle_ranks[layer] = int(order[cands].min())
            else:
                self.needle_ranks[layer] = -1
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if layer < self.dense_layers:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        mask = self.allowed(layer, key.shape[2])
        bias = torch.zeros(1, 1, 1, key.shape[2], dtype=query.dtype)
        bias[..., ~mask] = float("-inf")
        step = self.decode_calls.get(layer, 0)
        self.decode_calls[layer] = step + 1
        if step in self.reselect_at:  # this step's query scores the prompt's candidates for the next steps
            bs, n = self.block_size, self.prompt_len
            scoring, _, _, union = split_scoring(self.scoring)
            score = block_scores(query[0, :, -1].float(), key[0, :, :n].float(), bs, scoring, union)
            score = score[..., self.init : -(-n // bs) - self.local]
            self.scores[layer] = union_of_heads(score) if union else score
        return sdpa_attention_forward(module, query, key, value, bias, scaling=scaling, **kwargs)


SCORINGS = ("needle", "mean", "sub32max", "sub16max", "sub8max", "headsoftmax", "sub32headsoftmax",
            "sub16headsoftmax", "oracle", "oraclemax", "quest<M>", "normtok<R>")
SCORING_NAME = re.compile(r"((mean|oracle|oraclemax|needle|headsoftmax|sub\d+(max|headsoftmax)|quest\d+|normtok\d+)"
                          r"(-w\d+)?|(oracle|oraclemax|headsoftmax|sub\d+headsoftmax)-p\d+)(-u)?(-g)?")
# any of them with "-w<N>" scores with the sum of the last N prompt tokens' queries (a prefill observation window);
# the distributions (oracle, *headsoftmax) with "-p<N>" sum the last N queries' distributions over blocks, each
# query counting once whatever its norm (SnapKV's pooled observation window, on block representations);
# any of them with "-u" ranks the blocks per KV head and keeps the union of every head's best blocks (round robin:
# each head's first choice, then each head's second, ...), so a head that alone finds the needle still gets its
# block (one block table for all heads, as vLLM's paged attention needs); "-g" (last): one selection shared by
# every layer, ranked by the sum of the layers' ranks (a block many layers rank high wins)


def split_scoring(name: str) -> tuple[str, int, int, bool]:
    """``(scoring, window, pooled, union)`` of a scoring name: "-w<N>" sums N queries, "-p<N>" N distributions,
    "-u" the union of the KV heads' rankings."""
    name = name.removesuffix("-g")  # one selection for all layers: applied in `EsaEmulation.start_decode`
    union = name.endswith("-u")
    base, _, window = name.removesuffix("-u").partition("-w")
    base, _, pooled = base.partition("-p")
    return base, int(window or 1), int(pooled or 0), union


def union_of_heads(per_head: torch.Tensor) -> torch.Tensor:
    """Scores [kvh, nb] -> [nb] whose top-k is the round-robin union of the heads' rankings (ties: the mean rank)."""
    ranks = torch.empty_like(per_head)
    order = per_head.argsort(dim=1, descending=True)
    ranks.scatter_(1, order, torch.arange(per_head.shape[1], dtype=per_head.dtype).expand_as(order).contiguous())
    return -(ranks.amin(0) + ranks.mean(0) / (per_head.shape[1] + 1))


def block_scores(q: torch.Tensor, keys: torch.Tensor, bs: int, scoring: str, per_head: bool = False) -> torch.Tensor:
    """Score of every full block for one query ``q`` [num_q_heads, d] over ``keys`` [kvh, n, d] (RoPE applied):
    [nb], or per KV head [kvh, nb] with ``per_head`` (the same score without the sum over KV heads).

    ``mean``: ESA as built (GQA-summed query · block-mean key, summed over KV heads). ``sub<M>max``: means of
    M-token sub-blocks, a block scores its best sub-block. ``headsoftmax``: per query head, softmax over blocks of
    q·mean/sqrt(d) (an estimate of the head's attention share per block), summed over heads, so a head that
    focuses on one block counts as much as one spread over all. ``sub<M>headsoftmax``: both (a block's logit per
    head is the log-sum-exp over its sub-blocks). ``quest<M>``: Quest's bound per M-token slice and KV head, from
    the channel-wise min and max of the slice's keys: sum over channels of max(q_c min_c, q_c max_c) >= q.k for
    every key of the slice, per query head, summed over the heads; a block scores its best slice (2 vectors per
    slice). ``normtok<R>``: R representative keys per block and KV head, those of the largest norm (chosen at
    prefill); a block scores, per KV head, its best representative against the GQA-summed query, summed over the
    KV heads (R vectors per block)."""
    if scoring == "needle":  # ranked by attention mass; the caller puts the needle blocks first
        scoring = "oracle"
    kvh, n, d = keys.shape
    groups = q.shape[0] // kvh
    nb = n // bs
    if scoring in ("oracle", "oraclemax"):  # the query's true attention mass per block (not ESA: an upper bound)
        probs = torch.softmax(torch.einsum("ghd,gtd->ght", q.view(kvh, groups, d), keys) / d**0.5, -1)
        mass = probs[..., : nb * bs].reshape(kvh, groups, nb, bs).sum(-1)  # [kvh, groups, nb]
        if scoring == "oraclemax":  # the largest share any one query head pays the block
            mass = mass.amax(1)
            return mass if per_head else mass.amax(0)
        mass = mass.sum(1)  # summed over the query heads
        return mass if per_head else mass.sum(0)
    quest = re.fullmatch(r"quest(\d+)", scoring)
    if quest:
        m = bs // int(quest[1])
        slices = keys[:, : nb * bs].reshape(kvh, nb * m, bs // m, d)
        lo, hi = slices.amin(2), slices.amax(2)  # [kvh, nb*m, d]
        qh = q.view(kvh, groups, 1, d)
        bound = torch.maximum(qh * lo[:, None], qh * hi[:, None]).sum(-1)  # [kvh, groups, nb*m]
        if per_head:
            return bound.sum(1).view(kvh, nb, m).amax(-1)
        return bound.sum((0, 1)).view(nb, m).amax(1)
    normtok = re.fullmatch(r"normtok(\d+)", scoring)
    if normtok:
        blocks = keys[:, : nb * bs].reshape(kvh, nb, bs, d)
        pick = blocks.norm(dim=-1).topk(min(int(normtok[1]), bs), dim=-1).indices  # [kvh, nb, R]
        reps = torch.gather(blocks, 2, pick[..., None].expand(-1, -1, -1, d))  # [kvh, nb, R, d]
        best = torch.einsum("gd,gbrd->gbr", q.view(kvh, groups, d).sum(1), reps).amax(-1)  # [kvh, nb]
        return best if per_head else best.sum(0)
    sliced = re.match(r"sub(\d+)", scoring)
    sub = int(sliced[1]) if sliced else bs
    m = bs // sub
    means = keys[:, : nb * bs].reshape(kvh, nb * m, sub, d).mean(2)  # [kvh, nb*m, d]
    if not scoring.endswith("headsoftmax"):  # mean, sub<M>max ("headsoftmax" also ends in "max")
        if per_head:
            s = torch.einsum("gd,gbd->gb", q.view(kvh, groups, d).sum(1), means)  # [kvh, nb*m]
            return s.view(kvh, nb, m).amax(-1)
        s = torch.einsum("gd,gbd->b", q.view(kvh, groups, d).sum(1), means)  # [nb*m]
        return s.view(nb, m).amax(1)
    logits = torch.einsum("ghd,gbd->ghb", q.view(kvh, groups, d), means) / d**0.5  # [kvh, groups, nb*m]
    logits = logits.reshape(kvh * groups, nb, m).logsumexp(-1)  # [heads, nb]
    share = torch.softmax(logits, -1)
    return share.view(kvh, groups, nb).sum(1) if per_head else share.sum(0)


def greedy_decode(model, tok, emu: EsaEmulation, pre, first: torch.Tensor, count: int) -> tuple[list[int], str]:
    """``count`` greedy tokens from a prefill's output ``pre`` (its cache copied, so later decodes start from the
    same prefill) whose first token is ``first``, with ``emu``'s decode selection: the tokens and the text up to
    the first EOS."""
    cache = copy.deepcopy(pre.past_key_values)
    emu.start_decode()
    tokens, nxt = [int(first)], first.view(1, 1)
    for _ in range(count - 1):
        nxt = model(nxt, past_key_values=cache, use_cache=True).logits[0, -1].argmax().view(1, 1)
        tokens.append(int(nxt))
    eos = tok.eos_token_id
    return tokens, tok.decode(tokens[: tokens.index(eos)] if eos in tokens else tokens, skip_special_tokens=True)


def grid_cases(p: argparse.ArgumentParser, args: argparse.Namespace, tok) -> list:
    """The harness's prompts for ``args``' grid (plain text, as `python -m ucm.eval` builds them by default, its
    --chat-template off), narrowed to ``args.only``'s case ids; an id not in the grid is a parser error."""
    from ucm.eval.__main__ import _contexts, _depths, _tasks
    from ucm.eval.tasks import build_cases

    grid = (_tasks(args.tasks), _contexts(args.contexts), _depths(args.depths))
    cases = build_cases(tok, *grid, args.gen_tokens, samples=args.samples, use_chat_template=False)
    if args.only:
        wanted = [c.strip() for c in args.only.split(",") if c.strip()]
        unknown = sorted(set(wanted) - {c.case_id for c in cases})
        if unknown:
            p.error(f"--only: {unknown} are not cases of this grid (task/context/depth/sample ids)")
        cases = [c for c in cases if c.case_id in wanted]
    return cases


def main() -> None:
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from ucm.eval.models import ensure_smollm2

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--tasks", default="passkey,needle")
    p.add_argument("--contexts", default="2K")
    p.add_argument("--depths", default="10")
    p.add_argument("--samples", type=int, default=1, help="prompts per (task, context, depth), as the harness's")
    p.add_argument("--ratios", default="0.1,0.2,0.3")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--scorings", default="mean", help=f"comma-separated, from {', '.join(SCORINGS)}")
    p.add_argument("--gen-tokens", type=int, default=32, help="the harness's value (sets the prompt length)")
    p.add_argument("--decode-tokens", type=int, default=10, help="tokens decoded here (the answer comes first)")
    p.add_argument("--log", default=None, help="the harness's JSONL log(s), comma-separated, to compare with vLLM + "
                   "ucm ESA")
    p.add_argument("--dense-layers", type=int, default=0, help="the first N layers attend every block in decode")
    p.add_argument("--reselect-at", default="", help="comma-separated decode steps (0 = the first) whose query "
                   "re-scores the candidates, attended from the next step (an early retrieval with a decode query)")
    p.add_argument("--only", default="", help="comma-separated case ids of the grid to run (default: all)")
    p.add_argument("--engine-setting", default=None, help="the harness setting to compare with (default "
                   "esa-r<ratio>-s10), e.g. esa-r0.2-s10-a8 (initial selection by attention)")
    p.add_argument("--out", default="bench/results/accuracy_esa_reference")
    args = p.parse_args()
    for scoring in args.scorings.split(","):  # a misspelt name would silently score as headsoftmax
        if not SCORING_NAME.fullmatch(scoring):
            p.error(f"--scorings: unknown scoring {scoring!r}; expected one of {', '.join(SCORINGS)}")
    model_path = args.model or ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(model_path)
    emu = EsaEmulation(args.block_size, init=1, local=2)
    emu.reselect_at = {int(x) for x in args.reselect_at.split(",") if x.strip()}
    emu.dense_layers = args.dense_layers
    AttentionInterface.register("esa_emulation", emu)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="esa_emulation")
    model.eval()
    cases = grid_cases(p, args, tok)
    ratios = [float(r) for r in args.ratios.split(",")]
    engine: dict[tuple[str, str], bool] = {}
    if args.log:
        digests = {c.case_id: c.prompt_digest for c in cases}
        log_lines = [line for log in args.log.split(",") for line in Path(log).read_text().splitlines()]
        for line in log_lines:
            r = json.loads(line)
            if r.get("kind") == "case" and digests.get(r["case_id"]) == r["prompt_digest"]:
                engine[(r["setting"], r["case_id"])] = r["correct"]
    rows = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for case in cases:
            ids = torch.tensor([case.prompt_token_ids])
            emu.needle_blocks = case.needle_blocks(args.block_size)
            for scoring, ratio in [(sc, r) for sc in args.scorings.split(",") for r in ratios]:
                emu.ratio = ratio
                if scoring != emu.scoring or ratio == ratios[0]:  # the prefill call scores the blocks
                    emu.scoring = scoring
                    pre = model(ids, use_cache=True)
                    first = pre.logits[0, -1].argmax()
                tokens, text = greedy_decode(model, tok, emu, pre, first, args.decode_tokens)
                setting = args.engine_setting or f"esa-r{ratio:g}-s10"
                k = emu.kept(len(case.prompt_token_ids))
                ranks = [emu.needle_ranks.get(i) for i in range(len(emu.needle_ranks))]
                row = {"case_id": case.case_id, "ratio": ratio, "scoring": scoring, "reselect_at": args.reselect_at,
                       "dense_layers": args.dense_layers, "needle_blocks": emu.needle_blocks,
                       "needle_rank_per_layer": ranks, "k": k, "engine_setting": setting,
                       # -1: the needle lies in the init or local window, attended in every layer
                       "needle_kept_layers": sum(1 for x in ranks if x is not None and x < k),
                       "correct": case.correct(text), "text": text,
                       "engine_correct": engine.get((setting, case.case_id)),
                       "full_correct": engine.get(("full", case.case_id))}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model_path, "seconds": round(time.perf_counter() - t0, 1), "args": vars(args)}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# ESA selection emulated in transformers vs vLLM + ucm ESA (same prompts)",
        "",
        f"- Command: `python bench/accuracy/esa_reference_decode.py --tasks {args.tasks} --contexts {args.contexts} "
        f"--depths {args.depths} --samples {args.samples} --ratios {args.ratios} --scorings {args.scorings} "
        f"--reselect-at '{args.reselect_at}'" + (f" --only {args.only}" if args.only else "")
        + f" --dense-layers {args.dense_layers} --decode-tokens {args.decode_tokens} --log {args.log}"
        + (f" --engine-setting {args.engine_setting}" if args.engine_setting else "") + "`",
        "- Emulation: fixed initial selection (last prompt token's query vs block-mean keys, per layer), block "
        f"{args.block_size}, init 1, local 2; greedy {args.decode_tokens} tokens. Engine: the harness's "
        f"`{args.engine_setting or 'esa-r<ratio>-s10'}` answers from its log; full: the harness's full-attention "
        "answers.",
        "",
        "| ratio | scoring | prompts | full correct | emulation correct | engine (vLLM + ucm ESA) correct "
        "| emulation kept vs full | engine kept vs full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ratio, scoring in [(r, sc) for r in ratios for sc in args.scorings.split(",")]:
        rs = [r for r in rows if r["ratio"] == ratio and r["scoring"] == scoring]
        fr = [r for r in rs if r["full_correct"]]
        eng = [r["engine_correct"] for r in rs if r["engine_correct"] is not None]
        eng_fr = [r["engine_correct"] for r in fr if r["engine_correct"] is not None]

        def pct(xs: list) -> str:
            return f"{100 * sum(xs) / len(xs):.0f}% ({sum(xs)}/{len(xs)})" if xs else "–"

        full_ok = pct([bool(r["full_correct"]) for r in rs])
        lines.append(
            f"| {ratio:g} | {scoring} | {len(rs)} | {full_ok} | {pct([r['correct'] for r in rs])} "
            f"| {pct(eng)} | {pct([r['correct'] for r in fr])} | {pct(eng_fr)} |"
        )
    lost = sorted({r["case_id"] for r in rows if r["full_correct"] and r["engine_correct"] is False})
    if lost:
        scorings = args.scorings.split(",")
        lines += ["", f"Prompts full attention answers and the engine's `{rows[0]['engine_setting']}` does not: per "
                  "scoring, the emulated answer and the layers whose kept blocks hold the asked needle (of "
                  f"{len(rows[0]['needle_rank_per_layer'])}; `window`: the needle lies in the init or local window, "
                  "attended in every layer); k = blocks kept per layer.", "",
                  "| case | k | " + " | ".join(scorings) + " |", "|---|---|" + "---|" * len(scorings)]
        for cid in lost:
            cells, k = [], None
            for scoring in scorings:
                r = next((r for r in rows if r["case_id"] == cid and r["scoring"] == scoring), None)
                if r is None:
                    cells.append("-")
                    continue
                k = r["k"]
                window = all(x == -1 for x in r["needle_rank_per_layer"])
                kept = "window" if window else f"{r['needle_kept_layers']} layers"
                cells.append(f"{'right' if r['correct'] else 'wrong'} ({kept}): {r['text'].strip()[:24]!r}")
            lines.append(f"| {cid} | {k} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".json"), out.with_suffix(".md"))


if __name__ == "__main__":
    main()
