"""`bench/accuracy/selection_ceiling.py` on SmolLM2 (transformers, CPU): at budget 1.0 every sparse mode attends
every prompt block and decodes dense's tokens; at 0.2 the per-step oracle attends a fifth of the candidates; the
report says it per mode, is rewritten from the JSON alone, and a misspelt mode is one clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "accuracy" / "selection_ceiling.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_full_budget_decodes_dense_tokens_and_the_report_is_rewritten(smollm2_path, tmp_path):
    out = tmp_path / "ceiling"
    grid = ["--model", smollm2_path, "--tasks", "needle", "--contexts", "2K", "--depths", "0.5", "--samples", "1"]
    proc = _run(*grid, "--ratio", "1.0", "--modes", "dense,esa,initial,oracle@1.0,oracle@0.2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 1
    modes = rows[0]["modes"]
    assert all(len(m["tokens"]) == 32 for m in modes.values())
    for name in ("esa", "initial", "oracle@1.0"):  # every candidate kept: the dense decode, token for token
        assert modes[name]["tokens"] == modes["dense"]["tokens"], name
        assert modes[name]["prefix"] == 1.0
    report = out.with_suffix(".md").read_text()
    for name in modes:
        assert f"| {name} |" in report
    assert "Answers the dense decode gives and a mode loses" in report

    note = tmp_path / "note.md"
    note.write_text("## Reading\n\nchecked\n")
    out.with_suffix(".md").unlink()
    again = _run("--out", str(out), "--report-only", "--note", str(note))
    assert again.returncode == 0, again.stderr[-3000:]
    rewritten = out.with_suffix(".md").read_text()
    assert rewritten.startswith(report.rstrip("\n")) and rewritten.rstrip().endswith("checked")


def test_a_misspelt_mode_is_one_clear_error(tmp_path):
    proc = _run("--modes", "dense,oracle@2", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert "--modes: unknown mode 'oracle@2'" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_a_case_id_outside_the_grid_is_one_clear_error(smollm2_path, tmp_path):
    proc = _run("--model", smollm2_path, "--tasks", "needle", "--contexts", "2K", "--depths", "0.5", "--samples", "1",
                "--only", "needle/2048/0.3000/0", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert "--only: ['needle/2048/0.3000/0'] are not cases of this grid" in proc.stderr
    assert not (tmp_path / "x.json").exists()
