"""Under CI on a CPU machine, a parity run whose Triton interpreter could not be switched on fails (it would
otherwise pass with every interpreter case skipped)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

# triton imported before the parity conftest runs, as in one pytest process with the vLLM tests
RUN = ("import sys, triton, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-x', '-k', "
       "'interpret', "
       f"{str(HERE / 'test_block_copy.py')!r}]))")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter guard applies to CPU machines")
@pytest.mark.parametrize("ci", ["1", ""])
def test_interpreter_cases_fail_under_ci_when_the_interpreter_is_off(ci: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CI")}
    if ci:
        env["CI"] = ci
    proc = subprocess.run([sys.executable, "-c", RUN], cwd=HERE.parent.parent, env=env, capture_output=True,
                          text=True, timeout=300)
    if ci:
        assert proc.returncode != 0 and "must run under CI on a CPU machine" in proc.stdout, proc.stdout[-2000:]
    else:  # outside CI the cases skip, saying why
        assert proc.returncode == 0 and "skipped" in proc.stdout, proc.stdout[-2000:]
