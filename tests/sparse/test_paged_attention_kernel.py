"""The Triton paged decode-attention kernel equals the PyTorch reference (dense and sparse block tables)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the compiled kernel is tested")
def test_kernel_matches_reference_interpreted_on_cpu():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(HERE))
    result = subprocess.run([sys.executable, str(HERE / "paged_kernel_check.py"), "cpu", "small"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok") == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_matches_reference_on_cuda():
    sys.path.insert(0, str(HERE))
    from paged_kernel_check import check

    assert len(check("cuda", big=True)) == 4
