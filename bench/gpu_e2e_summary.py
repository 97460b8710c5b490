"""The standing of ESA vs dense in vLLM on the GPU: one row per case, picked from `bench/gpu_e2e.py` result files.

`gpu_e2e.py` writes one file per run, and the GPU leases are short: the current number of each case comes from
whichever run measured it last. This gathers them into the report the GPU issue asks for (`gpu_e2e.{json,md,png}`),
each row naming its GPU, commit and source file; a case is compared only within one file (dense and ESA from the
same run) unless a second file is named for dense. Cases with no pick are listed as not measured.

    python bench/gpu_e2e_summary.py --out bench/results/gpu_e2e \\
        --pick 32Kx8=bench/results/gpu_runs/e2e_32k8_h100_f2b41f6.json ...

``--pick CASE=ESA_FILE[@SETTING][,DENSE_FILE]``: the ESA row of CASE from ESA_FILE (the row with ESA's defaults,
`esa-ahead` at prefetch_ratio 0.4, unless ``@SETTING`` names another) and the dense row from DENSE_FILE (default:
the same file).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: case -> (ESA / dense decode tok/s asked for, what the issue says)
TARGETS = {"32Kx1": (1.0, "no slower than dense"), "32Kx8": (1.8, ">= 1.8x"), "128Kx1": (1.0, "no slower than dense"),
           "128Kx4": (2.5, ">= 2.5x"), "capacity": (2.5, ">= 2.5x throughput at capacity (32K)")}
#: ESA's default prefetch_ratio (`ucm.sparse.config.EsaConfig`); 0 before 2026-12-06's seventh session
DEFAULT_PREFETCH = 0.4
#: settings that spell out a prefetch_ratio: `esa-noahead` 0, `esa-ahead` the run's --ahead-ratio (0.25 where the
#: run does not record it, its default then); ESA's defaults are the one whose ratio is DEFAULT_PREFETCH
RATIO_SETTINGS = ("esa-ahead", "esa-noahead")
ROW_KEYS = ("case", "context", "batch", "setting", "decode_tok_s", "tpot_ms_median", "tpot_ms_p90", "ttft_s",
            "resident_share", "gpu", "vllm", "commit")


def _rows(path: Path) -> list[dict]:
    """The run's rows, each with ``prefetch_ratio`` where its setting spells one out."""
    try:
        run = json.loads(path.read_text())
        rows = run["rows"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"--pick: cannot read the rows of {path}: {exc}") from exc
    ahead = run.get("ahead_ratio", 0.25)
    if "ahead_ratio" not in run and "--ahead-ratio" in run.get("command", ""):
        ahead = float(run["command"].split("--ahead-ratio", 1)[1].split()[0])
    for row in rows:
        if row.get("setting") in RATIO_SETTINGS:
            row["prefetch_ratio"] = 0.0 if row["setting"] == "esa-noahead" else ahead
    return rows


def _is_default(row: dict) -> bool:
    return row.get("prefetch_ratio") == DEFAULT_PREFETCH


def _find(rows: list[dict], case: str, settings: tuple[str, ...], path: Path) -> dict:
    for setting in settings:
        for row in rows:
            if row.get("case") == case and row.get("setting") == setting and row.get("decode_tok_s"):
                return row
    raise SystemExit(f"--pick: {path} has no measured {case} row of setting {' or '.join(settings)}")


def pick(spec: str) -> tuple[dict, dict]:
    """The (dense, ESA) rows of one ``--pick`` value, each as the issue's JSON row plus its source file."""
    case, sep, files = spec.partition("=")
    if not sep or case not in TARGETS:
        raise SystemExit(f"--pick: {spec!r}: expected CASE=FILE with CASE one of {sorted(TARGETS)}")
    esa_part, _, dense_file = files.partition(",")
    esa_file, _, setting = esa_part.partition("@")
    esa_path = Path(esa_file)
    dense_path = Path(dense_file) if dense_file else esa_path
    esa_rows = _rows(esa_path)
    if setting:
        esa = _find(esa_rows, case, (setting,), esa_path)
    else:
        esa = next((r for r in esa_rows if r.get("case") == case and _is_default(r) and r.get("decode_tok_s")), None)
        if esa is None:
            raise SystemExit(f"--pick: {esa_path} has no measured {case} row with ESA's defaults (prefetch_ratio "
                             f"{DEFAULT_PREFETCH}): name its setting with @SETTING")
    dense = _find(_rows(dense_path), case, ("dense",), dense_path)
    # a setting other than ESA's defaults: the defaults' rate in the same run, when it has them, goes with it
    defaults = None if _is_default(esa) else next(
        (r for r in esa_rows if r.get("case") == case and _is_default(r) and r.get("decode_tok_s")), None)
    out = []
    for row, path, name in ((dense, dense_path, "dense"), (esa, esa_path, "esa")):
        kept = {k: row.get(k) for k in ROW_KEYS}
        kept.update(setting=name, run_setting=row["setting"], source=str(path))
        if row.get("split"):
            kept["split"] = row["split"]
        if name == "esa" and not _is_default(row):
            kept["defaults_decode_tok_s"] = defaults["decode_tok_s"] if defaults else None
        out.append(kept)
    return out[0], out[1]


