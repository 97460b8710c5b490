"""bench/gpu_e2e_summary.py: one row per case from gpu_e2e result files, ratios and targets, clear errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_e2e_summary", ROOT / "bench" / "gpu_e2e_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(case: str, setting: str, tok_s: float, gpu: str = "NVIDIA H100 80GB HBM3", commit: str = "abc1234") -> dict:
    return {"case": case, "context": 32768, "batch": 8, "setting": setting, "decode_tok_s": tok_s,
            "tpot_ms_median": 8000 / tok_s, "tpot_ms_p90": 9000 / tok_s, "ttft_s": 1.0, "resident_share": 0.2,
            "gpu": gpu, "vllm": "0.26.0", "commit": commit,
            "split": {"host_ms_per_step": 3.0, "load_wait_ms_per_step": 0.5, "retrievals_per_step": 2.0,
                      "layer_blocks_loaded_per_step": 100.0}}


def _write(path: Path, rows: list[dict], **meta) -> Path:
    path.write_text(json.dumps({"rows": rows, **meta}))
    return path


def test_pairs_dense_and_the_default_esa_row_of_one_run_and_lists_unmeasured_cases(tmp_path):
    run = _write(tmp_path / "run.json", [_row("32Kx8", "dense", 400.0), _row("32Kx8", "esa-noahead", 500.0),
                                         _row("32Kx8", "esa-ahead", 800.0)], ahead_ratio=0.4)
    out = tmp_path / "report"
    _module().main(["--pick", f"32Kx8={run}", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert [(r["setting"], r["run_setting"], r["decode_tok_s"]) for r in data["rows"]] == [
        ("dense", "dense", 400.0), ("esa", "esa-ahead", 800.0)]
    assert "defaults_decode_tok_s" not in data["rows"][1]
    assert set(data["not_measured"]) == {"32Kx1", "128Kx1", "128Kx4", "capacity"}
    md = out.with_suffix(".md").read_text()
    line = next(line for line in md.splitlines() if line.startswith("| 32Kx8 "))
    assert "**2.00x**" in line and "| yes |" in line
    assert "| 128Kx4 | - | - | - | - | **not measured** |" in md


def test_a_named_setting_and_a_second_file_for_dense(tmp_path):
    esa = _write(tmp_path / "esa.json", [_row("capacity", "esa-full", 600.0, commit="e1")])
    dense = _write(tmp_path / "dense.json", [_row("capacity", "dense", 500.0, commit="d1")])
    out = tmp_path / "report"
    _module().main(["--pick", f"capacity={esa}@esa-full,{dense}", "--out", str(out)])
    line = next(x for x in out.with_suffix(".md").read_text().splitlines() if x.startswith("| capacity "))
    assert "**1.20x**" in line and "| no |" in line and "d1 / e1" in line
    assert "- capacity: `esa-full`; ESA's defaults in the same run: not run." in out.with_suffix(".md").read_text()


def test_a_setting_other_than_the_defaults_names_the_defaults_rate_of_the_same_run(tmp_path):
    run = _write(tmp_path / "run.json", [_row("32Kx8", "dense", 400.0), _row("32Kx8", "esa-noahead", 420.0),
                                         _row("32Kx8", "esa-ahead", 540.0)],
                 command="python bench/gpu_e2e.py --settings esa-ahead,esa-noahead,dense --ahead-ratio 0.4")
    out = tmp_path / "report"
    _module().main(["--pick", f"32Kx8={run}@esa-noahead", "--out", str(out)])
    md = out.with_suffix(".md").read_text()
    assert "**1.05x**" in next(x for x in md.splitlines() if x.startswith("| 32Kx8 "))
    assert "- 32Kx8: `esa-noahead`; ESA's defaults in the same run: 540.0 tok/s (1.35x)." in md
    esa = json.loads(out.with_suffix(".json").read_text())["rows"][1]
    assert esa["run_setting"] == "esa-noahead" and esa["defaults_decode_tok_s"] == 540.0


def test_an_esa_ahead_run_of_another_ratio_is_not_the_defaults(tmp_path):
    # a run that does not record its ratio ran esa-ahead at 0.25, the bench's default then
    run = _write(tmp_path / "run.json", [_row("32Kx8", "dense", 400.0), _row("32Kx8", "esa-ahead", 540.0)])
    out = tmp_path / "report"
    with pytest.raises(SystemExit, match="no measured 32Kx8 row with ESA's defaults"):
        _module().main(["--pick", f"32Kx8={run}", "--out", str(out)])
    _module().main(["--pick", f"32Kx8={run}@esa-ahead", "--out", str(out)])
    assert "- 32Kx8: `esa-ahead`; ESA's defaults in the same run: not run." in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("spec, message", [
    ("64Kx2={run}", "CASE one of"),
    ("32Kx1={run}", "no measured 32Kx1 row with ESA's defaults"),
    ("32Kx8={run}@esa-ahead", "no measured 32Kx8 row of setting esa-ahead"),
    ("32Kx8={missing}", "cannot read the rows"),
])
def test_bad_picks_name_what_is_wrong(tmp_path, spec, message):
    run = _write(tmp_path / "run.json", [_row("32Kx8", "dense", 400.0), _row("32Kx8", "esa", 500.0)])
    with pytest.raises(SystemExit, match=message):
        _module().main(["--pick", spec.format(run=run, missing=tmp_path / "none.json"), "--out",
                        str(tmp_path / "r")])


def test_the_summarys_defaults_are_esas_defaults():
    from ucm.sparse.config import EsaConfig

    assert _module().DEFAULT_PREFETCH == EsaConfig().prefetch_ratio
