"""The ``vllm.general_plugins`` entry point: installs the UCM sparse hooks in every vLLM process.

vLLM calls `register()` in the main process, the engine core and every worker before the scheduler and the
model are built (see ``setup.py``: ``ucm = ucm.integration.vllm.plugin:register``). It checks the vLLM version
(`ucm.integration.vllm.version`) and installs three hook sets, each inert until an engine's KV connector carries
a sparse method (``UnifiedCacheConnectorV1`` with ``ucm_sparse_method``):

- `scheduler_hooks`: the budget (sparse requests shrink to the algorithm's blocks at their first decode step);
- `model_runner_hooks`: execute begin/finished per model step;
- `attention_hooks`: attention begin/finished per layer, with a sparse block table.

Engines without a sparse method run exactly as without the plugin. On an unsupported vLLM nothing is installed,
a warning says so, and `require_sparse_hooks()` (called by the connector when a sparse method is configured)
raises `UnsupportedVllmError`, so a sparse configuration never runs silently dense.
"""

from __future__ import annotations

import logging

from ucm.errors import UcmError
from ucm.integration.vllm.version import UnsupportedVllmError, check_vllm_version, installed_vllm_version

logger = logging.getLogger(__name__)

# Per-process facts about this module's own patching (not engine state): whether the hooks are in this process.
_installed = False
_unsupported: UnsupportedVllmError | None = None


class SparseHooksNotInstalledError(UcmError, RuntimeError):
    """A sparse method is configured but the plugin did not run in this process."""


def register() -> None:
    """Entry point of ``vllm.general_plugins``; safe to call more than once per process."""
    global _installed, _unsupported
    if _installed:
        return
    try:
        check_vllm_version()
    except UnsupportedVllmError as error:
        _unsupported = error
        logger.warning("UCM sparse hooks NOT installed: %s", error)
        return
    try:
        install_hooks()
    except Exception as error:  # e.g. vllm-ascend's runner moved: refuse sparse later, keep dense engines running
        _unsupported = UnsupportedVllmError(str(installed_vllm_version()), f"installing the hooks failed: {error!r}")
        logger.exception("UCM sparse hooks NOT installed")


def install_hooks() -> None:
    """Install all hook sets in this process (idempotent)."""
    global _installed
    from ucm.integration.vllm import ascend, attention_backends, attention_hooks, model_runner_hooks, scheduler_hooks

    scheduler_hooks.install()
    model_runner_hooks.install()
    attention_hooks.install()
    attention_backends.install_cpu_layout_hook()
    ascend.install()  # vllm-ascend's runner overrides the step methods; no-op without vllm-ascend
    _installed = True
    logger.debug("UCM sparse hooks installed for vLLM %s", installed_vllm_version())


def hooks_installed() -> bool:
    return _installed


def require_sparse_hooks() -> None:
    """Raise unless the sparse hooks run in this process (the connector calls it when a sparse method is set).

    Raises `UnsupportedVllmError` on an unsupported vLLM, `SparseHooksNotInstalledError` when the plugin was not
    loaded (e.g. ``VLLM_PLUGINS`` does not name ``ucm``, or ``ucm`` is not installed as a package).
    """
    if _installed:
        return
    if _unsupported is not None:
        raise _unsupported
    check_vllm_version()  # raises on an unsupported version even if register() never ran
    raise SparseHooksNotInstalledError(
        "ucm_sparse_method is set but the UCM vLLM plugin is not loaded in this process: install the ucm package "
        "(entry point vllm.general_plugins 'ucm') and, if VLLM_PLUGINS is set, include 'ucm' in it"
    )
