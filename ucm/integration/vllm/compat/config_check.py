"""Connector configuration errors early and once: checked in the process that builds vLLM's engine config, before
any engine starts; the ones that need the model are raised in that process too, once the engine failed.

Installed by the plugin (`ucm.integration.vllm.plugin.register`, run by vLLM's ``EngineArgs.__post_init__`` in the
user's process, and in every engine process) on every vLLM release, supported by the sparse hooks or not:

- ``EngineArgs.create_engine_config`` (0.23, 0.26 and 0.32 alike; ``LLM``, ``vllm serve`` and ``AsyncLLM`` all
  build their config there): when the KV connector is ``UnifiedCacheConnectorV1`` (alone or inside a
  ``MultiConnector``), its ``kv_connector_extra_config`` goes through `ucm.integration.vllm.config.check` first, so
  a mistake raises one `UcmConfigError` in the user's process, before the model config is read or an engine core
  is spawned.
- What needs the model (``kv_block_size``, the registered KV caches, a ``max_cache_size`` that cannot be pinned)
  is checked by the connector in the engine's processes, after the model loaded. vLLM logs an error there several
  times and the user's process would only get ``RuntimeError: Engine core initialization failed``. So
  ``EngineCoreClient.make_client`` / ``make_async_mp_client`` first make an empty report file private to the user
  (``$TMPDIR/ucm-config-error-<uid>-<VllmConfig.instance_id>.json``); an engine process on this machine writes
  its `UcmConfigError` there (`reporting_config_errors`) and raises a short `UcmConfigErrorReported` for vLLM to
  log, and the factory raises the `UcmConfigError` in the user's process: the full message is printed once, as
  the last error a user reads. An engine process that finds no report file (e.g. a worker on another node)
  raises the `UcmConfigError` itself, for vLLM to log.

Not ``VllmConfig.__post_init__`` or ``KVTransferConfig.__post_init__``: those are pydantic dataclasses, which turn
a ``ValueError`` raised there (`UcmConfigError` is one) into a ``pydantic.ValidationError``.
"""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ucm.errors import UcmConfigError, UcmError
from ucm.integration.vllm.compat.v1_engine import wrap_method

CONNECTOR = "UnifiedCacheConnectorV1"
MULTI_CONNECTOR = "MultiConnector"
_REPORT_PREFIX = "ucm-config-error-"
_MAX_REPORT_BYTES = 1 << 16


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
    """Check the ucm connector configuration in ``EngineArgs.create_engine_config``, and raise an engine's reported
    configuration error where the engine client is made (idempotent)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.core_client import EngineCoreClient

    def check_first(original: Callable[..., Any]) -> Callable[..., Any]:
        def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
            check_kv_transfer_config(getattr(self, "kv_transfer_config", None))
            return original(self, *args, **kwargs)

        return create_engine_config

    wrap_method(EngineArgs, "create_engine_config", check_first)
    wrap_method(EngineCoreClient, "make_client", _raising_reported_errors)
    wrap_method(EngineCoreClient, "make_async_mp_client", _raising_reported_errors)


class UcmConfigErrorReported(UcmError, RuntimeError):
    """Raised in an engine process instead of a `UcmConfigError` that was handed to the user's process, which
    raises it in full (so vLLM's logs of the engine's failure do not repeat it)."""

    def __init__(self, field: str):
        self.field = field
        super().__init__(f"ucm connector configuration: {field} is invalid; the full error is raised in the process "
                         "that started the engine")


@contextlib.contextmanager
def reporting_config_errors(vllm_config: Any) -> Iterator[None]:
    """In an engine process: hand a `UcmConfigError` leaving the block to the user's process when it waits for one
    (it made the report file, on this machine) and raise `UcmConfigErrorReported` instead; otherwise (e.g. a
    worker on another node) raise the error itself, for vLLM to log."""
    try:
        yield
    except UcmConfigError as error:
        if _write_report(report_path(vllm_config), error):
            raise UcmConfigErrorReported(error.field) from None
        raise


def report_path(vllm_config: Any) -> Path | None:
    """Where the engines of `vllm_config` report a configuration error (None without an instance id)."""
    instance = str(getattr(vllm_config, "instance_id", "") or "")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", instance):
        return None
    return Path(tempfile.gettempdir()) / f"{_REPORT_PREFIX}{_uid()}-{instance}.json"


def _raising_reported_errors(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an engine-client factory that starts the engine: it makes the (empty) report file first, and a start
    that failed on a reported configuration error raises that error."""
    signature = inspect.signature(original)

    def make_engine_client(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(*args, **kwargs).arguments
        # with client_addresses the engines were started by another process: it waits for their reports
        path = None if bound.get("client_addresses") else report_path(bound.get("vllm_config"))
        if path is not None and not _make_report_file(path):
            path = None
        try:
            return original(*args, **kwargs)
        except Exception:
            reported = _read_report(path)
            if reported is None:
                raise
            # instead of vLLM's "Engine core initialization failed. See root cause above."
            raise reported from None
        finally:
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()

    return make_engine_client


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _make_report_file(path: Path) -> bool:
    """An empty report file only this user can read; False where it cannot be made (or the name is taken)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600))
    except OSError:
        return False
    return True


def _write_report(path: Path | None, error: UcmConfigError) -> bool:
    """Write `error` into the user's process's report file; True when that file holds an error now (the first
    writer's: every worker may raise the same one). False when there is no such file here."""
    if path is None:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | _NOFOLLOW)  # never created here: its owner is waiting for it
    except OSError:
        return False
    with os.fdopen(fd, "w") as report:
        info = os.fstat(report.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != _uid():
            return False
        fcntl.flock(report.fileno(), fcntl.LOCK_EX)  # released on close
        if os.fstat(report.fileno()).st_size == 0:
            report.write(json.dumps({"field": error.field, "value": error.value, "allowed": error.allowed},
                                    default=repr))
    return True


def _read_report(path: Path | None) -> UcmConfigError | None:
    if path is None:
        return None
    try:
        text = path.read_bytes()[:_MAX_REPORT_BYTES]
        fields = json.loads(text)
        return UcmConfigError(str(fields["field"]), fields["value"], str(fields["allowed"]))
    except (OSError, ValueError, KeyError, TypeError):  # no report (empty file): another failure
        return None


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


def _field(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
