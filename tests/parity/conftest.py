"""Parity-suite set-up: the implementation fixture, fresh random seeds, and Triton's interpreter on CPU machines.

Without a CUDA device the Triton kernels run on CPU tensors under Triton's interpreter, which must be switched on
before triton is first imported (triton reads ``TRITON_INTERPRET`` while defining its own language functions).
``scripts/test.sh`` therefore runs ``tests/parity`` in a pytest process of its own, with
``UCM_REQUIRE_TRITON_INTERPRET=1``: there (and under CI, ``CI`` set) an interpreter that could not be switched on
fails the run instead of skipping its cases, and a run that selected interpreter cases but passed none fails too.
The terminal summary counts the interpreter cases, so a CI log shows that they ran.
"""

from __future__ import annotations

import collections
import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from parity_impls import IMPLEMENTATIONS, INTERPRET, make_impl  # noqa: E402

from ucm.device.backend import Backend  # noqa: E402

#: On a CPU machine the interpreter is how the Triton kernels are checked at all: in CI and in scripts/test.sh's
#: own parity run its cases must run, never skip as a whole.
REQUIRE_INTERPRETER = not torch.cuda.is_available() and bool(
    os.environ.get("CI") or os.environ.get("UCM_REQUIRE_TRITON_INTERPRET") == "1"
)
_INTERPRETED = ("impl", INTERPRET)  # user property of the cases that ran on the interpreter
_outcomes: collections.Counter[str] = collections.Counter()  # this pytest session's interpreter case outcomes


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> Backend:
    """Each registered backend, plus the Triton kernels under the interpreter; unavailable ones skip with why."""
    backend, reason = make_impl(request.param)
    if backend is None and request.param == INTERPRET and REQUIRE_INTERPRETER:
        # e.g. triton imported before this conftest: passing with the cases skipped would hide every kernel bug
        pytest.fail(f"{INTERPRET} must run on a CPU machine under CI or UCM_REQUIRE_TRITON_INTERPRET=1: {reason}")
    if backend is None:
        print(f"parity: skipping {request.param}: {reason}")
        pytest.skip(f"{request.param}: {reason}")
    if request.param == INTERPRET:
        request.node.user_properties.append(_INTERPRETED)
    return backend


@pytest.fixture(autouse=True)
def fresh_seed(request: pytest.FixtureRequest) -> int:
    """A new seed per test and run (``UCM_PARITY_SEED`` reproduces one); printed, so failures show it."""
    seed = int(os.environ.get("UCM_PARITY_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return seed


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count each interpreter case once: its call, or the set-up that failed or skipped it."""
    if _INTERPRETED in report.user_properties and (report.when == "call" or report.outcome != "passed"):
        _outcomes[report.outcome] += 1


def pytest_sessionfinish(session: pytest.Session) -> None:
    selected = sum(1 for item in session.items if getattr(item, "callspec", None)
                   and item.callspec.params.get("impl") == INTERPRET)
    if REQUIRE_INTERPRETER and selected and not _outcomes["passed"] and session.exitstatus == pytest.ExitCode.OK:
        _outcomes["selected, none passed"] = selected
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _outcomes or REQUIRE_INTERPRETER:
        counts = ", ".join(f"{_outcomes[k]} {k}" for k in ("passed", "failed", "skipped"))
        terminalreporter.write_line(f"parity: Triton kernels under the interpreter ({INTERPRET}): {counts}")
    if _outcomes["selected, none passed"]:
        terminalreporter.write_line(f"parity: FAILED: {_outcomes['selected, none passed']} {INTERPRET} cases were "
                                    "selected and none passed: on a CPU machine they must run", red=True)
