"""Correctness of UnifiedCacheConnectorV1 (+ ESA) inside the real vLLM engine, one JSON verdict per check.

Every engine runs in its own subprocess (GPU memory is freed between engines; the UcmNfsStore checks need
separate processes anyway). Greedy decoding, ``ignore_eos``, random prompt token ids (seeded), 2-4K-token prompts;
the connector is configured only through ``KVTransferConfig`` and read back only through the per-request summary
``RequestOutput.kv_transfer_params["ucm"]`` (hit_blocks, loaded_blocks, load_failed_blocks, sparse.resident_share).

Checks (``--checks`` picks a subset by letter):

- ``a_dram_connector_identical`` / ``a_nfs_connector_identical``: the connector without a sparse method (UcmDram,
  UcmNfsStore) gives the same greedy tokens as plain vLLM (no connector) for the same batch;
- ``b_dram_prefix_reuse``: the same engine, vLLM's prefix cache reset, runs the prompts again: ``hit_blocks > 0``
  for every prompt of 2+ blocks and identical tokens;
- ``b_nfs_prefix_reuse_other_process``: a second engine process on the same UcmNfsStore directory
  (``storage_backends``) finds the first engine's blocks (``hit_blocks > 0``), identical tokens;
- ``c_nfs_corrupt_block_recomputed``: bytes in the middle of one ``*.kv`` file are flipped; the next engine
  reports ``load_failed_blocks > 0`` and still gives identical tokens (vLLM recomputes the failed blocks);
- ``d_esa_ratio1_matches_dense_connector``: ESA at ``sparse_ratio`` 1.0 (keeps every block) gives the tokens of the
  dense connector, and the connector reports a sparse summary (ESA really ran);
- ``e_esa_batch1`` / ``e_esa_batch8_continuous`` / ``e_esa_preemption``: ESA at 0.2 (retrieval_stride 10, init 1,
  local 2, min_blocks 4): one long request; 6 long + 2 short requests added at different steps (continuous
  batching); 4 long requests prefilled in parallel chunks into a KV pool (``num_gpu_blocks_override``) too small
  for them, so vLLM must preempt (counted from vLLM's ``vllm:num_preemptions`` metric). Every request must finish
  with its max_tokens and every long request must report ``resident_share <= 0.30``.

A token mismatch is reported with the first differing position and the reference's top-2 logprob margin there
(a margin near 0 is a numerical near-tie, not a wrong block).

Model: a random Llama (``ucm.eval.models.make_tiny_llama``: 4 layers, hidden 1024, 8 heads / 2 KV heads, head dim
128, vocab 32000; random normal weights, std 0.05, so greedy logits are not near-ties), run in ``--dtype``
(default float32: greedy identity is stable; the vLLM attention backend is then not FlashAttention, which has no
float32 kernel; ``--dtype bfloat16`` runs FA). ``--weights dummy`` uses vLLM's dummy loader instead.

On the H200 (vLLM 0.26; 9 engine starts, roughly 6-10 min). Under a 10-minute limit per command, split it (the
letters are independent; ``--merge`` keeps the other half's checks in the JSON)::

    VLLM_USE_FLASHINFER_SAMPLER=0 python bench/gpu_correctness.py --out bench/results/gpu_correctness.json
    # or: ... --checks abc --time-budget-s 560  then  ... --checks de --merge --time-budget-s 560

CPU smoke test (tiny Llama: 2 layers, head dim 64; ~1200-token prompts, block 32, enforce_eager, in-process
engines, OpenMP threads pinned to the same cores for every engine)::

    .venv/bin/python bench/gpu_correctness.py --smoke --out /tmp/gpu_correctness_smoke.json

Exit code 0 when every engine started and ran (checks may still fail: the JSON says which), 3 when an engine
could not start or died, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

CONNECTOR = "UnifiedCacheConnectorV1"
MODULE = "ucm.integration.vllm.uc_connector"
ERROR_LINE = re.compile(r"\b[A-Z]\w*(Error|Exception): ")
RESULT_TAG = "GPU_CORR_RESULT "
ESA_02 = {"sparse_ratio": 0.2, "retrieval_stride": 10, "init_window_sz": 1, "local_window_sz": 2, "min_blocks": 4}
ESA_10 = dict(ESA_02, sparse_ratio=1.0)
SHARE_LIMIT = 0.30
GPU_MODEL = {"num_layers": 4, "hidden_size": 1024, "num_heads": 8, "num_kv_heads": 2, "intermediate_size": 2816,
             "vocab_size": 32000, "max_position_embeddings": 16384}
SMOKE_MODEL = {"num_layers": 2, "hidden_size": 256, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 512,
               "vocab_size": 2048, "max_position_embeddings": 8192}  # make_tiny_llama's defaults, head dim 64
ALL_CHECKS = "abcde"


def log(msg: str) -> None:
    print(f"[gpu_correctness {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ids(seed: str, n: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab - 10) for _ in range(n)]


# ============================================================================ child: one engine, several runs
def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - informational only
        pass
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"cpu: {model} ({len(os.sched_getaffinity(0))} cores usable)"


def _margins(logprobs) -> list[float] | None:
    """Top-1 minus top-2 logprob per generated position (None when logprobs were not returned)."""
    if not logprobs:
        return None
    out = []
    try:
        for pos in logprobs:
            vals = sorted((lp.logprob for lp in pos.values()), reverse=True)
            out.append(round(vals[0] - vals[1], 5) if len(vals) > 1 else None)
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None
    return out


def drive(engine, requests: list[dict], logprobs: int) -> dict:
    """Step the engine by hand, adding each request at its ``at_step``; returns per-request outputs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    pending = sorted(requests, key=lambda r: r.get("at_step", 0))
    names: dict[str, str] = {}
    added_at: dict[str, int] = {}
    results: dict[str, dict] = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and not engine.has_unfinished_requests():
            step = max(step, pending[0].get("at_step", 0))
        while pending and pending[0].get("at_step", 0) <= step:
            r = pending.pop(0)
            params = SamplingParams(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True, detokenize=False,
                                    logprobs=logprobs or None)
            rid = engine.add_request(r["name"], TokensPrompt(prompt_token_ids=r["ids"]), params)
            names[r["name"]] = r["name"]
            if isinstance(rid, str):
                names[rid] = r["name"]  # vLLM may know the request under an internal id
            added_at[r["name"]] = step
        for out in engine.step():
            if not out.finished:
                continue
            name = names.get(out.request_id, out.request_id)
            comp = out.outputs[0]
            results[name] = {
                "tokens": list(comp.token_ids),
                "finish_reason": comp.finish_reason,
                "ucm": (out.kv_transfer_params or {}).get("ucm"),
                "margins": _margins(comp.logprobs) if logprobs else None,
                "added_at_step": added_at.get(name),
                "finished_at_step": step,
            }
        step += 1
    return results


