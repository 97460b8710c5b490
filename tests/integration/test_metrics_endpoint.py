"""End to end: a real OpenAI server (loopback) with the connector (UcmNfsStore) and ESA exports the ``ucm:*`` series
on ``/metrics`` with the values the connector's per-request summaries and the store directory say, and the
per-request summaries count what their names say (issue 15, items 1 and 2).

One server per release line serves every assertion: a long prompt three times (cold: dumped; again: loaded from
the store, vLLM's own prefix cache being off; again after one stored block was corrupted: loaded up to it,
recomputed from it), then a short streamed request.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_online_serving import FAST_START, free_port

BLOCK = 64
PROMPT = [(i * 7 + 3) % 1900 + 3 for i in range(1300)]  # 20 full blocks + 20 tokens, no tokenizer needed
FULL = len(PROMPT) // BLOCK
LOOKUP = (len(PROMPT) - 1) // BLOCK  # the last prompt token is always computed
CORRUPT_AT = 16  # position of the block corrupted before the third request (late: little to recompute)
MAX_TOKENS = 8
HEADER = 4096  # UcmNfsStore block file header
ESA = {"init_window_sz": 1, "local_window_sz": 2, "min_blocks": 4, "sparse_ratio": 0.2, "retrieval_stride": 4}


def _get(url: str, body: dict | None = None, timeout: float = 300) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def _metrics(base: str) -> dict[str, float]:
    """``/metrics`` as {series name (with ``_bucket``/``_count``/``_sum`` suffixes): value} for the ucm series
    (one engine: labels other than ``le`` dropped)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(_get(base + "/metrics").decode()):
        for sample in family.samples:
            if sample.name.startswith("ucm:") and "le" not in sample.labels:
                out[sample.name] = sample.value
    return out


