"""End to end: `examples/offline_inference.py` (what `scripts/demo.sh` runs) shows what the connector did: the
second run of the long prompt loads its blocks from UcmDram, ESA attends a share of the dense blocks, vLLM logs
the connector's interval stats, and the process exits without a traceback."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_offline_example_prints_what_the_connector_did() -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "offline_inference.py"), "--prompt-tokens", "900",
         "--max-tokens", "8", "--kv-cache-bytes", str(256 << 20), "--store-bytes", str(64 << 20)],
        capture_output=True, text=True, timeout=540,
    )
    out, log = proc.stdout, proc.stderr
    assert proc.returncode == 0, out[-3000:] + log[-6000:]
    runs = re.findall(r"connector: (\d+) of (\d+) full prompt blocks found in the store, (\d+) loaded, (\d+) failed, "
                      r"(\d+) saved", out)
    assert len(runs) == 2, out
    (hit1, full, _, _, saved1), (hit2, full2, loaded2, failed2, saved2) = [tuple(map(int, r)) for r in runs]
    assert full == full2 >= 5 and hit1 == 0 and saved1 == full
    # vLLM's prefix cache was reset: the repeat found every full block but the last-token one in the store
    assert full - 1 <= hit2 == loaded2 and failed2 == 0 and saved2 == 0
    shares = [int(s) for s in re.findall(r"ESA: decode attended (\d+)% of the KV blocks", out)]
    assert len(shares) == 2 and all(0 < s < 100 for s in shares)
    assert "first token after" in out
    assert "KV Transfer metrics: lookup_blocks=" in out + log  # vLLM's interval stats line: the connector's counters
    assert re.search(rf"== what the connector did: .* {hit2} prompt blocks were loaded from the store", out)
    assert "Traceback" not in log and "EngineDeadError" not in log
    print(f"offline example: {time.monotonic() - started:.1f} s\n{out}")
