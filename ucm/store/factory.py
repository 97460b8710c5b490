"""Store names -> classes, and checking a user's store config before a store is built.

Called by the connector with ``kv_connector_extra_config["ucm_connector_name"]`` and
``["ucm_connector_config"]``. Out-of-tree stores register with `register_store` (or the ``ucm.stores``
entry-point group: name -> ``module:Class``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from ucm.device import Backend, get_backend
from ucm.errors import UcmConfigError
from ucm.store.base import KVStoreBase

ENTRY_POINT_GROUP = "ucm.stores"
_STORES: dict[str, str] = {
    "UcmDram": "ucm.store.dram:DramStore",
    "UcmNfsStore": "ucm.store.nfs:NfsStore",
}


def register_store(name: str, target: str | type[KVStoreBase]) -> None:
    """Make `create_store(name, ...)` build `target` (a class or ``"module:Class"``)."""
    _STORES[name] = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def registered_stores() -> dict[str, str]:
    """Store name -> ``module:Class`` for the built-in and installed stores."""
    found = dict(_STORES)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def store_class(name: str) -> type[KVStoreBase]:
    """The class registered as `name`; `UcmConfigError` listing the known names otherwise."""
    known = registered_stores()
    if not isinstance(name, str) or name not in known:
        raise UcmConfigError("ucm_connector_name", name, sorted(known))
    module, _, attr = known[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def check_config(cls: type[KVStoreBase], config: Mapping[str, Any]) -> None:
    """Raise one `UcmConfigError` for the first unknown field (listing every accepted field) or bad value."""
    if not isinstance(config, Mapping):
        raise UcmConfigError("ucm_connector_config", config, f"a mapping with fields {sorted(cls.config_fields)}")
    accepted = ", ".join(f"{k} ({v})" for k, v in cls.config_fields.items())
    for key in config:
        if key not in cls.config_fields:
            raise UcmConfigError(f"ucm_connector_config.{key}", config[key], f"a field of {cls.name}: {accepted}")
    cls.check_values(config)


def create_store(name: str, config: Mapping[str, Any], backend: Backend | None = None) -> KVStoreBase:
    """Build the store registered as `name` from its ``ucm_connector_config`` (backend: `get_backend()`)."""
    cls = store_class(name)
    check_config(cls, config)
    return cls(config, backend if backend is not None else get_backend())
