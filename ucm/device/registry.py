"""Finding and choosing a device backend.

Backends register under the entry-point group ``ucm.backends`` (name -> ``module:Class``), so an out-of-tree
accelerator plugs in with its own package. The built-in ones are listed here too, so a source checkout works
without installation metadata.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from ucm.device.backend import Backend
from ucm.errors import BackendUnavailableError, UcmConfigError

ENTRY_POINT_GROUP = "ucm.backends"
ENV_VAR = "UCM_DEVICE_BACKEND"
AUTO_ORDER = ("cuda", "npu", "cpu")
_BUILTIN = {
    "cpu": "ucm.device.cpu:CpuBackend",
    "cuda": "ucm.backends.cuda:CudaBackend",
    "npu": "ucm.backends.npu:NpuBackend",
}


def registered_backends() -> dict[str, str]:
    """Backend name -> ``module:Class`` for the built-in and every installed backend."""
    found = dict(_BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.value
    return found


def backend_class(name: str) -> type[Backend]:
    """The class registered as `name` (imports it; does not check availability)."""
    known = registered_backends()
    if name not in known:
        raise UcmConfigError("device backend", name, sorted(known) + ["auto"])
    module, _, attr = known[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def get_backend(name: str | None = None, device_index: int | None = None) -> Backend:
    """The backend called `name`, else ``$UCM_DEVICE_BACKEND``, else the first available of cuda, npu, cpu.

    Raises `BackendUnavailableError` (with the reason) when the named backend cannot run here.
    """
    name = name or os.environ.get(ENV_VAR) or "auto"
    if name == "auto":
        for candidate in AUTO_ORDER:
            if backend_class(candidate).unavailable_reason() is None:
                return backend_class(candidate)(device_index)
        raise BackendUnavailableError("auto", "no backend is available")  # cpu always is; kept for plugins
    cls = backend_class(name)
    reason = cls.unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(name, reason)
    return cls(device_index)