@pytest.fixture(scope="module")
def served(vllm_line, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from ucm.eval.models import ensure_smollm2

    model = ensure_smollm2()
    tmp = tmp_path_factory.mktemp("metrics")
    store = tmp / "store"
    store.mkdir()
    config = {
        "kv_connector": "UnifiedCacheConnectorV1",
        "kv_connector_module_path": "ucm.integration.vllm.uc_connector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": str(store)},
            "ucm_sparse_method": "ESA", "ucm_sparse_config": {"ESA": ESA},
        },
    }
    port = free_port()
    log = tmp / "server.log"
    command = [
        vllm_line.python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
        "--port", str(port), "--max-model-len", "2048", "--kv-cache-memory-bytes", str(256 << 20),
        "--block-size", str(BLOCK), "--enforce-eager", "--no-enable-prefix-caching", "--seed", "0",
        "--kv-transfer-config", json.dumps(config), *FAST_START,
    ]
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
               TOKENIZERS_PARALLELISM="false")
    started = time.monotonic()
    with open(log, "w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited during start-up:\n{log.read_text()[-6000:]}")
            if time.monotonic() - started > 400:
                raise AssertionError(f"server not ready after 400 s:\n{log.read_text()[-6000:]}")
            try:
                _get(base + "/health", timeout=5)
                break
            except OSError:
                time.sleep(1)
        ready = time.monotonic()
        request = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        replies = [json.loads(_get(base + "/v1/completions", request))]
        metrics_after_first = _metrics(base)
        replies.append(json.loads(_get(base + "/v1/completions", request)))
        namespace = re.search(r"block namespaces of 1 worker\(s\): \{0: '([^']+)'\}", log.read_text()).group(1)
        from ucm.store import block_ids_for_tokens

        block_id = block_ids_for_tokens(PROMPT, BLOCK, namespace)[CORRUPT_AT]
        with open(store / block_id[:2] / f"{block_id}.kv", "r+b") as f:
            f.seek(HEADER + 100)
            data = f.read(8)
            f.seek(HEADER + 100)
            f.write(bytes(b ^ 0xA5 for b in data))
        replies.append(json.loads(_get(base + "/v1/completions", request)))
        stream = _get(base + "/v1/completions", {"model": model, "prompt": PROMPT[:40], "max_tokens": 4,
                                                  "temperature": 0, "stream": True})
        # the last step's stats reach the server's logger right after its output: wait until they settle
        metrics, previous = _metrics(base), None
        for _ in range(20):
            if metrics == previous:
                break
            time.sleep(0.5)
            previous, metrics = metrics, _metrics(base)
        print(f"metrics server ({vllm_line.line}): start {ready - started:.1f} s, "
              f"requests {time.monotonic() - ready:.1f} s")
        yield {"replies": [r["kv_transfer_params"]["ucm"] for r in replies], "metrics": metrics,
               "first": metrics_after_first, "stream": stream.decode(), "store": store, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_metrics_endpoint_exports_the_connector_series(served: dict) -> None:
    m, first = served["metrics"], served["first"]
    # the cold request looked its blocks up and found none
    assert first["ucm:lookup_blocks_total"] == LOOKUP and first.get("ucm:hit_blocks_total", 0) == 0
    cold, warm, broken = served["replies"]
    assert cold["hit_blocks"] == 0 and cold["saved_blocks_planned"] == FULL
    assert warm["hit_blocks"] == warm["loaded_blocks"] == LOOKUP and warm["recomputed_blocks"] == 0
    # the corrupted block and every block after it were recomputed; only the ones before it count as loaded
    assert broken["hit_blocks"] == LOOKUP and broken["load_failed_blocks"] == 1
    assert broken["loaded_blocks"] == CORRUPT_AT and broken["recomputed_blocks"] == LOOKUP - CORRUPT_AT
    # the series say what the three summaries say
    replies = served["replies"]
    assert m["ucm:lookup_blocks_total"] == 3 * LOOKUP + 0  # the streamed prompt has no full block
    for name in ("hit_blocks", "loaded_blocks", "load_failed_blocks", "recomputed_blocks"):
        assert m[f"ucm:{name}_total"] == sum(r[name] for r in replies), name
    files = sorted(served["store"].rglob("*.kv"))
    assert len(files) == FULL
    bytes_per_block = files[0].stat().st_size - HEADER
    assert m["ucm:loaded_bytes_total"] == m["ucm:loaded_blocks_total"] * bytes_per_block
    # dumps: every block once when cold; after the failure the corrupted one again (the store dropped it)
    assert m["ucm:saved_blocks_total"] == FULL + 1 and m["ucm:saved_bytes_total"] == (FULL + 1) * bytes_per_block
    assert m["ucm:save_skipped_blocks_total"] == LOOKUP - CORRUPT_AT - 1
    assert m["ucm:store_blocks"] == FULL and m["ucm:store_used_bytes"] == sum(f.stat().st_size for f in files)
    # latency histograms: one load per warm request, one sample per finished dump task
    assert m["ucm:load_seconds_count"] == 2 and m["ucm:load_seconds_sum"] > 0
    assert m["ucm:save_seconds_count"] >= 2 and m["ucm:save_seconds_sum"] > 0


def test_metrics_endpoint_exports_the_sparse_series(served: dict) -> None:
    m, replies = served["metrics"], served["replies"]
    sparse = [r["sparse"] for r in replies]
    # each request counted once (not once per layer and step), its steps are its own decode steps
    assert m["ucm:sparse_requests_total"] == 3
    assert all(0 < s["steps"] <= MAX_TOKENS for s in sparse)
    assert m["ucm:sparse_steps_total"] == sum(s["steps"] for s in sparse)
    # blocks per decode step (averaged over layers): dense reads the whole prompt, ESA a share of it
    for s in sparse:
        assert FULL <= s["full_blocks"] <= FULL + 2 and 0 < s["resident_blocks"] < 0.5 * s["full_blocks"]
        assert s["resident_share"] == pytest.approx(s["resident_blocks"] / s["full_blocks"], abs=0.01)
    assert m["ucm:sparse_full_block_steps_total"] == pytest.approx(
        sum(s["full_blocks"] * s["steps"] for s in sparse), abs=0.1)
    assert m["ucm:sparse_resident_block_steps_total"] == pytest.approx(
        sum(s["resident_blocks"] * s["steps"] for s in sparse), abs=0.1)
    assert 0 < m["ucm:sparse_resident_share"] < 0.5
    # one histogram sample per batched selection (a layer), each selecting for one or more requests
    assert 0 < m["ucm:sparse_retrieval_seconds_count"] <= m["ucm:sparse_retrievals_total"]


def test_streamed_responses_carry_no_kv_transfer_params(served: dict) -> None:
    # documented in docs/connector.md: vLLM's streaming responses have no field for them
    chunks = [json.loads(line[len("data: "):]) for line in served["stream"].splitlines()
              if line.startswith("data: {")]
    assert chunks and all("kv_transfer_params" not in c or c["kv_transfer_params"] is None for c in chunks)

