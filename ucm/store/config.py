"""Reading one field of a store's ``ucm_connector_config``: type/range checks that raise `UcmConfigError`
naming the field as the user writes it (``ucm_connector_config.<field>``) and what it accepts. Used by the
store classes' `check_values` (run by the connector before any engine starts) and constructors."""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import stat
from collections.abc import Mapping
from typing import Any

from ucm.errors import UcmConfigError

_MISSING = object()
#: Where a store's fields sit in ``kv_connector_extra_config``: errors name ``ucm_connector_config.<field>``.
FIELD_PREFIX = "ucm_connector_config."
#: Largest ``kv_block_size``: one vLLM block of every layer of one worker (a 405B model's 128-token block of K
#: and V in bf16 is 63 MiB); larger values are unit mistakes, and a store stages whole blocks in pinned memory.
MAX_KV_BLOCK_SIZE = 1 << 30


def user_field(field: str) -> str:
    """The name of a store field as the user writes it in ``kv_connector_extra_config``."""
    return FIELD_PREFIX + field


def config_error(field: str, value: Any, allowed: Any) -> UcmConfigError:
    """The `UcmConfigError` of store field `field`, named as the user writes it."""
    return UcmConfigError(user_field(field), value, allowed)


def get_int(
    config: Mapping[str, Any],
    field: str,
    default: Any = _MISSING,
    minimum: int = 1,
    maximum: int | None = None,
    why: str = "",
) -> int | None:
    """An int in [`minimum`, `maximum`]; `default` when absent (None allowed as a default); `why` explains the
    bound in the error.

    Only integers count (Python or numpy ints): a bool, a float (even 5e9) or a string such as ``"5GB"`` is one
    and the same error, so a size is never rounded or parsed into something the user did not write."""
    value = config.get(field, default)
    bound = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"
    if why:
        bound += f" ({why})"
    # sizes (fields named *_size / *_bytes) are bytes; JSON has no 5 << 30, so the example is a literal
    unit = "bytes, e.g. 5368709120 for 5 GiB, not '5GB'; " if field.endswith(("_size", "_bytes")) else ""
    expected = f"{bound}: a plain integer ({unit}not a bool, float or string)"
    if value is _MISSING:
        raise config_error(field, "<missing>", f"{expected} (required)")
    if value is None and default is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        raise config_error(field, value, expected)
    return int(value)


def physical_memory_bytes() -> int | None:
    """This machine's physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not POSIX, or the name is unknown here
        return None


def get_pinned_size(config: Mapping[str, Any], field: str) -> int:
    """A required size in bytes of host memory pinned at start, at most this machine's physical memory.

    Checked before anything is allocated: a larger request can only fail in the allocator (or get the process
    killed), after the model loaded. Below the bound, a size the machine still cannot pin fails at allocation."""
    limit = physical_memory_bytes()
    why = "" if limit is None else (
        f"pinned host memory: at most this machine's physical memory, {limit / 2**30:.1f} GiB")
    size = get_int(config, field, maximum=limit, why=why)
    assert size is not None  # required: a missing field raised
    return size


def get_bool(config: Mapping[str, Any], field: str, default: bool) -> bool:
    value = config.get(field, default)
    if not isinstance(value, bool):
        raise config_error(field, value, "true or false")
    return value


def get_float(
    config: Mapping[str, Any], field: str, default: float, minimum: float = 0.0, why: str = ""
) -> float:
    """A finite number >= `minimum` (NaN, infinities, bools and strings rejected); `why` is added to the error."""
    value = config.get(field, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < minimum
    ):
        raise config_error(field, value, f"a finite number >= {minimum:g}" + (f" ({why})" if why else ""))
    return float(value)


def get_choice(config: Mapping[str, Any], field: str, default: str, allowed: list[str]) -> str:
    value = config.get(field, default)
    if not isinstance(value, str) or value not in allowed:  # unhashable values compare unequal, never raise
        raise config_error(field, value, allowed)
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
        raise config_error(field, value, f"an octal mode such as {default:#o} or {f'{default:04o}'!r}, with at least "
                             f"{required:#o} set and no bits outside {allowed:#o}")
    return mode


def get_secret_file(config: Mapping[str, Any], field: str, min_bytes: int, max_bytes: int = 4096) -> bytes | None:
    """The secret held by the regular file whose path is `field` (surrounding whitespace removed, e.g. the newline
    after a hex key), or None when the field is absent. Errors name the path and never show the content."""
    path = config.get(field)
    if path is None:
        return None
    expected = f"the path of a regular file holding a secret of {min_bytes} to {max_bytes} bytes"
    if not isinstance(path, str) or not path or "\0" in path:
        raise config_error(field, path, expected)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block the start
    except OSError as exc:
        raise config_error(field, path, f"{expected} ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise config_error(field, path, f"{expected} (not a regular file)")
        secret = os.read(fd, 4 * max_bytes).strip()
    finally:
        os.close(fd)
    if not min_bytes <= len(secret) <= max_bytes:
        raise config_error(field, path, f"{expected} (it holds {len(secret)} bytes)")
    return secret
