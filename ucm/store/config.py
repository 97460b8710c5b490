"""Reading one field of a store's ``ucm_connector_config``: type/range checks that raise `UcmConfigError`
naming the field as the user writes it (``ucm_connector_config.<field>``) and what it accepts. Used by the store
classes' constructors."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

from ucm.errors import UcmConfigError

_MISSING = object()


def user_field(field: str) -> str:
    """The name of a store field as the user writes it in ``kv_connector_extra_config``."""
    return f"ucm_connector_config.{field}"


def get_int(config: Mapping[str, Any], field: str, default: Any = _MISSING, minimum: int = 1) -> int | None:
    """An int >= `minimum`; `default` when absent (None allowed as a default).

    Only integers count (Python or numpy ints): a bool, a float (even 5e9) or a string such as ``"5GB"`` is one
    and the same error, so a size is never rounded or parsed into something the user did not write."""
    value = config.get(field, default)
    expected = f"an int >= {minimum} (a plain integer, e.g. bytes as 5 << 30; not a bool, float or string)"
    if value is _MISSING:
        raise UcmConfigError(user_field(field), "<missing>", expected + " (required)")
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UcmConfigError(user_field(field), value, expected)
    return int(value)


def get_bool(config: Mapping[str, Any], field: str, default: bool) -> bool:
    value = config.get(field, default)
    if not isinstance(value, bool):
        raise UcmConfigError(user_field(field), value, "true or false")
    return value


def get_float(config: Mapping[str, Any], field: str, default: float, minimum: float = 0.0) -> float:
    """A number >= `minimum` (int or float; a bool or a string is an error)."""
    value = config.get(field, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= minimum:  # also rejects NaN
        raise UcmConfigError(user_field(field), value, f"a number >= {minimum} (not a bool or string)")
    return float(value)


def get_choice(config: Mapping[str, Any], field: str, default: str, allowed: list[str]) -> str:
    value = config.get(field, default)
    if not isinstance(value, str) or value not in allowed:  # unhashable values compare unequal, never raise
        raise UcmConfigError(user_field(field), value, allowed)
    return value
