"""A failed prefix load under vLLM's asynchronous scheduling (its GPU default), on every supported release line:
vLLM's own `AsyncScheduler` and KV cache manager with the connector's scheduler half, the worker played by
`async_scheduling_job.py` (vLLM-CPU engines cannot schedule asynchronously).

With the connector's default there ("auto": asynchronous loads), the request waits until its loads ended, is
then computed from the failed block on, and its first output token comes from that computation. The second test
pins why synchronous loads are not the default there: vLLM schedules the request's next step before the output
reporting the failure arrives, and that stale step's token (sampled from the failed KV) becomes the request's
first output token. That is the corrupt-block check that failed on the H200 (``bench/results/gpu_e2e_notes.md``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from async_scheduling_job import BLOCK, FAILED_POSITION, MAX_TOKENS, PROMPT, RESULT_TAG

JOB = Path(__file__).with_name("async_scheduling_job.py")


def run(python: str, async_load: str) -> dict:
    proc = subprocess.run([python, str(JOB), async_load], capture_output=True, text=True, timeout=300)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise AssertionError(f"job failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def test_asynchronous_loads_recompute_a_failed_block_before_any_output(vllm_line) -> None:
    result = run(vllm_line.python, "auto")
    assert result["async_load"] is True  # "auto" follows the scheduler
    assert result["finished"]
    frames = result["frames"]
    by_token = {f["token"]: f for f in frames if f["token"] is not None}
    # nothing of the request ran until its loads ended; then one step computed it from the failed block on
    computing = [f for f in frames if f["scheduled"]]
    assert computing[0]["scheduled"] == len(PROMPT) - FAILED_POSITION * BLOCK
    assert all(f["scheduled"] == 1 for f in computing[1:])
    assert result["output_tokens"] == [f["token"] for f in computing][:MAX_TOKENS]
    assert by_token[result["output_tokens"][0]] is computing[0]


def test_synchronous_loads_under_asynchronous_scheduling_emit_the_stale_steps_token(vllm_line) -> None:
    result = run(vllm_line.python, "false")
    assert result["async_load"] is False
    frames = result["frames"]
    loaded_prefill, stale = frames[0], frames[1]
    assert loaded_prefill["scheduled"] == len(PROMPT) - (len(PROMPT) - 1) // BLOCK * BLOCK
    assert stale["scheduled"] == 1  # scheduled before the failure was known
    # vLLM drops the failed step's token but keeps the one sampled from it in flight: the first output token
    assert result["output_tokens"][0] == stale["token"]