def preemptions(llm) -> int | None:
    try:
        metrics = llm.get_metrics()
    except Exception:  # noqa: BLE001 - stats logging off or not supported
        return None
    total = None
    for m in metrics:
        if "num_preemptions" in getattr(m, "name", "") and hasattr(m, "value"):
            total = (total or 0) + int(m.value)
    return total


def engine_main(job: dict) -> int:
    import vllm
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs = dict(job["engine_kwargs"])
    if job.get("extra_config") is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector=CONNECTOR, kv_connector_module_path=MODULE, kv_role="kv_both",
            kv_connector_extra_config=job["extra_config"],
        )
    result: dict = {"name": job["name"], "vllm": vllm.__version__, "runs": {}, "reset_ok": []}
    started = time.perf_counter()
    try:
        llm = LLM(**kwargs)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        traceback.print_exc()
        result["start_error"] = f"{type(exc).__name__}: {exc}"[-2000:]
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 3
    result["start_s"] = round(time.perf_counter() - started, 1)
    result["device"] = device_name()
    log(f"engine {job['name']} up in {result['start_s']} s")
    for run in job["runs"]:
        if run.get("reset_before"):
            ok = llm.reset_prefix_cache() if hasattr(llm, "reset_prefix_cache") else None
            result["reset_ok"].append(ok)
        t = time.perf_counter()
        try:
            result["runs"][run["label"]] = drive(llm.llm_engine, run["requests"], job.get("logprobs", 0))
        except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others
            traceback.print_exc()
            result["runs"][run["label"]] = {"error": f"{type(exc).__name__}: {exc}"[-1500:]}
        log(f"engine {job['name']} run {run['label']}: {len(run['requests'])} requests in "
            f"{time.perf_counter() - t:.1f} s")
    result["preemptions"] = preemptions(llm) if job.get("metrics") else None
    with contextlib.suppress(Exception):
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()  # flushes the connector's dumps before the next process reads the store
    result["total_s"] = round(time.perf_counter() - started, 1)
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# ============================================================================ parent
def run_engine(job: dict, env: dict, tmp: Path, deadline: float) -> dict:
    """Run one engine job in a subprocess, echoing its output; returns its result (or the error)."""
    path = tmp / f"job-{job['name']}.json"
    path.write_text(json.dumps(job))
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--engine-job", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, bufsize=1)
    lines: queue.Queue = queue.Queue()

    def reader() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    result: dict | None = None
    tail: list[str] = []
    causes: list[str] = []  # "XxxError: ..." lines: in multiprocess mode the root cause is only in the log
    killed = False
    while True:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            if time.time() > deadline and not killed:
                log(f"time budget reached: stopping engine {job['name']}")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                killed = True
            continue
        if line is None:
            break
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            continue
        sys.stdout.write(line)
        sys.stdout.flush()
        if ERROR_LINE.search(line) and len(causes) < 50:
            causes.append(line.strip()[-400:])
        tail = (tail + [line])[-30:]
    rc = proc.wait()
    if result is None:
        why = "killed at the time budget" if killed else f"engine process exited with {rc}"
        result = {"name": job["name"], "error": why + ": " + "".join(tail[-10:])[-1500:], "runs": {}}
    elif result.get("start_error"):
        result["error"] = "engine failed to start: " + result["start_error"]
    if result.get("error") and causes:
        result["error"] += " | first error in the log: " + causes[0]
    return result


