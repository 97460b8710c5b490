"""bench/esa_host_steps.py at a small shape, as a subprocess (its command line, its JSON): the real ESA worker in
boundary mode loads blocks ahead between retrievals, attends about its budget, and the host time is split
before / after the forward; the profile is written where asked."""

from __future__ import annotations

import json
import pstats
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_small_run_loads_ahead_and_splits_the_host_time(tmp_path):
    out, prof = tmp_path / "steps.json", tmp_path / "steps.prof"
    cmd = [sys.executable, str(ROOT / "bench" / "esa_host_steps.py"), "--requests", "2", "--context", "4096",
           "--layers", "4", "--steps", "30", "--warmup", "5", "--profile", "--profile-out", str(prof), "--breakdown",
           "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(out.read_text())
    assert run["decode_steps"] == 25 and len(run["steps"]) == 25
    # boundary mode: no step ran the layer hooks; three retrieval cycles (stride 10) loaded new blocks ahead
    assert not any(s["per_layer"] for s in run["steps"])
    assert sum(s["retrievals"] > 0 for s in run["steps"]) >= 2
    assert 0 < run["of_which_ahead"] <= run["layer_blocks_loaded_per_step"]
    assert 0.15 < run["resident_share"] < 0.3
    split = run["host_ms_per_step"]
    assert split["before_forward_mean"] > 0 and split["after_forward_mean"] > 0
    assert abs(split["before_forward_mean"] + split["after_forward_mean"] - split["mean"]) < 0.01
    # the phases' wall time: loads ahead and their store calls ran, and a phase includes what it calls
    spent = run["breakdown_ms_per_step"]
    assert spent["Esa._prefetch"] > 0 and 0 < spent["DramStore.load_pinned_layers"] <= spent["Esa._load_layers"]
    assert spent["Esa._consume_plan"] <= spent["Esa._consume_pending"] <= split["before_forward_mean"]
    names = {name for _, _, name in pstats.Stats(str(prof)).stats}
    assert {"execute_begin", "execute_finished", "_prefetch"} <= names
