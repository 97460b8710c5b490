"""`ucm.integration.vllm.compat.config_check`: a bad connector config stops ``vllm.LLM(...)`` in the user's process
with one `UcmConfigError`, before the model is loaded or an engine core is spawned (it used to surface in the worker,
after the model loaded, printed several times and ending in ``Engine core initialization failed``).

The engine runs in a fresh process per release line (vLLM loads plugins once per process)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

from ucm.eval.models import make_tiny_llama
from ucm.integration.vllm.compat.config_check import ucm_extra_configs

ENGINE = """
    import json, multiprocessing, sys, time
    from vllm import LLM
    from ucm.errors import UcmConfigError

    started = time.monotonic()
    try:
        LLM(model=sys.argv[1], skip_tokenizer_init=True, enforce_eager=True, kv_cache_memory_bytes=64 << 20,
            kv_transfer_config=json.loads(sys.argv[2]))
        result = {"raised": None}
    except UcmConfigError as error:
        result = {"raised": "UcmConfigError", "field": error.field, "message": str(error)}
    result["seconds"] = time.monotonic() - started
    result["children"] = len(multiprocessing.active_children())
    print(json.dumps(result))
"""


def test_bad_config_raises_in_the_users_process_before_any_engine_starts(vllm_line, tmp_path) -> None:
    model = make_tiny_llama(tmp_path / "m")
    config = {
        "kv_connector": "UnifiedCacheConnectorV1",
        "kv_connector_module_path": "ucm.integration.vllm.uc_connector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "ucm_connector_name": "UcmNfsStore",
            "ucm_connector_config": {"storage_backends": str(tmp_path), "stale_temp_seconds": 0},
        },
    }
    proc = subprocess.run(
        [vllm_line.python, "-c", textwrap.dedent(ENGINE), str(model), json.dumps(config)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["raised"] == "UcmConfigError", proc.stderr[-4000:]
    assert result["field"] == "ucm_connector_config.stale_temp_seconds" and "finite number >= 60" in result["message"]
    assert result["children"] == 0 and result["seconds"] < 60  # no engine core was spawned
    assert "Engine core initialization failed" not in proc.stderr
    assert proc.stderr.count("stale_temp_seconds=0") == 0  # raised once, to the caller: nothing logged it


def test_ucm_connectors_are_found_alone_and_inside_a_multi_connector() -> None:
    extra = {"ucm_connector_name": "UcmDram"}
    assert ucm_extra_configs({"kv_connector": "UnifiedCacheConnectorV1", "kv_connector_extra_config": extra}) == [extra]
    multi = {"kv_connector": "MultiConnector", "kv_connector_extra_config": {"connectors": [
        {"kv_connector": "OffloadingConnector", "kv_connector_extra_config": {}},
        {"kv_connector": "UnifiedCacheConnectorV1", "kv_connector_extra_config": extra},
    ]}}
    assert ucm_extra_configs(multi) == [extra]
    assert ucm_extra_configs(None) == [] and ucm_extra_configs({"kv_connector": "OffloadingConnector"}) == []
