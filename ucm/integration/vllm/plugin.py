"""The ``vllm.general_plugins`` entry point: installs the UCM sparse hooks in every vLLM process, and the check of
the connector's configuration in the process that builds the engine config (`compat.config_check`).

vLLM calls `register()` in the main process, the engine core and every worker before the scheduler and the
model are built (see ``setup.py``: ``ucm = ucm.integration.vllm.plugin:register``). It loads the bindings of the
installed vLLM release line (`ucm.integration.vllm.compat`) and installs them; each hook is inert until an
engine's KV connector carries a sparse method (``UnifiedCacheConnectorV1`` with ``ucm_sparse_method``).

Engines without a sparse method run exactly as without the plugin. On an unsupported vLLM nothing is installed,
a warning says so, and `require_sparse_hooks()` (called by the connector when a sparse method is configured)
raises `UnsupportedVllmError`, so a sparse configuration never runs silently dense.
"""

from __future__ import annotations

import logging

from ucm.errors import UcmError
from ucm.integration.vllm.compat import (
    UnsupportedVllmError,
    bindings,
    check_vllm_version,
    config_check,
    installed_vllm_version,
)
from ucm.integration.vllm.compat.base import VllmBindings

logger = logging.getLogger(__name__)

# Per-process fact about this module's own patching (not engine state): why the hooks could not be installed.
_unsupported: UnsupportedVllmError | None = None


class SparseHooksNotInstalledError(UcmError, RuntimeError):
    """A sparse method is configured but the plugin did not run in this process."""


def register() -> None:
    """Entry point of ``vllm.general_plugins``; safe to call more than once per process."""
    global _unsupported
    try:  # on every release: a bad connector config fails in the user's process, before any engine starts
        config_check.install()
    except Exception:  # the connector still checks its config when the engine builds it
        logger.exception("UCM connector config check NOT installed in the engine config builder")
    try:
        release = bindings()
    except UnsupportedVllmError as error:
        _unsupported = error
        logger.warning("UCM sparse hooks NOT installed: %s", error)
        return
    try:
        release.install()
    except Exception as error:  # e.g. vllm-ascend's runner moved: refuse sparse later, keep dense engines running
        _unsupported = UnsupportedVllmError(str(installed_vllm_version()), f"installing the hooks failed: {error!r}")
        logger.exception("UCM sparse hooks NOT installed")
        return
    logger.debug("UCM sparse hooks installed for vLLM %s", installed_vllm_version())


def require_sparse_hooks() -> VllmBindings:
    """The installed bindings; raise unless the sparse hooks run in this process (the connector calls it when a
    sparse method is set).

    Raises `UnsupportedVllmError` on an unsupported vLLM, `SparseHooksNotInstalledError` when the plugin was not
    loaded (e.g. ``VLLM_PLUGINS`` does not name ``ucm``, or ``ucm`` is not installed as a package).
    """
    if _unsupported is not None:
        raise _unsupported
    check_vllm_version()  # raises on an unsupported version even if register() never ran
    release = bindings()
    if release.installed():
        return release
    raise SparseHooksNotInstalledError(
        "ucm_sparse_method is set but the UCM vLLM plugin is not loaded in this process: install the ucm package "
        "(entry point vllm.general_plugins 'ucm') and, if VLLM_PLUGINS is set, include 'ucm' in it"
    )
