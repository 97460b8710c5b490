"""`pip install .` (non-editable) and the editable install both map backends/ and kernels/ into ucm, and the
backend packages import without a GPU or torch_npu."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPORTS = "import ucm, ucm.kernels, ucm.backends.cuda, ucm.backends.npu, ucm.device"
PRINT_FILES = "; print(ucm.kernels.__file__); print(ucm.backends.cuda.__file__); print(ucm.backends.npu.__file__)"


def _import_files(env: dict[str, str], cwd: Path) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", IMPORTS + PRINT_FILES], env=env, cwd=cwd, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def test_regular_install_maps_external_folders(tmp_path: Path) -> None:
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for rel in tracked.split():
        if rel.startswith(("ucm/", "backends/", "kernels/")) or rel in ("setup.py", "pyproject.toml"):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(src)],
        check=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    files = _import_files(env, tmp_path)
    assert [Path(f).relative_to(target).parts[:3] for f in files] == [
        ("ucm", "kernels", "__init__.py"),
        ("ucm", "backends", "cuda"),
        ("ucm", "backends", "npu"),
    ]
    # the `ucm-serve` console script (`vllm serve` on every vLLM build) is installed and runs ucm's entry point
    script = (target / "bin" / "ucm-serve").read_text()
    assert "from ucm.integration.vllm.serve import main" in script


def test_editable_install_points_at_repository_folders(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    files = _import_files(env, tmp_path)
    assert [Path(f).parent for f in files] == [REPO / "kernels", REPO / "backends" / "cuda", REPO / "backends" / "npu"]
