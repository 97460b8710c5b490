"""End to end: `examples/online_serving.sh` (vllm serve + UcmNfsStore + ESA on loopback) answers the curl request,
and a server started with a bad connector config exits with the connector's one clear message."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAST_START = ["--compilation-config", '{"mode": 0}']  # no torch.compile on CPU: start in seconds, not minutes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def smollm2() -> str:
    from ucm.eval.models import ensure_smollm2

    return ensure_smollm2()


def test_example_server_answers_the_curl_request(smollm2: str, tmp_path: Path) -> None:
    env = dict(
        os.environ, MODEL=smollm2, PORT=str(free_port()), STORE_DIR=str(tmp_path / "store"), MAX_TOKENS="24",
        KV_CACHE_BYTES=str(256 << 20), PYTHON=sys.executable, STARTUP_TIMEOUT="400",
    )
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "online_serving.sh"), *FAST_START],
        capture_output=True, text=True, env=env, timeout=480,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    text = reply["choices"][0]["text"]
    assert reply["usage"]["completion_tokens"] == 24 and text.strip()
    # the server ran the connector with ESA and saved nothing it could not name (short prompt: < 1 full block)
    assert "UCM connector worker (tp rank 0): store UcmNfsStore" in proc.stderr + proc.stdout
    print(f"online example: {time.monotonic() - started:.1f} s, answer {text!r}")


def test_bad_connector_config_stops_the_server_with_one_clear_message(smollm2: str) -> None:
    config = {
        "kv_connector": "UnifiedCacheConnectorV1",
        "kv_connector_module_path": "ucm.integration.vllm.uc_connector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"ucm_connector_name": "UcmS3", "ucm_connector_config": {}},
    }
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", smollm2, "--host", "127.0.0.1",
        "--port", str(free_port()), "--max-model-len", "2048", "--kv-cache-memory-bytes", str(64 << 20),
        "--enforce-eager", "--kv-transfer-config", json.dumps(config), *FAST_START,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "UcmConfigError: invalid ucm_connector_name='UcmS3': expected one of 'UcmDram', 'UcmNfsStore'" in log