def markdown(pairs: dict[str, tuple[dict, dict]], command: str) -> str:
    lines = ["# ESA vs dense decode in vLLM on the GPU: where each case stands", "",
             "Llama-3-8B shape, dummy weights, bf16, FLASH_ATTN + CUDA graphs; ESA sparse_ratio 0.2, "
             "retrieval_stride 10, UcmDram. Each row: dense and ESA from the run named (same engine flags, same GPU "
             "kind; dense from a second run where said); decode tok/s over the steady window; per-run detail in "
             "the source file's `.md`, why each target is missed in `gpu_e2e_notes.md`.", "",
             f"Command: `{command}`", "",
             "| case | batch (dense / ESA) | GPU | dense tok/s | ESA tok/s | **ESA / dense** | target | met | "
             "TPOT median ms (dense / ESA) | TPOT p90 ms | TTFT s | ESA resident share | ESA setting | commits | "
             "sources |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, (goal, text) in TARGETS.items():
        if case not in pairs:
            lines.append(f"| {case} | - | - | - | - | **not measured** | {text} | - | - | - | - | - | - | - | - |")
            continue
        d, e = pairs[case]
        ratio = e["decode_tok_s"] / d["decode_tok_s"]
        gpus = d["gpu"] if d["gpu"] == e["gpu"] else f"{d['gpu']} / {e['gpu']}"
        commits = d["commit"] if d["commit"] == e["commit"] else f"{d['commit']} / {e['commit']}"
        sources = d["source"] if d["source"] == e["source"] else f"{d['source']} / {e['source']}"
        sources = sources.replace("bench/results/", "")
        lines.append(
            f"| {case} | {d['batch']} / {e['batch']} | {gpus} | {d['decode_tok_s']:.1f} | {e['decode_tok_s']:.1f} | "
            f"**{ratio:.2f}x** | {text} | {'yes' if ratio >= goal else 'no'} | {d['tpot_ms_median']} / "
            f"{e['tpot_ms_median']} | {d['tpot_ms_p90']} / {e['tpot_ms_p90']} | {d['ttft_s']} / {e['ttft_s']} | "
            f"{e['resident_share']} | {e['run_setting']} | {commits} | {sources} |")
    others = [(case, d, e) for case, (d, e) in pairs.items() if "defaults_decode_tok_s" in e]
    if others:
        lines += ["", f"Rows whose ESA setting is not ESA's defaults (prefetch_ratio {DEFAULT_PREFETCH}; the "
                  "setting's configuration is in its source run's command and `.md`):"]
        for case, d, e in others:
            same = e["defaults_decode_tok_s"]
            lines.append(f"- {case}: `{e['run_setting']}`; ESA's defaults in the same run: " + (
                f"{same:.1f} tok/s ({same / d['decode_tok_s']:.2f}x)." if same else "not run."))
    split = [(case, e) for case, (_, e) in pairs.items() if e.get("split")]
    if split:
        lines += ["", "ESA time split (means per decode step of the longest request; host = time in the sparse "
                  "hooks, of which waiting for store loads; loaded = per-layer blocks from UcmDram over PCIe):", "",
                  "| case | host ms / step | load wait ms / step | retrievals / step | layer blocks loaded / step "
                  "| of which ahead |", "|---|---|---|---|---|---|"]
        for case, e in split:
            sp = e["split"]
            lines.append(f"| {case} | {sp['host_ms_per_step']:.2f} | {sp['load_wait_ms_per_step']:.2f} | "
                         f"{sp['retrievals_per_step']:.1f} | {sp['layer_blocks_loaded_per_step']:.0f} | "
                         f"{sp.get('layer_blocks_prefetched_per_step', 0):.0f} |")
    return "\n".join(lines) + "\n"


def plot(pairs: dict[str, tuple[dict, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(pairs)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for offset, (index, name, color) in ((-0.2, (0, "dense", "tab:blue")), (0.2, (1, "ESA", "tab:red"))):
        values = [pairs[c][index]["decode_tok_s"] for c in cases]
        ax.bar([i + offset for i in range(len(cases))], values, width=0.4, label=name, color=color)
    for i, c in enumerate(cases):
        d, e = pairs[c]
        ax.annotate(f"{e['decode_tok_s'] / d['decode_tok_s']:.2f}x\n{e['gpu'].replace('NVIDIA ', '')[:9]}",
                    (i, max(d["decode_tok_s"], e["decode_tok_s"])), textcoords="offset points", xytext=(0, 3),
                    ha="center", fontsize=7)
    ax.set_xticks(range(len(cases)), [f"{c}\n(ctx {pairs[c][0]['context']})" for c in cases], fontsize=8)
    ax.set_ylabel("decode tokens/s (steady window)")
    ax.set_title("ESA (sparse_ratio 0.2) vs dense, vLLM 0.26, Llama-3-8B shape", fontsize=9)
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pick", action="append", default=[], help="CASE=ESA_FILE[@SETTING][,DENSE_FILE]")
    parser.add_argument("--out", default="bench/results/gpu_e2e", help="path without suffix (.json/.md/.png)")
    args = parser.parse_args(argv)
    if not args.pick:
        parser.error("--pick: at least one CASE=FILE")
    pairs: dict[str, tuple[dict, dict]] = {}
    for spec in args.pick:
        dense, esa = pick(spec)
        pairs[dense["case"]] = (dense, esa)
    command = "python bench/gpu_e2e_summary.py " + " ".join(
        f"--pick {p}" for p in args.pick) + f" --out {args.out}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for pair in pairs.values() for r in pair]
    out.with_suffix(".json").write_text(json.dumps({"command": command, "targets": TARGETS, "rows": rows,
                                                    "not_measured": [c for c in TARGETS if c not in pairs]},
                                                   indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(pairs, command))
    try:
        plot(pairs, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib not importable: no plot")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
