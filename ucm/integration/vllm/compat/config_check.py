"""Checking the connector's configuration in the process that builds vLLM's engine config, before any engine starts.

Installed by the plugin (`ucm.integration.vllm.plugin.register`, run by vLLM's ``EngineArgs.__post_init__`` in the
user's process, and in every engine process) on every vLLM release, supported by the sparse hooks or not. It wraps
``EngineArgs.create_engine_config`` (0.23, 0.26 and 0.32 alike; ``LLM``, ``vllm serve`` and ``AsyncLLM`` all build
their config there): when the KV connector is ``UnifiedCacheConnectorV1`` (alone or inside a ``MultiConnector``),
its ``kv_connector_extra_config`` goes through `ucm.integration.vllm.config.check` first, so a mistake raises one
`UcmConfigError` in the user's process, before the model config is read or an engine core is spawned. What needs
the model (``kv_block_size``) is checked later by the connector itself.

Not ``VllmConfig.__post_init__`` or ``KVTransferConfig.__post_init__``: those are pydantic dataclasses, which turn
a ``ValueError`` raised there (`UcmConfigError` is one) into a ``pydantic.ValidationError``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ucm.integration.vllm.compat.v1_engine import wrap_method

CONNECTOR = "UnifiedCacheConnectorV1"
MULTI_CONNECTOR = "MultiConnector"


def ucm_extra_configs(kv_transfer_config: Any) -> list[Any]:
    """The ``kv_connector_extra_config`` of every ucm connector in ``kv_transfer_config`` (a `KVTransferConfig`,
    its dict form, or None)."""
    if kv_transfer_config is None:
        return []
    connector = _field(kv_transfer_config, "kv_connector")
    extra = _field(kv_transfer_config, "kv_connector_extra_config")
    if connector == CONNECTOR:
        return [extra]
    if connector == MULTI_CONNECTOR and isinstance(extra, Mapping) and isinstance(extra.get("connectors"), list):
        return [_field(child, "kv_connector_extra_config") for child in extra["connectors"]
                if _field(child, "kv_connector") == CONNECTOR]
    return []


def check_kv_transfer_config(kv_transfer_config: Any) -> None:
    """Raise one `UcmConfigError` for the first model-independent mistake in a ucm connector's extra config."""
    from ucm.integration.vllm.config import check

    for extra in ucm_extra_configs(kv_transfer_config):
        check(extra)


def install() -> None:
    """Make ``EngineArgs.create_engine_config`` check the ucm connector configuration first (idempotent)."""
    from vllm.engine.arg_utils import EngineArgs

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
            check_kv_transfer_config(getattr(self, "kv_transfer_config", None))
            return original(self, *args, **kwargs)

        return create_engine_config

    wrap_method(EngineArgs, "create_engine_config", make)


def _field(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
