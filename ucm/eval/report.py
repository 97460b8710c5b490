"""Scores and reports of the accuracy harness: metrics per setting, JSON, a markdown table and heat maps.

Owns the metrics: accuracy per task/context/depth, answers kept relative to full attention, token agreement of
the generated tokens with full attention, resident-block share (connector counters) and wall time. Reads the rows
`ucm.eval.runner` logged; called by `ucm.eval.__main__` after (or during, for partial reports) a run.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ucm.eval.tasks import Case


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _mean(xs: Sequence[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def _accuracy_tables(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_task_ctx: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    grid: dict[str, dict[str, dict[str, list[bool]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        by_task_ctx[r["task"]][str(r["context"])].append(r["correct"])
        grid[r["task"]][str(r["context"])][f"{r['depth']:.4f}"].append(r["correct"])
    return {
        "by_task_context": {t: {c: _mean(v) for c, v in cs.items()} for t, cs in by_task_ctx.items()},
        "grid": {t: {c: {d: _mean(v) for d, v in ds.items()} for c, ds in cs.items()} for t, cs in grid.items()},
    }


def summarize(
    rows: Sequence[dict[str, Any]], settings: Sequence[str], cases: Sequence[Case], gen_tokens: int
) -> dict[str, Any]:
    """Metrics of every setting over the cases of this run (rows of other runs or prompts are ignored)."""
    wanted = {(c.case_id, c.prompt_digest) for c in cases}
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    engine_start: dict[str, float] = {}
    for r in rows:
        if r.get("kind") == "engine":
            engine_start[r["setting"]] = r["start_s"]
        elif r.get("kind") == "case" and (r["case_id"], r["prompt_digest"]) in wanted:
            latest[(r["setting"], r["case_id"])] = r
    full = {cid: r for (s, cid), r in latest.items() if s == "full"}
    out: dict[str, Any] = {}
    for name in settings:
        rs = [r for (s, _), r in sorted(latest.items()) if s == name]
        if not rs:
            continue
        summary: dict[str, Any] = {
            "cases": len(rs),
            "complete": len(rs) == len(cases),
            "accuracy": _mean([r["correct"] for r in rs]),
            "accuracy_by_task": {
                t: _mean([r["correct"] for r in rs if r["task"] == t]) for t in sorted({r["task"] for r in rs})
            },
            **_accuracy_tables(rs),
            "wall_s_total": round(sum(r["wall_s"] for r in rs), 2),
            "wall_s_mean_by_context": {
                str(c): _mean([r["wall_s"] for r in rs if r["context"] == c])
                for c in sorted({r["context"] for r in rs})
            },
            "engine_start_s": round(engine_start.get(name, 0.0), 2),
        }
        # the connector's interval counters (docs/connector.md): blocks per sparse decode step, averaged over layers
        resident = sum(r["connector"].get("resident_block_steps", 0) for r in rs)
        full_blocks = sum(r["connector"].get("full_block_steps", 0) for r in rs)
        summary["resident_share"] = round(resident / full_blocks, 4) if full_blocks else None
        summary["sparse_requests"] = sum(r["connector"].get("sparse_requests", 0) for r in rs)
        summary["sparse_steps"] = sum(r["connector"].get("sparse_steps", 0) for r in rs)
        paired = [(r, full[r["case_id"]]) for r in rs if r["case_id"] in full]
        if paired and name != "full":
            prefix = [common_prefix(r["output_token_ids"], f["output_token_ids"]) / gen_tokens for r, f in paired]
            positional = [
                sum(a == b for a, b in zip(r["output_token_ids"], f["output_token_ids"], strict=False)) / gen_tokens
                for r, f in paired
            ]
            full_right = [(r, f) for r, f in paired if f["correct"]]
            summary["token_agreement_prefix"] = _mean(prefix)
            summary["token_agreement_positional"] = _mean(positional)
            summary["identical_outputs"] = _mean([r["output_token_ids"] == f["output_token_ids"] for r, f in paired])
            summary["kept_vs_full"] = _mean([r["correct"] for r, _ in full_right])
            summary["missed_vs_full"] = [
                {"case_id": r["case_id"], "answer": r["answer"], "text": r["text"]}
                for r, _ in full_right
                if not r["correct"]
            ]
            summary["gained_vs_full"] = [r["case_id"] for r, f in paired if r["correct"] and not f["correct"]]
        out[name] = summary
    return out


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}%" if pct else f"{x:.2f}"


def markdown(meta: dict[str, Any], summary: dict[str, Any]) -> str:
    """The report: one summary table, accuracy per task and context, and where sparse settings lose answers."""
    lines = [f"# Accuracy: {meta['title']}", ""]
    lines += [f"- Command: `{meta['command']}`", f"- Model: `{meta['model']}`; engine: {meta['engine']}"]
    lines += [f"- {meta['grid']}", f"- {meta['notes']}", ""]
    lines += [
        "| setting | passkey acc | needle acc | answers kept vs full | token agreement (prefix / positional) "
        "| identical 32-token outputs | resident-block share | mean s/prompt | cases |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        acc = s["accuracy_by_task"]
        walls = [s["wall_s_total"] / s["cases"]] if s["cases"] else []
        lines.append(
            f"| {name} | {_fmt(acc.get('passkey'))} | {_fmt(acc.get('needle'))} | {_fmt(s.get('kept_vs_full'))} "
            f"| {_fmt(s.get('token_agreement_prefix'))} / {_fmt(s.get('token_agreement_positional'))} "
            f"| {_fmt(s.get('identical_outputs'))} | {_fmt(s.get('resident_share'))} "
            f"| {_fmt(_mean(walls), pct=False)} | {s['cases']}{'' if s['complete'] else ' (partial)'} |"
        )
    lines += ["", "## Accuracy per task and context", ""]
    contexts = sorted({c for s in summary.values() for t in s["by_task_context"].values() for c in t}, key=int)
    tasks = sorted({t for s in summary.values() for t in s["by_task_context"]})
    header = "| setting | " + " | ".join(f"{t} {c}" for t in tasks for c in contexts) + " |"
    lines += [header, "|---" * (1 + len(tasks) * len(contexts)) + "|"]
    for name, s in summary.items():
        cells = [_fmt(s["by_task_context"].get(t, {}).get(c)) for t in tasks for c in contexts]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Where sparse settings lose answers that full attention gets", ""]
    any_miss = False
    for name, s in summary.items():
        misses = s.get("missed_vs_full")
        if misses:
            any_miss = True
            shown = ", ".join(m["case_id"] for m in misses)
            lines.append(f"- **{name}** ({len(misses)}): {shown}")
    if not any_miss:
        lines.append("- none: every answer full attention gets is also got by each sparse setting run so far.")
    if meta.get("note"):
        lines += ["", "## Notes", "", meta["note"].strip()]
    lines.append("")
    return "\n".join(lines)


def heatmap(path: Path, setting: str, summary: dict[str, Any]) -> None:
    """One PNG per setting: accuracy over context (rows) x depth (columns), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = summary["grid"]
    tasks = sorted(grid)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        contexts = sorted(grid[task], key=int)
        depths = sorted({d for c in contexts for d in grid[task][c]}, key=float)
        values = [[grid[task][c].get(d, float("nan")) for d in depths] for c in contexts]
        values = [[float("nan") if v is None else v for v in row] for row in values]
        im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{100 * float(d):.0f}" for d in depths])
        ax.set_yticks(range(len(contexts)), contexts)
        ax.set_xlabel("needle depth (%)")
        ax.set_ylabel("context (tokens)")
        ax.set_title(f"{setting}: {task} (acc {_fmt(summary['accuracy_by_task'].get(task))})")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if v == v:  # not NaN
                    ax.text(j, i, f"{v:.0%}" if v not in (0.0, 1.0) else ("✓" if v else "✗"), ha="center", va="center")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_report(
    out_dir: Path, name: str, meta: dict[str, Any], summary: dict[str, Any], rows: list[dict[str, Any]]
) -> list[Path]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>_<setting>.png``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    js = out_dir / f"{name}.json"
    js.write_text(json.dumps({"meta": meta, "settings": summary, "cases": rows}, indent=1) + "\n")
    md = out_dir / f"{name}.md"
    md.write_text(markdown(meta, summary))
    written += [js, md]
    for setting, s in summary.items():
        png = out_dir / f"{name}_{setting}.png"
        heatmap(png, setting, s)
        written.append(png)
    return written
