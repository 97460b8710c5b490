"""End-to-end test of the accuracy harness CLI: SmolLM2 in vLLM-CPU, full attention vs ESA (sparse_ratio 0.2) on
needle retrieval at 2K tokens and 3 depths, plus the connector without a sparse method, through
`python -m ucm.eval` in a subprocess (about 3-4 minutes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SETTING = "esa-r0.2-s10-a8"  # ESA's defaults at sparse_ratio 0.2 (initial selection by attention)


@pytest.mark.slow
def test_cli_full_vs_esa_on_needle_subset(smollm2_path, tmp_path):
    cmd = [
        sys.executable, "-m", "ucm.eval", "--model", smollm2_path, "--tasks", "needle", "--contexts", "2K",
        "--depths", "0,0.5,1", "--settings", f"full,dense-ucm,{SETTING}", "--out-dir", str(tmp_path), "--name", "ci",
        "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "ci.json").read_text())
    full, esa = report["settings"]["full"], report["settings"][SETTING]
    assert full["complete"] and esa["complete"] and full["cases"] == 3
    # The connector without a sparse method changes nothing: same tokens as plain vLLM (the harness pins vLLM-CPU's
    # thread binding, which a configured connector would otherwise change; see docs/connector.md).
    outputs = {(c["setting"], c["case_id"]): c["output_token_ids"] for c in report["cases"]}
    for (setting, case_id), tokens in outputs.items():
        if setting == "dense-ucm":
            assert tokens == outputs[("full", case_id)], case_id
    for name in ("ci.md", "ci_full.png", f"ci_{SETTING}.png", "ci.log.jsonl"):
        assert (tmp_path / name).stat().st_size > 0

    # Full attention retrieves the needle from real essay text.
    assert full["accuracy"] >= 2 / 3, full
    # Every prompt (16 blocks of 128) is sparse in decode, and attends to about init 1 + 2 of 13 + local 2 blocks.
    assert esa["sparse_requests"] == esa["cases"] and esa["sparse_steps"] >= 3 * 30
    assert 0.2 <= esa["resident_share"] <= 0.35, esa["resident_share"]
    assert full.get("resident_share") is None  # no connector, no sparse counters
    # Needles inside the always-resident windows (first block at depth 0, last blocks at depth 1) are never lost.
    cases = {(c["setting"], c["depth"]): c for c in report["cases"]}
    for depth in (0.0, 1.0):
        if cases[("full", depth)]["correct"]:
            assert cases[(SETTING, depth)]["correct"], cases[(SETTING, depth)]["text"]

    # The goal for ESA at sparse_ratio 0.2; reported as an expected failure (with where) until it holds.
    missed = [m["case_id"] for m in esa["missed_vs_full"]]
    if missed or esa["token_agreement_prefix"] < 0.95:
        pytest.xfail(f"ESA goal not met yet: missed {missed}, token agreement {esa['token_agreement_prefix']}")
