"""Backend selection: automatic order, explicit names, the environment variable, clear errors, and an
out-of-tree backend registered through the `ucm.backends` entry-point group of a really installed package."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch

from ucm.device import get_backend, registered_backends
from ucm.device.cpu import CpuBackend
from ucm.device.registry import ENV_VAR
from ucm.errors import BackendUnavailableError, UcmConfigError


def test_builtin_backends_are_registered() -> None:
    assert {"cpu", "cuda", "npu"} <= set(registered_backends())


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks cuda on a GPU machine")
def test_auto_falls_back_to_cpu_without_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert isinstance(get_backend(), CpuBackend)


def test_env_var_selects_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert get_backend().name == "cpu"
    monkeypatch.setenv(ENV_VAR, "nope")
    with pytest.raises(UcmConfigError, match="'cpu', 'cuda', 'npu'"):
        get_backend()


def test_explicit_name_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "nope")
    assert get_backend("cpu").name == "cpu"


def test_unknown_backend_lists_known_names() -> None:
    with pytest.raises(UcmConfigError) as err:
        get_backend("tpu")
    assert "device backend='tpu'" in str(err.value) and "'auto'" in str(err.value)


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed here")
def test_npu_without_torch_npu_says_why() -> None:
    with pytest.raises(BackendUnavailableError, match="torch_npu is not installed"):
        get_backend("npu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_gpu_says_why() -> None:
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        get_backend("cuda")


def test_out_of_tree_backend_plugs_in_through_entry_point(tmp_path) -> None:
    """A separately installed package adds backend 'fakeaccel' without touching ucm."""
    src = tmp_path / "src"
    (src / "fakeaccel").mkdir(parents=True)
    (src / "fakeaccel" / "__init__.py").write_text(
        textwrap.dedent(
            """
            from ucm.device.cpu import CpuBackend

            class FakeAccelBackend(CpuBackend):
                name = "fakeaccel"
            """
        )
    )
    (src / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools>=64"]
            build-backend = "setuptools.build_meta"
            [project]
            name = "fakeaccel"
            version = "0.1"
            [project.entry-points."ucm.backends"]
            fakeaccel = "fakeaccel:FakeAccelBackend"
            """
        )
    )
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(src)],
        check=True,
    )
    code = "from ucm.device import get_backend; b = get_backend('fakeaccel'); print(type(b).__name__, b.name)"
    out = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    ).stdout
    assert out.split() == ["FakeAccelBackend", "fakeaccel"]
