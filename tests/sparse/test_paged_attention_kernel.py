"""The Triton paged decode-attention kernel equals the PyTorch reference (dense and sparse block tables)."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import run_interpreted, run_on_cuda


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the compiled kernel is tested")
def test_kernel_matches_reference_interpreted_on_cpu():
    pytest.importorskip("triton")
    assert run_interpreted("paged_kernel_check.py", timeout=300) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_matches_reference_on_cuda():
    assert run_on_cuda("paged_kernel_check") == 4
