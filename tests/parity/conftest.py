"""Parity-suite set-up: the implementation fixture, fresh random seeds, and Triton's interpreter on CPU machines.

Without a CUDA device the Triton kernels run on CPU tensors under Triton's interpreter, which must be switched on
before triton is first imported (triton reads ``TRITON_INTERPRET`` while defining its own language functions).
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from parity_impls import IMPLEMENTATIONS, INTERPRET, make_impl  # noqa: E402

from ucm.device.backend import Backend  # noqa: E402


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> Backend:
    """Each registered backend, plus the Triton kernels under the interpreter; unavailable ones skip with why."""
    backend, reason = make_impl(request.param)
    if backend is None and request.param == INTERPRET and os.environ.get("CI") and not torch.cuda.is_available():
        # CI runs on CPU machines, where the interpreter is how the Triton kernels are checked at all: a run that
        # could not switch it on (triton imported first) must fail, not pass with the cases skipped
        pytest.fail(f"{INTERPRET} must run under CI on a CPU machine: {reason}")
    if backend is None:
        print(f"parity: skipping {request.param}: {reason}")
        pytest.skip(f"{request.param}: {reason}")
    return backend


@pytest.fixture(autouse=True)
def fresh_seed(request: pytest.FixtureRequest) -> int:
    """A new seed per test and run (``UCM_PARITY_SEED`` reproduces one); printed, so failures show it."""
    seed = int(os.environ.get("UCM_PARITY_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return seed
