"""``python -m ucm.eval``: the accuracy harness CLI (ESA vs full attention on passkey and needle retrieval).

Builds the prompt grid (`ucm.eval.tasks`), runs every setting (`ucm.eval.settings`) through its own vLLM engine
(`ucm.eval.runner`, resumable through a JSONL log) and writes the report (`ucm.eval.report`). Example::

    python -m ucm.eval --contexts 2K,4K,8K --depths 11 --settings full,esa-r0.2-s10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from ucm.errors import UcmConfigError
from ucm.eval.settings import DEFAULT_SETTINGS, parse_settings
from ucm.eval.tasks import TASKS, build_cases, default_depths


def _contexts(text: str) -> list[int]:
    out = []
    for item in text.split(","):
        item = item.strip().upper()
        if not item:
            continue
        try:
            out.append(int(float(item[:-1]) * 1024) if item.endswith("K") else int(item))
        except ValueError:
            raise UcmConfigError("contexts", item, "token counts such as 2048 or 2K") from None
    if not out or min(out) <= 0:
        raise UcmConfigError("contexts", text, "a comma-separated list of positive token counts")
    return out


def _depths(text: str) -> list[float]:
    items = [x for x in text.split(",") if x.strip()]
    try:
        if len(items) == 1 and "." not in items[0] and int(items[0]) > 1:
            return default_depths(int(items[0]))
        return [float(x) for x in items]
    except ValueError:
        raise UcmConfigError("depths", text, "a count (e.g. 11) or comma-separated fractions (e.g. 0,0.5,1)") from None


def _tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            raise UcmConfigError("tasks", t, TASKS)
    return tasks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ucm.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local HF model folder (default: SmolLM2-135M-Instruct, converted)")
    p.add_argument("--tasks", default="passkey,needle", help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--contexts", default="2K,4K,8K", help="context lengths in tokens (prompt + generated)")
    p.add_argument("--depths", default="11", help="a count of evenly spaced depths, or fractions like 0,0.5,1")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help="full, dense-ucm, esa-r<ratio>-s<stride>")
    p.add_argument("--samples", type=int, default=1, help="prompts per (task, context, depth) cell")
    p.add_argument("--gen-tokens", type=int, default=32, help="greedy tokens generated per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys/needles")
    p.add_argument("--block-size", type=int, default=128, help="vLLM KV block size (tokens)")
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="engine max_model_len (default: the largest context); give the grid's value to add a subset to its log",
    )
    p.add_argument("--kv-cache-mb", type=int, default=512, help="vLLM KV cache memory (MiB)")
    p.add_argument("--store-mb", type=int, default=1024, help="UcmDram store size for connector settings (MiB)")
    p.add_argument("--esa-config", default="{}", help="JSON of further ESA fields (init_window_sz, ...)")
    p.add_argument(
        "--chat-template",
        choices=("auto", "on", "off"),
        default="off",
        help="wrap prompts in the chat template (auto: if the tokenizer has one); off: plain text, which SmolLM2-135M "
        "answers far better on passkey (1/10 vs 7/10 at 2K in a probe)",
    )
    p.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="vLLM prefix caching (same in every setting); on roughly halves the prefill work of a depth sweep",
    )
    p.add_argument(
        "--cpu-threads-bind",
        default="all",
        help="vLLM-CPU's VLLM_CPU_OMP_THREADS_BIND for every setting ('all': every core this process may use; "
        "'auto': vLLM's choice). Pinned by default because vLLM's auto binding reserves one more core when a KV "
        "connector is configured, so full and connector settings would otherwise run different thread counts "
        "and their bf16 results differ in the last bits",
    )
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--name", default="accuracy_smollm2", help="report file stem")
    p.add_argument("--log", default=None, help="JSONL result log (default: <out-dir>/<name>.log.jsonl); resumable")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report from the log")
    p.add_argument("--note", default=None, help="markdown file appended to the report (analysis of the results)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A killed run (SIGTERM) unwinds like Ctrl-C, so the engine's processes are shut down, not orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args = build_parser().parse_args(argv)
    tasks, contexts, depths = _tasks(args.tasks), _contexts(args.contexts), _depths(args.depths)
    settings = parse_settings(args.settings)
    try:
        esa_overrides: dict[str, Any] = json.loads(args.esa_config)
    except ValueError:
        raise UcmConfigError("esa-config", args.esa_config, "a JSON object") from None
    if args.gen_tokens < 1:
        raise UcmConfigError("gen-tokens", args.gen_tokens, "an integer >= 1")

    from transformers import AutoConfig, AutoTokenizer

    from ucm.eval import report, runner
    from ucm.eval.models import ensure_smollm2

    model = args.model or ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model)
    max_pos = getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None)
    if max_pos and max(contexts) > max_pos:
        raise UcmConfigError("contexts", max(contexts), f"at most the model's max_position_embeddings={max_pos}")
    if args.max_model_len is not None and args.max_model_len < max(contexts):
        raise UcmConfigError("max-model-len", args.max_model_len, f"at least the largest context {max(contexts)}")
    chat = {"auto": None, "on": True, "off": False}[args.chat_template]
    cases = build_cases(tokenizer, tasks, contexts, depths, args.gen_tokens, args.samples, args.seed, chat)
    eos = {i for i in [tokenizer.eos_token_id] if i is not None}
    engine_args = {
        "model": model,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len or max(contexts),
        "block_size": args.block_size,
        "kv_cache_memory_bytes": args.kv_cache_mb << 20,
        "enforce_eager": True,
        "enable_prefix_caching": args.prefix_caching,
        "max_num_seqs": 2,
        "seed": 0,
    }
    threads_bind = _threads_bind(args.cpu_threads_bind)
    if threads_bind is not None:
        # Read by vLLM's engine process when it starts (one engine per setting, all in this process's env).
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind
    env = {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")}
    key = runner.run_key(engine_args, esa_overrides, args.gen_tokens, env)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.log) if args.log else out_dir / f"{args.name}.log.jsonl"
    names = [s.name for s in settings]
    meta = {
        "title": f"{Path(model).name}, {', '.join(names)}",
        "command": "python -m ucm.eval " + shlex.join(_run_argv(argv)),
        "model": model,
        "engine": "vLLM " + _vllm_version() + f", block size {args.block_size}, greedy, enforce_eager, "
        f"prefix caching {'on' if args.prefix_caching else 'off'}, one request at a time, "
        f"VLLM_CPU_OMP_THREADS_BIND={env['VLLM_CPU_OMP_THREADS_BIND']} in every setting",
        "grid": f"tasks {', '.join(tasks)}; contexts {contexts} tokens (prompt = context - {args.gen_tokens} "
        f"generated); depths {depths}; {args.samples} sample(s) per cell; {len(cases)} prompts per setting",
        "notes": "accuracy = the key appears in the answer (up to the first EOS); token agreement compares the "
        f"first {args.gen_tokens} generated tokens with full attention (prefix = common-prefix length / "
        f"{args.gen_tokens}); resident-block share = blocks attended / blocks full attention reads, from the "
        "connector's counters (decode steps of sparse requests)",
        "esa_overrides": esa_overrides,
        "engine_args": engine_args,
        "env": env,
        "run_key": key,
        "log": str(log_path),
    }
    if args.note:
        meta["note"] = Path(args.note).read_text()

    def write() -> list[Path]:
        rows = [r for r in runner.load_log(log_path) if r.get("run_key") == key]
        summary = report.summarize(rows, names, cases, args.gen_tokens)
        case_rows = [r for r in rows if r.get("kind") == "case"]
        return report.write_report(out_dir, args.name, meta, summary, case_rows)

    if not args.report_only:
        from tqdm import tqdm

        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        with tqdm(total=len(cases) * len(settings), desc="accuracy", unit="prompt", disable=args.no_progress) as bar:
            for setting in settings:
                runner.run_setting(
                    setting, cases, engine_args, log_path, key, args.gen_tokens, decode, sorted(eos),
                    store_bytes=args.store_mb << 20, esa_overrides=esa_overrides, progress=bar,
                )  # fmt: skip
                write()  # partial report after every setting
    for path in write():
        print(path)
    return 0


def _threads_bind(value: str) -> str | None:
    """The VLLM_CPU_OMP_THREADS_BIND to pin (None: leave vLLM's auto binding)."""
    if value == "auto":
        return None
    if value == "all":
        return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    if not re.fullmatch(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*", value):
        raise UcmConfigError("cpu-threads-bind", value, "'all', 'auto' or a core list such as 0-3 or 0,2")
    return value


def _run_argv(argv: list[str]) -> list[str]:
    """The arguments that define the run (the report options are left out, so a re-render names the run)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--report-only", "--no-progress"):
            continue
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            out.append(a)
    return out


def _vllm_version() -> str:
    try:
        from vllm import __version__

        return str(__version__)
    except ImportError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
