"""Attention settings compared by the accuracy harness, and the vLLM engine arguments each one needs.

Owns the names (``full``, ``dense-ucm``, ``esa-r0.2-s10``...) and their translation into a ``kv_transfer_config``
for `UnifiedCacheConnectorV1`. Called by `ucm.eval.__main__` to parse ``--settings`` and by `ucm.eval.runner` to
start one engine per setting.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ucm.errors import UcmConfigError

CONNECTOR_MODULE = "ucm.integration.vllm.uc_connector"
#: The grid of the issue: full attention, then ESA at three ratios and two retrieval strides.
DEFAULT_SETTINGS = (
    "full",
    "esa-r0.1-s1",
    "esa-r0.1-s10",
    "esa-r0.2-s1",
    "esa-r0.2-s10",
    "esa-r0.3-s1",
    "esa-r0.3-s10",
)
_ESA_NAME = re.compile(
    r"^esa-r(?P<ratio>[0-9]*\.?[0-9]+)-s(?P<stride>[0-9]+)(-t(?P<repr>[0-9]+))?(-a(?P<queries>[0-9]+))?$"
)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way to run attention. ``full``: vLLM alone. ``dense-ucm``: the connector without a sparse method.
    ``esa-r<ratio>-s<stride>``: the connector with ESA at that sparse_ratio and retrieval_stride;
    ``esa-r<ratio>-s<stride>-t<tokens>``: also with that ``repr_tokens`` (e.g. ``-t128``: one mean key per 128-token
    block, UCM's representation); ``...-a<N>``: the initial selection by the attention of the last N prompt
    queries (``initial_selection`` "attention", ``initial_queries`` N; ESA's default is ``-a8``); without it the
    initial selection by the representations (``initial_selection`` "representations"), so that a name means
    the same configuration whatever ESA's defaults (the published rows of ``esa-r0.2-s10`` used it)."""

    name: str
    connector: bool
    sparse_ratio: float | None = None
    retrieval_stride: int | None = None
    repr_tokens: int | None = None
    initial_queries: int | None = None

    @property
    def sparse(self) -> bool:
        return self.sparse_ratio is not None

    def extra_config(self, store_bytes: int, esa_overrides: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """``kv_connector_extra_config`` of this setting (None when it runs without the connector)."""
        if not self.connector:
            return None
        extra: dict[str, Any] = {
            "ucm_connector_name": "UcmDram",
            "ucm_connector_config": {"max_cache_size": int(store_bytes)},
        }
        if self.sparse:
            esa = dict(esa_overrides or {})
            esa.update(sparse_ratio=self.sparse_ratio, retrieval_stride=self.retrieval_stride)
            if self.repr_tokens is not None:
                esa["repr_tokens"] = self.repr_tokens
            if self.initial_queries is not None:
                esa.update(initial_selection="attention", initial_queries=self.initial_queries)
            else:
                esa["initial_selection"] = "representations"
            extra["ucm_sparse_method"] = "ESA"
            extra["ucm_sparse_config"] = {"ESA": esa}
        return extra

    def kv_transfer_config(self, store_bytes: int, esa_overrides: dict[str, Any] | None = None) -> Any:
        """vLLM's ``KVTransferConfig`` for this setting, or None for plain vLLM."""
        extra = self.extra_config(store_bytes, esa_overrides)
        if extra is None:
            return None
        from vllm.config import KVTransferConfig

        return KVTransferConfig(
            kv_connector="UnifiedCacheConnectorV1",
            kv_connector_module_path=CONNECTOR_MODULE,
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        )


def parse_setting(name: str) -> Setting:
    """``full`` | ``dense-ucm`` | ``esa-r<ratio>-s<stride>[-t<repr_tokens>][-a<initial_queries>]`` (e.g.
    ``esa-r0.2-s10``)."""
    name = name.strip()
    if name == "full":
        return Setting("full", connector=False)
    if name == "dense-ucm":
        return Setting("dense-ucm", connector=True)
    m = _ESA_NAME.match(name)
    if m:
        ratio, stride = float(m["ratio"]), int(m["stride"])
        tokens = int(m["repr"]) if m["repr"] is not None else None
        queries = int(m["queries"]) if m["queries"] is not None else None
        if 0.0 < ratio <= 1.0 and stride >= 1 and (tokens is None or tokens >= 1) and (queries is None or queries >= 1):
            suffix = (f"-t{tokens}" if tokens is not None else "") + (f"-a{queries}" if queries is not None else "")
            return Setting(f"esa-r{ratio:g}-s{stride}{suffix}", connector=True, sparse_ratio=ratio,
                           retrieval_stride=stride, repr_tokens=tokens, initial_queries=queries)  # fmt: skip
    raise UcmConfigError(
        "settings", name,
        "'full', 'dense-ucm' or 'esa-r<ratio in (0,1]>-s<stride >= 1>[-t<repr_tokens >= 1>][-a<initial_queries >= 1>]'",
    )


def parse_settings(spec: str | list[str]) -> list[Setting]:
    """A comma-separated list (or a list) of setting names; ``full`` is always first (the reference)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    settings: list[Setting] = []
    for name in names:
        if not name.strip():
            continue
        s = parse_setting(name)
        if s.name not in {x.name for x in settings}:
            settings.append(s)
    if not settings:
        raise UcmConfigError("settings", spec, "at least one setting")
    settings.sort(key=lambda s: s.name != "full")
    return settings