def compare(ref: dict, got: dict, names: list[str]) -> tuple[bool, list[str]]:
    """Greedy token identity per request; mismatches with the reference's top-2 margin at the first difference."""
    problems = []
    for n in names:
        a, b = ref.get(n, {}).get("tokens"), got.get(n, {}).get("tokens")
        if a is None or b is None:
            problems.append(f"{n}: missing output ({'reference' if a is None else 'compared'})")
            continue
        if a == b:
            continue
        i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
        margins = ref[n].get("margins") or []
        margin = margins[i] if i < len(margins) else None
        problems.append(f"{n}: first difference at output token {i} of {len(a)}/{len(b)} "
                        f"(reference top-2 logprob margin {margin})")
    return not problems, problems


def summary_sum(run: dict, key: str, names: list[str]) -> int:
    return sum(((run.get(n) or {}).get("ucm") or {}).get(key, 0) or 0 for n in names)


def shares(run: dict, names: list[str]) -> dict[str, float | None]:
    out = {}
    for n in names:
        sparse = ((run.get(n) or {}).get("ucm") or {}).get("sparse")
        out[n] = round(sparse["resident_share"], 4) if sparse else None
    return out


class Report:
    def __init__(self, path: Path, meta: dict, merge: bool = False) -> None:
        self.path, self.meta = path, meta
        self.checks: list[dict] = []
        self.engines: dict[str, dict] = {}
        if merge and path.exists():  # keep the checks of an earlier run (e.g. --checks abc, then --checks de)
            with contextlib.suppress(ValueError, KeyError, TypeError):
                old = json.loads(path.read_text())
                self.checks = [dict(c, run=c.get("run") or old.get("started")) for c in old["checks"]]
                self.engines = old.get("engines", {})

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.checks = [c for c in self.checks if c["name"] != name]
        self.checks.append({"name": name, "passed": bool(passed), "detail": detail, "run": self.meta["started"]})
        log(f"{'PASS' if passed else 'FAIL'} {name}: {detail}")
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = dict(self.meta, checks=self.checks, engines=self.engines,
                   passed=sum(c["passed"] for c in self.checks), failed=sum(not c["passed"] for c in self.checks))
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.path)


def git_commit(repo: Path) -> str:
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=20, env=env).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=60, env=env).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("UCM_COMMIT", "unknown")
    return (head + ("+dirty" if dirty else "")) if head else os.environ.get("UCM_COMMIT", "unknown")


