"""Which vLLM releases the sparse hooks support, checked once per process by the plugin (`plugin.register`).

The hooks wrap vLLM internals (the attention layer's implementation, the model runner step, the scheduler's KV
block allocation), so they are tied to release lines whose internals were read and tested. Other releases get a
clear error when a sparse method is asked for, never hooks that silently do nothing.
"""

from __future__ import annotations

from ucm.errors import UcmError

#: Release lines (major, minor) the hooks are written and tested against.
SUPPORTED_VLLM: tuple[tuple[int, int], ...] = ((0, 32),)


class UnsupportedVllmError(UcmError, RuntimeError):
    """The installed vLLM is not a release line the sparse hooks support."""

    def __init__(self, version: str, reason: str = ""):
        self.version = version
        supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)
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
    """(major, minor) of a version string such as ``0.32.0`` or ``0.32.1+cpu``; None when unparsable."""
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
