"""The Python blocks of docs/connector.md run as they are written (a fresh interpreter each, a temporary working
directory), so the documented configuration cannot drift from what the connector and vLLM accept."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["docs/connector.md"]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", path.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_every_doc_has_its_blocks_found() -> None:
    assert [len(python_blocks(ROOT / doc)) for doc in DOCS] == [1]  # a new block is run by the test below


@pytest.mark.parametrize(("doc", "index"), [(doc, i) for doc in DOCS for i in range(len(python_blocks(ROOT / doc)))])
def test_python_block_runs(doc: str, index: int, tmp_path: Path) -> None:
    code = python_blocks(ROOT / doc)[index]
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    # one process for the engine: a quicker start on CPU; the snippet itself is unchanged
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, f"{doc} python block {index} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    print(f"{doc} block {index}: {time.monotonic() - started:.1f} s\n{proc.stdout}")