def corrupt_one_block(root: Path) -> str:
    """Flip 64 bytes in the middle of one block file (the middle one by name); returns what was done."""
    files = sorted(root.rglob("*.kv"))
    if not files:
        raise RuntimeError(f"no *.kv file under {root}")
    victim = files[len(files) // 2]
    size = victim.stat().st_size
    offset = size // 2
    with open(victim, "r+b") as fh:
        fh.seek(offset)
        data = fh.read(64)
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in data))
        fh.flush()
        os.fsync(fh.fileno())
    return f"flipped {len(data)} bytes at offset {offset} of {victim.name} ({size} B; {len(files)} block files)"


def make_model(args: argparse.Namespace, root: Path) -> tuple[str, int]:
    spec = SMOKE_MODEL if args.smoke else GPU_MODEL
    if args.weights == "dummy":
        from transformers import LlamaConfig

        s = spec
        cfg = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                          intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
                          num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
                          head_dim=s["hidden_size"] // s["num_heads"],
                          max_position_embeddings=s["max_position_embeddings"], tie_word_embeddings=False)
        cfg.architectures = ["LlamaForCausalLM"]
        path = root / "dummy-llama"
        cfg.save_pretrained(path)
        return str(path), s["vocab_size"]
    from ucm.eval.models import make_tiny_llama

    path = make_tiny_llama(root / ("tiny-llama" if args.smoke else "small-llama"), **spec)
    return path, spec["vocab_size"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny Llama, ~1200-token prompts")
    parser.add_argument("--checks", default=ALL_CHECKS, help="letters of the checks to run (default abcde)")
    parser.add_argument("--async-scheduling", choices=("default", "on", "off"), default="default",
                        help="vLLM async_scheduling (default: vLLM's choice, on for a GPU engine)")
    parser.add_argument("--sparse-full-graphs", action="store_true",
                        help="ESA engines with ucm_sparse_full_graphs (steps without layer hooks as full CUDA graphs)")
    parser.add_argument("--dtype", default="float32", help="vLLM dtype (float32: stable greedy identity; "
                        "bfloat16: the FlashAttention path)")
    parser.add_argument("--weights", choices=("random", "dummy"), default="random",
                        help="random: make_tiny_llama weights (std 0.05); dummy: vLLM's load_format=dummy")
    parser.add_argument("--max-tokens", type=int, default=None, help="output tokens of the identity checks "
                        "(default 32; --smoke 16)")
    parser.add_argument("--prompt-lens", default=None,
                        help="prompt lengths of the identity checks (default 4000,3000,2500,2100; --smoke "
                             "1200,1100,700,300)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs (default: vLLM's)")
    parser.add_argument("--block-size", type=int, default=None, help="vLLM block size (default 16, vLLM's CUDA "
                        "default; --smoke 32)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="token budget per step (default 2048, so 4K prompts prefill in chunks; --smoke 512)")
    parser.add_argument("--dram-gib", type=float, default=None, help="UcmDram max_cache_size (default 4; "
                        "--smoke 0.25)")
    parser.add_argument("--kv-cache-bytes", type=int, default=64 << 20, help="--smoke: kv_cache_memory_bytes")
    parser.add_argument("--nfs-dir", default=None, help="parent folder of the UcmNfsStore directory (a fresh "
                        "subfolder is made in it; default: a temp dir)")
    parser.add_argument("--keep-nfs", action="store_true", help="keep the UcmNfsStore directory")
    parser.add_argument("--logprobs", type=int, default=2, help="top logprobs per token for near-tie diagnosis "
                        "(0: off)")
    parser.add_argument("--cpu-threads-bind", default=None,
                        help="--smoke: VLLM_CPU_OMP_THREADS_BIND for every engine (default: all usable cores; "
                             "'auto' leaves vLLM's binding)")
    parser.add_argument("--model-dir", default=None, help="folder for the model (default: a temp dir)")
    parser.add_argument("--time-budget-s", type=float, default=None, help="start no engine after this many "
                        "seconds minus --engine-reserve-s; a running one is killed at the deadline")
    parser.add_argument("--engine-reserve-s", type=float, default=None, help="default 90 (--smoke 15)")
    parser.add_argument("--merge", action="store_true", help="keep the checks already in --out that this run "
                        "does not redo (to split the checks over several commands)")
    parser.add_argument("--out", default="bench/results/gpu_correctness.json")
    parser.add_argument("--engine-job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine_job:
        return engine_main(json.loads(Path(args.engine_job).read_text()))

    smoke = args.smoke
    checks = set(args.checks.lower())
    if not checks <= set(ALL_CHECKS):
        parser.error(f"--checks: letters of {ALL_CHECKS}")
    max_tokens = args.max_tokens or (16 if smoke else 32)
    lens = [int(x) for x in (args.prompt_lens or ("1200,1100,700,300" if smoke else "4000,3000,2500,2100"))
            .split(",")]
    block = args.block_size or (32 if smoke else 16)
    mnbt = args.max_num_batched_tokens or (512 if smoke else 2048)
    dram = int((args.dram_gib if args.dram_gib is not None else (0.25 if smoke else 4.0)) * (1 << 30))
    reserve = args.engine_reserve_s if args.engine_reserve_s is not None else (15.0 if smoke else 90.0)
    started = time.time()
    deadline = started + args.time_budget_s if args.time_budget_s else float("inf")

    model_root = Path(args.model_dir or tempfile.mkdtemp(prefix="ucm-gpu-corr-model-"))
    model_path, vocab = make_model(args, model_root)
    long_min = 1000 if smoke else 2048
    long_max = 1300 if smoke else 4096
    short_lens = [40, 70] if smoke else [40, 50]  # below min_blocks (4) x block: dense requests
    max_len = max(lens + [long_max]) + 128 + block
    base_kwargs = {"model": model_path, "skip_tokenizer_init": True, "dtype": args.dtype, "seed": 0,
                   "max_model_len": max_len, "max_num_batched_tokens": mnbt, "max_num_seqs": 16,
                   "block_size": block}
    if args.async_scheduling != "default":
        base_kwargs["async_scheduling"] = args.async_scheduling == "on"
    if args.weights == "dummy":
        base_kwargs["load_format"] = "dummy"
    if smoke:
        base_kwargs.update(enforce_eager=True, kv_cache_memory_bytes=args.kv_cache_bytes)
    else:
        base_kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
        if args.enforce_eager:
            base_kwargs["enforce_eager"] = True

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    if smoke:
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine unless the caller says otherwise
        bind = args.cpu_threads_bind
        if bind is None:
            cores = sorted(os.sched_getaffinity(0))
            bind = ",".join(map(str, cores))
        if bind != "auto":
            env["VLLM_CPU_OMP_THREADS_BIND"] = bind

    nfs_parent = Path(args.nfs_dir or tempfile.gettempdir())
    nfs_parent.mkdir(parents=True, exist_ok=True)
    nfs_dir = Path(tempfile.mkdtemp(prefix="ucm-corr-nfs-", dir=nfs_parent))

    def dram_cfg(esa: dict | None = None) -> dict:
        cfg = {"ucm_connector_name": "UcmDram", "ucm_connector_config": {"max_cache_size": dram}}
        if esa is not None:
            cfg.update(ucm_sparse_method="ESA", ucm_sparse_config={"ESA": dict(esa)})
            if args.sparse_full_graphs:
                cfg["ucm_sparse_full_graphs"] = True
        return cfg

    nfs_cfg = {"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": str(nfs_dir)}}
    main_reqs = [{"name": f"p{i}", "ids": ids(f"main-{i}", n, vocab), "max_tokens": max_tokens}
                 for i, n in enumerate(lens)]
    main_names = [r["name"] for r in main_reqs]
    multi_block = [r["name"] for r in main_reqs if len(r["ids"]) >= 2 * block]
    rng = random.Random(7)
    long_reqs = [{"name": f"long{i}", "ids": ids(f"long-{i}", rng.randrange(long_min, long_max), vocab),
                  "max_tokens": m, "at_step": s}
                 for i, (m, s) in enumerate(zip([40, 24, 48, 32, 56, 24], [0, 0, 3, 6, 9, 13], strict=True))]
    short_reqs = [{"name": f"short{i}", "ids": ids(f"short-{i}", n, vocab), "max_tokens": m, "at_step": s}
                  for i, (n, m, s) in enumerate(zip(short_lens, [64, 32], [1, 7], strict=True))]
    single = [{"name": "single", "ids": ids("single", long_max - 96, vocab), "max_tokens": 64}]
    # preemption: 4 long requests prefilled in parallel 8-block chunks into a pool of 1.5 long prompts
    pre_chunk = 8 * block
    pre_reqs = [{"name": f"pre{i}", "ids": ids(f"pre-{i}", long_max - 100 * i, vocab), "max_tokens": 32}
                for i in range(4)]
    pre_blocks = -(-(long_max + 32) // block)
    pre_pool = int(1.5 * pre_blocks) + 2
    pre_kwargs = dict(base_kwargs, num_gpu_blocks_override=pre_pool, max_num_batched_tokens=4 * pre_chunk,
                      long_prefill_token_threshold=pre_chunk, max_model_len=(pre_blocks + 1) * block,
                      disable_log_stats=False)

    def job(name: str, extra: dict | None, runs: list[dict], kwargs: dict | None = None, **kw) -> dict:
        return {"name": name, "engine_kwargs": kwargs or base_kwargs, "extra_config": extra, "runs": runs,
                "logprobs": args.logprobs, **kw}

    main_run = [{"label": "run1", "requests": main_reqs}]
    repo = Path(__file__).resolve().parent.parent
    meta = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "commit": git_commit(repo),
        "model": dict(SMOKE_MODEL if smoke else GPU_MODEL, path=model_path, weights=args.weights, dtype=args.dtype),
        "sparse_full_graphs": args.sparse_full_graphs, "async_scheduling": args.async_scheduling,
        "engine_kwargs": {k: v for k, v in base_kwargs.items() if k != "model"},
        "preemption_engine": {k: pre_kwargs[k] for k in ("num_gpu_blocks_override", "max_num_batched_tokens",
                                                         "long_prefill_token_threshold", "max_model_len")},
        "env": {k: env[k] for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND",
                                    "VLLM_USE_FLASHINFER_SAMPLER") if k in env},
        "prompt_lens": lens,
        "max_tokens": max_tokens,
        "esa_02": ESA_02,
        "nfs_dir": str(nfs_dir),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    report = Report(Path(args.out), meta, merge=args.merge)
    report.write()
    rc = 0
    tmp = Path(tempfile.mkdtemp(prefix="ucm-gpu-corr-jobs-"))
    results: dict[str, dict] = {}

    def run(j: dict) -> dict | None:
        nonlocal rc
        if time.time() + reserve > deadline:
            log(f"not starting engine {j['name']}: time budget")
            results[j["name"]] = {"error": "not run: time budget", "runs": {}}
            return None
        log(f"engine {j['name']}: connector {json.dumps(j['extra_config'])}")
        res = run_engine(j, env, tmp, deadline)
        results[j["name"]] = res
        report.engines[j["name"]] = {k: res.get(k) for k in ("start_s", "total_s", "error", "device", "vllm",
                                                             "preemptions", "reset_ok")}
        report.engines[j["name"]]["outputs"] = {
            label: r if "error" in r else {
                n: {"tokens": o["tokens"], "finish_reason": o["finish_reason"], "ucm": o["ucm"],
                    "min_margin": min((m for m in (o.get("margins") or []) if m is not None), default=None)}
                for n, o in r.items()}
            for label, r in res.get("runs", {}).items()}
        report.meta.setdefault("vllm", res.get("vllm"))
        report.meta.setdefault("device", res.get("device"))
        if res.get("error") and not res["error"].startswith(("not run", "killed at the time budget")):
            rc = 3
            log(f"engine {j['name']} failed: {res['error'][:600]}")
        report.write()
        return None if res.get("error") else res

    def out(name: str, label: str = "run1") -> dict | None:
        res = results.get(name) or {}
        r = res.get("runs", {}).get(label)
        return None if r is None or "error" in r else r

    def why(*names: str) -> str:
        msgs = []
        for n in names:
            res = results.get(n) or {"error": "not run"}
            if res.get("error"):
                msgs.append(f"{n}: {res['error'][:400]}")
            for label, r in res.get("runs", {}).items():
                if isinstance(r, dict) and "error" in r:
                    msgs.append(f"{n}/{label}: {r['error'][:400]}")
        return "; ".join(msgs) or "no output"

    try:
        needs_ref = checks & set("abc")
        if needs_ref:
            run(job("ref", None, main_run))
            if results["ref"].get("error"):
                for c in sorted(checks):
                    report.check(f"{c}_reference_engine", False, "plain vLLM failed: " + why("ref"))
                rc, checks = 3, set()  # nothing else can be judged: start no other engine
        ref = out("ref")
        if checks & set("abd"):
            run(job("dram", dram_cfg(), main_run + [{"label": "run2", "requests": main_reqs, "reset_before": True}]))
            d1, d2 = out("dram"), out("dram", "run2")
            if "a" in checks:
                if d1 is None or ref is None:
                    report.check("a_dram_connector_identical", False, why("ref", "dram"))
                else:
                    ok, probs = compare(ref, d1, main_names)
                    report.check("a_dram_connector_identical", ok,
                                 f"{len(main_names)} prompts {lens}, {max_tokens} tokens each; "
                                 + ("identical" if ok else "; ".join(probs)))
            if "b" in checks:
                if d1 is None or d2 is None:
                    report.check("b_dram_prefix_reuse", False, why("dram"))
                else:
                    ok_tok, probs = compare(d1, d2, main_names)
                    hits = {n: (d2[n].get("ucm") or {}).get("hit_blocks", 0) for n in main_names if n in d2}
                    ok_hit = all(hits.get(n, 0) > 0 for n in multi_block)
                    reset = (results["dram"].get("reset_ok") or [None])[-1]
                    report.check("b_dram_prefix_reuse", ok_tok and ok_hit,
                                 f"prefix cache reset -> {reset}; hit_blocks {hits}, loaded "
                                 f"{summary_sum(d2, 'loaded_blocks', main_names)}, failed "
                                 f"{summary_sum(d2, 'load_failed_blocks', main_names)}; tokens "
                                 + ("identical" if ok_tok else "; ".join(probs)))
        if checks & set("abc"):
            shutil.rmtree(nfs_dir, ignore_errors=True)
            nfs_dir.mkdir(parents=True)
            run(job("nfs1", nfs_cfg, main_run))
            n1 = out("nfs1")
            files = len(list(nfs_dir.rglob("*.kv")))
            if "a" in checks:
                if n1 is None or ref is None:
                    report.check("a_nfs_connector_identical", False, why("ref", "nfs1"))
                else:
                    ok, probs = compare(ref, n1, main_names)
                    report.check("a_nfs_connector_identical", ok, f"{files} block files written; "
                                 + ("identical" if ok else "; ".join(probs)))
            if "b" in checks:
                run(job("nfs2", nfs_cfg, main_run))
                n2 = out("nfs2")
                if n1 is None or n2 is None:
                    report.check("b_nfs_prefix_reuse_other_process", False, why("nfs1", "nfs2"))
                else:
                    ok_tok, probs = compare(n1, n2, main_names)
                    hits = {n: (n2[n].get("ucm") or {}).get("hit_blocks", 0) for n in main_names if n in n2}
                    ok_hit = all(hits.get(n, 0) > 0 for n in multi_block)
                    report.check("b_nfs_prefix_reuse_other_process", ok_tok and ok_hit,
                                 f"second process, same directory ({files} block files): hit_blocks {hits}, "
                                 f"loaded {summary_sum(n2, 'loaded_blocks', main_names)}, failed "
                                 f"{summary_sum(n2, 'load_failed_blocks', main_names)}; tokens "
                                 + ("identical" if ok_tok else "; ".join(probs)))
            if "c" in checks:
                try:
                    what = corrupt_one_block(nfs_dir)
                except (OSError, RuntimeError) as exc:
                    what = None
                    report.check("c_nfs_corrupt_block_recomputed", False, f"could not corrupt a block: {exc}")
                if what:
                    run(job("nfs3", nfs_cfg, main_run))
                    n3 = out("nfs3")
                    base = ref or n1
                    if n3 is None or base is None:
                        report.check("c_nfs_corrupt_block_recomputed", False, why("nfs3"))
                    else:
                        ok_tok, probs = compare(base, n3, main_names)
                        failed = summary_sum(n3, "load_failed_blocks", main_names)
                        report.check("c_nfs_corrupt_block_recomputed", ok_tok and failed > 0,
                                     f"{what}; load_failed_blocks {failed}, hit_blocks "
                                     f"{summary_sum(n3, 'hit_blocks', main_names)}, loaded "
                                     f"{summary_sum(n3, 'loaded_blocks', main_names)}; tokens "
                                     + ("identical" if ok_tok else "; ".join(probs)))
        if "d" in checks:
            if "dram" not in results:
                run(job("dram", dram_cfg(), main_run))
            run(job("esa_r1", dram_cfg(ESA_10), main_run))
            d1, e1 = out("dram"), out("esa_r1")
            if d1 is None or e1 is None:
                report.check("d_esa_ratio1_matches_dense_connector", False, why("dram", "esa_r1"))
            else:
                ok_tok, probs = compare(d1, e1, main_names)
                sh = shares(e1, main_names)
                sparse_names = [r["name"] for r in main_reqs if len(r["ids"]) >= 4 * block]
                ran = all(sh.get(n) is not None for n in sparse_names)
                report.check("d_esa_ratio1_matches_dense_connector", ok_tok and ran,
                             f"ESA {ESA_10}; resident_share {sh} (sparse summary "
                             f"{'present' if ran else 'MISSING: ESA did not run'}); tokens "
                             + ("identical" if ok_tok else "; ".join(probs)))
        if "e" in checks:
            run(job("esa_02", dram_cfg(ESA_02), [
                {"label": "batch1", "requests": single},
                {"label": "batch8", "requests": long_reqs + short_reqs, "reset_before": True},
            ]))
            for label, reqs, name in (("batch1", single, "e_esa_batch1"),
                                      ("batch8", long_reqs + short_reqs, "e_esa_batch8_continuous")):
                r = out("esa_02", label)
                if r is None:
                    report.check(name, False, why("esa_02"))
                    continue
                report.check(name, *esa_verdict(r, reqs, long_min))
            run(job("esa_02_preempt", dram_cfg(ESA_02), [{"label": "run1", "requests": pre_reqs}], pre_kwargs,
                    metrics=True))
            r = out("esa_02_preempt")
            if r is None:
                report.check("e_esa_preemption", False, why("esa_02_preempt"))
            else:
                ok, detail = esa_verdict(r, pre_reqs, long_min)
                n_pre = results["esa_02_preempt"].get("preemptions")
                ok = ok and bool(n_pre)
                report.check("e_esa_preemption", ok,
                             f"pool {pre_pool} blocks of {block} for 4 prompts of {pre_blocks} blocks, chunks of "
                             f"{pre_chunk} tokens; vLLM preemptions {n_pre}"
                             + ("" if n_pre else " (none observed: the check needs one)") + "; " + detail)
    finally:
        report.meta["seconds"] = round(time.time() - started, 1)
        report.write()
        if not args.keep_nfs:
            shutil.rmtree(nfs_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if not args.model_dir:
            shutil.rmtree(model_root, ignore_errors=True)
    passed = sum(c["passed"] for c in report.checks)
    log(f"{passed}/{len(report.checks)} checks passed; wrote {args.out}")
    for c in report.checks:
        print(f"  {'PASS' if c['passed'] else 'FAIL'}  {c['name']}: {c['detail'][:300]}", flush=True)
    return rc


def esa_verdict(run: dict, reqs: list[dict], long_min: int) -> tuple[bool, str]:
    """Every request finished with its max_tokens; every long request's resident_share <= SHARE_LIMIT."""
    problems, share = [], {}
    for r in reqs:
        o = run.get(r["name"])
        if o is None:
            problems.append(f"{r['name']}: no output")
            continue
        if len(o["tokens"]) != r["max_tokens"]:
            problems.append(f"{r['name']}: {len(o['tokens'])} of {r['max_tokens']} tokens ({o['finish_reason']})")
        if len(r["ids"]) >= long_min:
            sparse = (o.get("ucm") or {}).get("sparse")
            share[r["name"]] = round(sparse["resident_share"], 4) if sparse else None
            if sparse is None:
                problems.append(f"{r['name']}: no sparse summary")
            elif sparse["resident_share"] > SHARE_LIMIT:
                problems.append(f"{r['name']}: resident_share {sparse['resident_share']:.3f} > {SHARE_LIMIT}")
    steps = {r["name"]: [run.get(r["name"], {}).get("added_at_step"), run.get(r["name"], {}).get("finished_at_step")]
             for r in reqs}
    detail = (f"{len(reqs)} requests (prompt lens {[len(r['ids']) for r in reqs]}), long resident_share {share}, "
              f"added/finished at step {steps}; " + ("all finished with max_tokens" if not problems else
                                                     "; ".join(problems)))
    return not problems, detail


if __name__ == "__main__":
    sys.exit(main())
