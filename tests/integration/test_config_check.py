"""`ucm.integration.vllm.compat.config_check`: connector configuration errors early and once.

A mistake that does not need the model stops ``vllm.LLM(...)`` in the user's process with one `UcmConfigError`,
before the model is loaded or an engine core is spawned (it used to surface in the worker, after the model loaded,
printed several times and ending in ``Engine core initialization failed``). One that needs the model
(``kv_block_size``) still fails the engine's start, and the user's process raises it, printed once, last.

Engines run in fresh processes (vLLM loads plugins once per process), with the working directory outside the
repository (its ``kernels/`` folder would shadow the ``kernels`` package vLLM 0.23/0.26 import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ucm.errors import UcmConfigError
from ucm.eval.models import make_tiny_llama
from ucm.integration.vllm.compat.config_check import (
    UcmConfigErrorReported,
    _raising_reported_errors,
    report_path,
    reporting_config_errors,
    ucm_extra_configs,
)

ENGINE = """
    import json, multiprocessing, sys, time
    from vllm import LLM
    from ucm.errors import UcmConfigError

    def start(extra):
        kv_transfer_config = {"kv_connector": "UnifiedCacheConnectorV1", "kv_role": "kv_both",
                              "kv_connector_module_path": "ucm.integration.vllm.uc_connector",
                              "kv_connector_extra_config": extra}
        LLM(model=sys.argv[1], skip_tokenizer_init=True, enforce_eager=True, kv_cache_memory_bytes=64 << 20,
            kv_transfer_config=kv_transfer_config)

    if __name__ == "__main__":
        *caught, last = json.loads(sys.argv[2])
        for extra in caught:
            started = time.monotonic()
            try:
                start(extra)
                result = {"raised": None}
            except UcmConfigError as error:
                result = {"raised": "UcmConfigError", "field": error.field, "message": str(error)}
            result["seconds"] = time.monotonic() - started
            result["children"] = len(multiprocessing.active_children())
            print(json.dumps(result), flush=True)
        start(last)  # not caught: Python prints it, as a user's script would
