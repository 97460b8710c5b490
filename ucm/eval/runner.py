"""Runs the cases of one attention setting through one vLLM engine and appends each result to a JSONL log.

Owns the engine's lifetime (one `vllm.LLM` per setting, reused over all prompts, shut down afterwards), greedy
decoding, per-prompt wall time and the connector's statistics (read from vLLM's per-step scheduler stats). The log
makes a run resumable: cases already answered under the same run key and prompt are skipped. Called by
`ucm.eval.__main__`; `ucm.eval.report` reads the log.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ucm.eval.settings import Setting
from ucm.eval.tasks import Case


class ConnectorStatsRecorder:
    """Sums the connector's counters that vLLM hands to its stat loggers after every engine step.

    Registered next to vLLM's own loggers (`StatLoggerManager.stat_loggers`), so it sees the same
    ``SchedulerStats.kv_connector_stats`` payload the "KV Transfer metrics" log line is made of.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0):
        data = getattr(scheduler_stats, "kv_connector_stats", None) or {}
        for name, value in data.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.totals[name] = self.totals.get(name, 0) + value

    def snapshot(self) -> dict[str, float]:
        return dict(self.totals)

    # The rest of vLLM's logger interface: nothing to do.
    def log(self) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass

    def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_admission_rejection(self, *args: Any, **kwargs: Any) -> None:
        pass


def stats_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def run_key(
    engine_args: dict[str, Any],
    esa_overrides: dict[str, Any] | None,
    gen_tokens: int,
    env: dict[str, str] | None = None,
) -> str:
    """Identity of everything besides the prompt and the setting that changes an answer (``env``: the environment
    variables that change numerics, e.g. vLLM-CPU's thread binding)."""
    payload: dict[str, Any] = {"engine": engine_args, "esa": esa_overrides or {}, "gen": gen_tokens}
    if env:
        payload["env"] = env
    blob = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_log(path: Path) -> list[dict[str, Any]]:
    """Every complete line of the JSONL log (a line cut by a killed run is ignored)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def done_cases(rows: Iterable[dict[str, Any]], key: str, setting: str) -> set[tuple[str, str]]:
    return {
        (r["case_id"], r["prompt_digest"])
        for r in rows
        if r.get("kind") == "case" and r.get("run_key") == key and r.get("setting") == setting
    }


def _append(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()


def run_setting(
    setting: Setting,
    cases: Sequence[Case],
    engine_args: dict[str, Any],
    log_path: Path,
    key: str,
    gen_tokens: int,
    decode: Callable[[list[int]], str],
    eos_token_ids: Sequence[int],
    store_bytes: int,
    esa_overrides: dict[str, Any] | None = None,
    progress: Any = None,
) -> int:
    """Answer the cases of ``setting`` not yet in the log; returns how many were run.

    Each case is one request (so its wall time and connector counters are its own), greedy, exactly ``gen_tokens``
    tokens (EOS ignored so every setting is compared over the same length; the answer is scored up to the first
    EOS).
    """
    done = done_cases(load_log(log_path), key, setting.name)
    todo = [c for c in cases if (c.case_id, c.prompt_digest) not in done]
    # Deepest needle first: the next prompt of the same task and context shares the prefix up to its own needle,
    # so vLLM's prefix cache (when on) skips that part of the prefill, in every setting alike.
    todo.sort(key=lambda c: (c.task, c.context, -c.depth, c.sample))
    if progress is not None:
        progress.update(len(cases) - len(todo))
    if not todo:
        return 0
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        **engine_args,
        disable_log_stats=False,
        kv_transfer_config=setting.kv_transfer_config(store_bytes, esa_overrides),
    )
    recorder = ConnectorStatsRecorder()
    llm.llm_engine.logger_manager.stat_loggers.append(recorder)
    _append(log_path, {"kind": "engine", "run_key": key, "setting": setting.name, "start_s": time.perf_counter() - t0})
    params = SamplingParams(temperature=0.0, max_tokens=gen_tokens, ignore_eos=True, detokenize=False)
    eos = set(eos_token_ids)
    try:
        for case in todo:
            before = recorder.snapshot()
            t = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": list(case.prompt_token_ids)}], params, use_tqdm=False)[0]
            wall = time.perf_counter() - t
            tokens = list(out.outputs[0].token_ids)
            answer_tokens = tokens
            for i, tok in enumerate(tokens):
                if tok in eos:
                    answer_tokens = tokens[:i]
                    break
            text = decode(answer_tokens)
            row = {
                "kind": "case",
                "run_key": key,
                "setting": setting.name,
                **case.describe(),
                "output_token_ids": tokens,
                "text": text,
                "correct": case.correct(text),
                "wall_s": round(wall, 4),
                "connector": stats_delta(before, recorder.snapshot()),
            }
            _append(log_path, row)
            if progress is not None:
                progress.update(1)
                progress.set_postfix_str(f"{setting.name} {case.case_id} {'ok' if row['correct'] else 'miss'}")
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return len(todo)
