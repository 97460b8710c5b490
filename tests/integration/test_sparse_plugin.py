"""The ``vllm.general_plugins`` entry point, the release detection of `ucm.integration.vllm.compat`, and the
vLLM version check of the sparse hooks.

Plugin loading runs in fresh processes (vLLM loads plugins once per process, the hooks patch vLLM classes).
That vLLM loads the entry point and every layer gets hooked is checked in a real engine by
``test_sparse_e2e.py::test_plugin_inactive_without_sparse_config_gives_identical_outputs``."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from ucm.integration.vllm.compat import (
    SUPPORTED_VLLM,
    UnsupportedVllmError,
    check_vllm_version,
    parse_release,
    unsupported_reason,
)


def test_release_parsing() -> None:
    assert parse_release("0.32.0") == (0, 32)
    assert parse_release("0.32.1+cpu") == (0, 32)
    assert parse_release("0.26.0") == (0, 26)
    assert parse_release("0.23.0") == (0, 23)
    assert parse_release("dev") is None


@pytest.mark.parametrize("version", ["0.25.1", "0.31.2", "0.33.0", "1.0.0", "weird", None])
def test_unsupported_versions_get_a_clear_error(version: str | None) -> None:
    assert unsupported_reason(version) is not None
    with pytest.raises(UnsupportedVllmError) as info:
        check_vllm_version(version) if version is not None else _check_missing()
    message = str(info.value)
    assert "supported releases are 0.23.x, 0.26.x, 0.32.x" in message and "ucm_sparse_method" in message


def _check_missing() -> None:
    from ucm.integration.vllm.compat import unsupported_reason as reason

    raise UnsupportedVllmError("none", reason(None))


def test_supported_releases() -> None:
    assert set(SUPPORTED_VLLM) == {(0, 23), (0, 26), (0, 32)}
    for major, minor in SUPPORTED_VLLM:
        assert check_vllm_version(f"{major}.{minor}.0") == f"{major}.{minor}.0"


def test_every_supported_release_has_a_bindings_module() -> None:
    import importlib

    from ucm.integration.vllm.compat.base import VllmBindings

    for release, module in SUPPORTED_VLLM.items():
        bindings = importlib.import_module(module).BINDINGS
        assert isinstance(bindings, VllmBindings) and bindings.release == release


def test_installed_release_is_detected_not_guessed() -> None:
    pytest.importorskip("vllm")
    import vllm

    from ucm.integration.vllm.compat import bindings

    assert bindings().release == parse_release(vllm.__version__)


def _python(python: str, *parts: str, **env: str) -> str:
    code = "\n".join(textwrap.dedent(part) for part in parts)
    # cwd outside the repository: with "-c" it is sys.path[0], and the repository's kernels/ folder would shadow
    # the kernels package vLLM 0.23/0.26 import
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent,
                          timeout=300, env=dict(os.environ, **env))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


HOOKED = """
    from vllm.config import VllmConfig
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    hooked = [getattr(f, "_ucm_sparse_hook", False)
              for f in (Attention.__init__, Scheduler.__init__, GPUModelRunner._model_forward,
                        VllmConfig.use_v2_model_runner.fget)]
"""


def test_the_plugin_installs_every_hook_point(vllm_line) -> None:
    out = _python(vllm_line.python, """
        import inspect
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.core_client import EngineCoreClient
        from ucm.integration.vllm.compat import bindings
    """, HOOKED, """
        # the configuration checks (compat.config_check); the client factories stay static methods
        checks = [getattr(f, "_ucm_sparse_hook", False) for f in (EngineArgs.create_engine_config,
                  EngineCoreClient.make_client, EngineCoreClient.make_async_mp_client)]
        static = [isinstance(inspect.getattr_static(EngineCoreClient, name), staticmethod)
                  for name in ("make_client", "make_async_mp_client")]
        print(hooked, bindings().installed(), checks, static)
    """)
    assert out == "[True, True, True, True] True [True, True, True] [True, True]"


def test_without_the_plugin_a_sparse_config_is_refused(vllm_line) -> None:
    out = _python(vllm_line.python, """
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from ucm.integration.vllm.plugin import SparseHooksNotInstalledError, require_sparse_hooks
    """, HOOKED, """
        try:
            require_sparse_hooks()
        except SparseHooksNotInstalledError as error:
            print(hooked, "VLLM_PLUGINS" in str(error))
    """, VLLM_PLUGINS="")
    assert out == "[False, False, False, False] True"


def test_unsupported_vllm_installs_nothing_and_refuses_sparse(vllm_line) -> None:
    # vLLM reports another release line (only the version string is replaced; everything else is real)
    out = _python(vllm_line.python, """
        import vllm
        vllm.__version__ = "0.99.0"
        from ucm.integration.vllm import plugin
        plugin.register()
        from ucm.integration.vllm.compat import UnsupportedVllmError
    """, HOOKED, """
        try:
            plugin.require_sparse_hooks()
        except UnsupportedVllmError as error:
            print(hooked, "0.99.0" in str(error))
    """)
    assert out == "[False, False, False, False] True"
