"""Runs a kernel check script of this folder (``paged_kernel_check.py``, ``sparse_kernel_check.py``) either under
Triton's interpreter in a fresh process (CPU machines: the interpreter must be on before triton is imported) or
in this process on a CUDA device; the check scripts print one "ok" per case."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent


def run_interpreted(script: str, timeout: int) -> int:
    """Run ``script cpu small`` under TRITON_INTERPRET=1; returns how many cases printed "ok" (asserts success)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(HERE))
    result = subprocess.run([sys.executable, str(HERE / script), "cpu", "small"], env=env, capture_output=True,
                            text=True, timeout=timeout)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.count("ok")


def run_on_cuda(module: str) -> int:
    """Run the module's ``check("cuda", big=True)`` here; returns how many cases it checked."""
    sys.path.insert(0, str(HERE))
    return len(__import__(module).check("cuda", big=True))
