"""On a CPU machine, under CI or in ``scripts/test.sh``'s own parity run (``UCM_REQUIRE_TRITON_INTERPRET=1``), a
parity run whose Triton interpreter cases did not run fails (it would otherwise pass with every one skipped), and
the terminal summary counts the interpreter cases."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
COPY_TESTS = str(HERE / "test_block_copy.py")
SUMMARY = re.compile(r"parity: Triton kernels under the interpreter \(triton-interpret\): (\d+) passed, (\d+) failed")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter guard applies to CPU machines")


def run_pytest(args: list[str], env_extra: dict[str, str], import_triton_first: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CI", "UCM_REQUIRE_TRITON_INTERPRET")}
    env.update(env_extra)
    # triton imported before the parity conftest runs, as in one pytest process with the vLLM tests
    first = "import triton; " if import_triton_first else ""
    code = f"{first}import sys, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', *{args!r}]))"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("env", [{"CI": "1"}, {"UCM_REQUIRE_TRITON_INTERPRET": "1"}, {}],
                         ids=["ci", "test.sh", "local"])
def test_interpreter_cases_fail_when_required_and_the_interpreter_is_off(env: dict[str, str]) -> None:
    proc = run_pytest(["-x", "-k", "interpret", COPY_TESTS], env, import_triton_first=True)
    if env:
        assert proc.returncode != 0 and "must run on a CPU machine" in proc.stdout, proc.stdout[-2000:]
    else:  # outside CI the cases skip, saying why
        assert proc.returncode == 0 and "skipped" in proc.stdout, proc.stdout[-2000:]
        assert SUMMARY.search(proc.stdout) is None  # nothing ran on the interpreter, and nothing claims it did


def test_a_required_run_whose_interpreter_cases_all_skip_fails() -> None:
    # the interpreter is on, but the selected cases all skip in their body (no staged host-copy mode)
    selected = ["-k", "interpret and pinned-staged", COPY_TESTS]
    required = run_pytest(selected, {"UCM_REQUIRE_TRITON_INTERPRET": "1"}, import_triton_first=False)
    assert required.returncode == pytest.ExitCode.TESTS_FAILED, required.stdout[-2000:]
    assert re.search(r"FAILED: \d+ triton-interpret cases were selected and none passed", required.stdout)
    assert SUMMARY.search(required.stdout).groups() == ("0", "0"), required.stdout[-2000:]
    assert run_pytest(selected, {}, import_triton_first=False).returncode == 0


def test_the_summary_counts_the_interpreter_cases_that_ran() -> None:
    proc = run_pytest(["-k", "interpret and test_scatter and float32 and vllm_layer", COPY_TESTS],
                      {"UCM_REQUIRE_TRITON_INTERPRET": "1"}, import_triton_first=False)
    counted = SUMMARY.search(proc.stdout)
    assert proc.returncode == 0 and counted is not None, proc.stdout[-2000:]
    ran = re.search(r"(\d+) passed", proc.stdout.splitlines()[-1])
    assert int(counted.group(1)) == int(ran.group(1)) > 0 and counted.group(2) == "0"