"""

DRAM = {"ucm_connector_name": "UcmDram", "ucm_connector_config": {"max_cache_size": 64 << 20}}


def run_engines(python: str, tmp_path: Path, configs: list[dict]) -> subprocess.CompletedProcess:
    model = make_tiny_llama(tmp_path / "m")
    script = tmp_path / "engine.py"
    script.write_text(textwrap.dedent(ENGINE))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TMPDIR=str(tmp_path))  # report files land here
    return subprocess.run([python, str(script), model, json.dumps(configs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bad_configs_raise_in_the_users_process_before_any_engine_starts(vllm_line, tmp_path) -> None:
    configs = {  # field -> a bad config (issue 14, items 9 and 10)
        "ucm_connector_config.stale_temp_seconds": {
            "ucm_connector_name": "UcmNfsStore",
            "ucm_connector_config": {"storage_backends": str(tmp_path), "stale_temp_seconds": 0}},
        "ucm_connector_config.max_cache_size": {**DRAM, "ucm_connector_config": {"max_cache_size": 2**60}},
        "ucm_sparse_config.esa": {**DRAM, "ucm_sparse_method": "ESA", "ucm_sparse_config": {"esa": {}}},
        "ucm_connector_name": {**DRAM, "ucm_connector_name": ["UcmDram"]},
    }
    proc = run_engines(vllm_line.python, tmp_path, list(configs.values()))
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(configs) - 1, proc.stderr[-4000:]
    for field, result in zip(list(configs)[:-1], results, strict=True):
        assert result["raised"] == "UcmConfigError" and result["field"] == field, (field, result)
        assert result["children"] == 0 and result["seconds"] < 30, result  # no engine core was spawned
        assert proc.stderr.count(result["message"]) == 0  # raised once, to the caller: nothing logged it
    # the uncaught one: Python's traceback is the only place it appears, as the last line
    last = "ucm.errors.UcmConfigError: invalid ucm_connector_name=['UcmDram']: expected one of 'UcmDram', "
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(last), proc.stderr[-4000:]
    assert proc.stderr.count("invalid ucm_connector_name=") == 1
    assert "Engine core initialization failed" not in proc.stderr


def test_an_error_that_needs_the_model_is_raised_once_in_the_users_process(tmp_path) -> None:
    # One release line (the test environment's) for CI time: the engine loads the model first (~25 s). The other
    # lines' engine tests run the same factory wrapper on every successful start.
    bad = {**DRAM, "ucm_connector_config": {"max_cache_size": 64 << 20, "kv_block_size": 4096}}
    proc = run_engines(sys.executable, tmp_path, [bad])
    full = ("ucm.errors.UcmConfigError: invalid ucm_connector_config.kv_block_size=4096: expected 131072 for this "
            "model (2 layers x 65536 B per 128-token block of K and V in bfloat16), or leave it out to derive it")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and full in proc.stderr, proc.stderr[-4000:]
    assert output.count("kv_block_size=4096") == 1  # vLLM's logs of the engine's failure carry the short form
    assert "ucm_connector_config.kv_block_size is invalid; the full error is raised in the process" in output
    # the last error a user reads is ours, not vLLM's "Engine core initialization failed"
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("ucm.errors.", "RuntimeError"))]
    assert errors[-1] == full and "Engine core initialization failed" not in output
    assert not list(tmp_path.glob("ucm-config-error-*"))  # the report file is removed


class _Config:
    """What the report needs of a `VllmConfig`: its ``instance_id``."""

    def __init__(self, instance_id: str):
        self.instance_id = instance_id


def _engine(config: _Config, field: str) -> None:
    """An engine start whose connector finds `field` invalid (vLLM then fails the start with its own error)."""
    try:
        with reporting_config_errors(config):
            raise UcmConfigError(field, 4096, "131072 for this model")
    except UcmConfigErrorReported as reported:
        raise RuntimeError(f"Worker failed with error '{reported}'") from None


def test_an_engine_reports_its_error_only_to_a_waiting_process(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    config = _Config("42")
    assert report_path(config).parent == tmp_path
    # nobody waits (e.g. a worker on another node): the engine raises the full error, for vLLM to log
    with pytest.raises(UcmConfigError, match=r"^invalid ucm_connector_config\.kv_block_size=4096: expected 131"):
        _engine(config, "ucm_connector_config.kv_block_size")
    assert not report_path(config).exists()

    def make_client(multiprocess_mode: bool, asyncio_mode: bool, vllm_config: _Config) -> None:
        assert report_path(vllm_config).read_bytes() == b""  # made before the engine starts
        _engine(vllm_config, "ucm_connector_config.kv_block_size")
        _engine(vllm_config, "second")  # a second worker: the first report stays

    with pytest.raises(UcmConfigError) as info:
        _raising_reported_errors(make_client)(True, False, config)
    assert info.value.field == "ucm_connector_config.kv_block_size" and info.value.__suppress_context__
    assert str(info.value) == "invalid ucm_connector_config.kv_block_size=4096: expected 131072 for this model"
    assert not report_path(config).exists()

    def other_failure(vllm_config: _Config, client_addresses: dict | None = None) -> None:
        raise RuntimeError("Engine core initialization failed")

    with pytest.raises(RuntimeError, match="Engine core initialization failed"):  # not ours: vLLM's error
        _raising_reported_errors(other_failure)(config)
    assert not report_path(config).exists()
    assert report_path(_Config("../x")) is None and report_path(_Config("")) is None


def test_ucm_connectors_are_found_alone_and_inside_a_multi_connector() -> None:
    extra = {"ucm_connector_name": "UcmDram"}
    assert ucm_extra_configs({"kv_connector": "UnifiedCacheConnectorV1", "kv_connector_extra_config": extra}) == [extra]
    multi = {"kv_connector": "MultiConnector", "kv_connector_extra_config": {"connectors": [
        {"kv_connector": "OffloadingConnector", "kv_connector_extra_config": {}},
        {"kv_connector": "UnifiedCacheConnectorV1", "kv_connector_extra_config": extra},
    ]}}
    assert ucm_extra_configs(multi) == [extra]
    assert ucm_extra_configs(None) == [] and ucm_extra_configs({"kv_connector": "OffloadingConnector"}) == []
