"""Reading one field of a store's ``ucm_connector_config``: type/range checks that raise `UcmConfigError`
naming the field and what it accepts. Used by the store classes' constructors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ucm.errors import UcmConfigError

_MISSING = object()


def get_int(config: Mapping[str, Any], field: str, default: Any = _MISSING, minimum: int = 1) -> int | None:
    """An int >= `minimum` (bools rejected); `default` when absent (None allowed as a default)."""
    value = config.get(field, default)
    if value is _MISSING:
        raise UcmConfigError(field, "<missing>", f"an int >= {minimum} (required)")
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UcmConfigError(field, value, f"an int >= {minimum}")
    return value


def get_bool(config: Mapping[str, Any], field: str, default: bool) -> bool:
    value = config.get(field, default)
    if not isinstance(value, bool):
        raise UcmConfigError(field, value, "true or false")
    return value


def get_float(config: Mapping[str, Any], field: str, default: float, minimum: float = 0.0) -> float:
    value = config.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise UcmConfigError(field, value, f"a number >= {minimum}")
    return float(value)


def get_choice(config: Mapping[str, Any], field: str, default: str, allowed: list[str]) -> str:
    value = config.get(field, default)
    if value not in allowed:
        raise UcmConfigError(field, value, allowed)
    return value
