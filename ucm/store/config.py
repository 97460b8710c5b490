"""Reading one field of a store's ``ucm_connector_config``: type/range checks that raise `UcmConfigError`
naming the field and what it accepts. Used by the store classes' constructors."""

from __future__ import annotations

import contextlib
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


def get_mode(config: Mapping[str, Any], field: str, default: int, required: int, allowed: int) -> int:
    """A permission mode: an int (``0o640``) or a string of octal digits (``"0640"``, ``"640"``, ``"0o640"``) with
    every bit of `required` set and none outside `allowed`. JSON has no octal ints: write modes as strings."""
    value = config.get(field, default)
    mode = None
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str) and value.removeprefix("0o").isdigit():
        with contextlib.suppress(ValueError):
            mode = int(value.removeprefix("0o"), 8)
    if mode is None or mode < 0 or mode & ~allowed or mode & required != required:
        raise UcmConfigError(field, value, f"an octal mode such as {default:#o} or {f'{default:04o}'!r}, with at least "
                             f"{required:#o} set and no bits outside {allowed:#o}")
    return mode
