"""The connector's configuration: `kv_connector_extra_config` parsed and checked against the model.

Owned by the connector (`ucm.integration.vllm.uc_connector`), which builds one `ConnectorConfig` per role at
engine start; `check` (everything that does not need the model) also runs earlier, in the process that builds
vLLM's engine config (`ucm.integration.vllm.compat.config_check`). Every mistake raises one `UcmConfigError`
naming the field, the value and what is accepted, so the engine fails to start with a message a user can act on
(never a half-working engine).

Fields (all under ``kv_connector_extra_config``)::

    ucm_connector_name      store name: "UcmDram" | "UcmNfsStore" (or a registered store)      required
    ucm_connector_config    that store's fields (see ``docs/stores.md``); ``kv_block_size`` may be
                            omitted (derived from the model), if given it must equal the model's
                            bytes per block (all layers of one worker)                          required
    ucm_sparse_method       "ESA" (or a registered method, case-sensitive); absent/null: dense
                            attention ("", false and 0 are errors)                              optional
    ucm_sparse_config       {"ESA": {...}}: fields of the ucm_sparse_method's entry, keyed by the
                            method's exact name (needs the method; {} alone is ignored)         optional
    ucm_prefix_reuse        load prompt blocks found in the store (default true)                   optional
    ucm_save_blocks         dump computed full prompt blocks to the store (default true)           optional
    ucm_async_load          true: load prompt blocks while vLLM holds the request back
                            (WAITING_FOR_REMOTE_KVS); false: load them before the forward of the step
                            that computes the rest of the prompt, which waits; "auto" (default): true
                            when vLLM schedules asynchronously (its default on GPUs), where recovering
                            from a failed load inside a step is not safe                         optional
    ucm_load_failure_policy "recompute" (default: vLLM recomputes blocks that failed to load) | "fail"
    ucm_device_backend      ucm device backend name (default: automatic / $UCM_DEVICE_BACKEND)    optional
    ucm_sparse_full_graphs  with a sparse method on CUDA: run steps without per-layer sparse work as full
                            CUDA graphs, the others piecewise (default true; false: piecewise graphs
                            for every step)                                                     optional
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ucm.errors import UcmConfigError

#: Every top-level field this connector reads; other ``ucm_*`` keys are typos and rejected.
KNOWN_FIELDS = (
    "ucm_connector_name",
    "ucm_connector_config",
    "ucm_sparse_method",
    "ucm_sparse_config",
    "ucm_prefix_reuse",
    "ucm_save_blocks",
    "ucm_async_load",
    "ucm_load_failure_policy",
    "ucm_device_backend",
    "ucm_sparse_full_graphs",
)
LOAD_FAILURE_POLICIES = ("recompute", "fail")
#: Stores whose content lives in one process's memory: the scheduler cannot open them and keeps an index of the
#: blocks its workers reported as stored instead (a stale entry only costs a failed load, which is recomputed).
PROCESS_LOCAL_STORES = ("UcmDram",)


@dataclasses.dataclass(frozen=True)
class ModelBlockShape:
    """What one vLLM block of this worker weighs: the store's row width must equal `bytes_per_block`."""

    block_size: int  # tokens per block
    num_layers: int
    page_bytes: int  # bytes of one block of one layer (K and V)
    dtype: str

    @property
    def bytes_per_block(self) -> int:
        return self.num_layers * self.page_bytes


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    store_name: str
    store_config: dict[str, Any]  # includes the checked kv_block_size
    sparse_method: str | None
    sparse_config: Mapping[str, Any] | None
    prefix_reuse: bool
    save_blocks: bool
    load_failure_policy: str
    device_backend: str | None
    block: ModelBlockShape
    sparse_full_graphs: bool = True
    async_load: bool | str = "auto"  # see `resolve_async_load`

    @property
    def store_is_process_local(self) -> bool:
        return self.store_name in PROCESS_LOCAL_STORES or bool(getattr(self._store_class(), "process_local", False))

    def _store_class(self) -> type:
        return _store_class(self.store_name)

    @classmethod
    def parse(cls, extra: Mapping[str, Any] | None, block: ModelBlockShape) -> ConnectorConfig:
        """Validate ``kv_connector_extra_config`` for a model whose blocks look like `block` (in the connector, once
        vLLM knows the KV cache): `check` first, then what needs the model (``kv_block_size``)."""
        fields = check(extra)
        store_config = fields.pop("store_config")
        expected = block.bytes_per_block
        given = store_config.get("kv_block_size")
        if given is None:
            store_config["kv_block_size"] = expected
        elif given != expected:
            raise UcmConfigError(
                "ucm_connector_config.kv_block_size",
                given,
                f"{expected} for this model ({block.num_layers} layers x {block.page_bytes} B per {block.block_size}-"
                f"token block of K and V in {block.dtype}), or leave it out to derive it",
            )
        _store_class(fields["store_name"]).check_values(store_config)  # the checks that need kv_block_size
        return cls(store_config=store_config, block=block, **fields)


def check(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate everything in ``kv_connector_extra_config`` that does not need the model; raise one
    `UcmConfigError` for the first bad field. Builds nothing (no store, no memory, no threads).

    Called by `ConnectorConfig.parse` and, through ``ucm.integration.vllm.compat.config_check``, in the process
    that builds vLLM's engine config, so a mistake stops the user's process before any engine core starts.
    Returns the `ConnectorConfig` fields but ``block`` (``store_config`` as given: ``kv_block_size`` may be absent).
    """
    from ucm.store.factory import check_config

    if extra is None:
        extra = {}
    if not isinstance(extra, Mapping):
        raise UcmConfigError("kv_connector_extra_config", extra, "a mapping of ucm_* fields")
    for key in extra:
        if isinstance(key, str) and key.startswith("ucm_") and key not in KNOWN_FIELDS:
            raise UcmConfigError(f"kv_connector_extra_config.{key}", extra[key], f"a known field: {KNOWN_FIELDS}")

    name = extra.get("ucm_connector_name")
    if name is None:
        raise UcmConfigError("ucm_connector_name", "<missing>", "a store name, e.g. 'UcmDram' or 'UcmNfsStore'")
    store_cls = _store_class(name)  # not a known name -> UcmConfigError listing the registered stores

    raw = extra.get("ucm_connector_config")
    if raw is None:
        raise UcmConfigError("ucm_connector_config", "<missing>", f"a mapping with the fields of {name}")
    check_config(store_cls, raw)  # not a mapping / unknown field -> UcmConfigError listing accepted fields
    store_config = dict(raw)
    given = store_config.get("kv_block_size")
    if given is not None and (isinstance(given, bool) or not isinstance(given, int) or given < 1):
        raise UcmConfigError("ucm_connector_config.kv_block_size", given,
                             "an int: the model's bytes per block, or leave it out to derive it")
    if name in ("UcmNfsStore",) and "storage_backends" not in store_config:
        raise UcmConfigError("ucm_connector_config.storage_backends", "<missing>",
                             "an existing directory path, or a list of them")
    store_cls.check_values(store_config)  # ranges, paths, choices (the checks needing kv_block_size wait)

    method, sparse_config = _check_sparse(extra)

    policy = extra.get("ucm_load_failure_policy", "recompute")
    if not isinstance(policy, str) or policy not in LOAD_FAILURE_POLICIES:
        raise UcmConfigError("ucm_load_failure_policy", policy, LOAD_FAILURE_POLICIES)
    backend = extra.get("ucm_device_backend")
    if backend is not None:
        from ucm.device.registry import registered_backends

        if not isinstance(backend, str) or (backend not in registered_backends() and backend != "auto"):
            raise UcmConfigError("ucm_device_backend", backend, sorted(registered_backends()) + ["auto"])

    return {
        "store_name": name,
        "store_config": store_config,
        "sparse_method": method,
        "sparse_config": sparse_config,
        "prefix_reuse": _flag(extra, "ucm_prefix_reuse"),
        "save_blocks": _flag(extra, "ucm_save_blocks"),
        "load_failure_policy": policy,
        "device_backend": backend,
        "sparse_full_graphs": _flag(extra, "ucm_sparse_full_graphs", True),
        "async_load": _async_load(extra),
    }


def _store_class(name: Any) -> type:
    from ucm.store import store_class

    return store_class(name)


def _check_sparse(extra: Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any] | None]:
    """``ucm_sparse_method`` (absent or null: dense) and ``ucm_sparse_config`` (only the method's own entry,
    validated by the method's config class)."""
    from ucm.sparse.registry import known_methods, sparse_class

    method = extra.get("ucm_sparse_method")
    sparse_config = extra.get("ucm_sparse_config")
    names = ", ".join(repr(m) for m in known_methods())
    known = f"one of {names}"
    if method is None:  # only absent/null means dense: "", False or 0 is a mistake, never a silent off switch
        if sparse_config is not None and sparse_config != {}:  # {} configures nothing
            raise UcmConfigError("ucm_sparse_method", "<missing>", f"{known} when ucm_sparse_config is given")
        return None, None
    if not isinstance(method, str) or method not in known_methods():
        hint = _case_hint(method, known_methods())
        raise UcmConfigError("ucm_sparse_method", method,
                             f"{known}{f' ({hint})' if hint else ''}, or leave it out for dense attention")
    cls = sparse_class(method)
    if sparse_config is None:
        sparse_config = {}
    if not isinstance(sparse_config, Mapping):
        raise UcmConfigError("ucm_sparse_config", sparse_config, f"a mapping {{method name: {{field: value}}}}, e.g. "
                             f"{{{method!r}: {{...}}}}")
    for key in sparse_config:
        if key != method:  # e.g. {"esa": ...} would otherwise run ESA with its defaults
            hint = _case_hint(key, [method])
            raise UcmConfigError(f"ucm_sparse_config.{key}", sparse_config[key],
                                 f"only the key {method!r}, the entry of ucm_sparse_method {method!r}"
                                 f"{f' ({hint})' if hint else ''}; method names: {names}")
    cls.config_class.from_mapping(sparse_config.get(method))  # bad field -> UcmConfigError naming it
    return method, sparse_config


def _case_hint(given: Any, names: list[str] | tuple[str, ...]) -> str:
    """"names are case-sensitive: 'ESA', not 'esa'" when `given` differs from one of `names` only in case."""
    if isinstance(given, str):
        for name in names:
            if given.lower() == name.lower() and given != name:
                return f"names are case-sensitive: {name!r}, not {given!r}"
    return ""


def _async_load(extra: Mapping[str, Any]) -> bool | str:
    value = extra.get("ucm_async_load", "auto")
    if not isinstance(value, bool) and value != "auto":
        raise UcmConfigError("ucm_async_load", value, 'true, false or "auto"')
    return value


def resolve_async_load(config: ConnectorConfig, vllm_config: Any) -> ConnectorConfig:
    """``config`` with ``async_load`` a bool: "auto" follows vLLM's asynchronous scheduling. With it, vLLM
    schedules a request's next step before the worker output of the step that loaded its blocks arrives; a load
    failure found then rewinds the request, but the next step's output frame is already in flight (vLLM 0.26,
    `Scheduler._handle_invalid_blocks`). Asynchronous loads keep the request out of every step until its blocks
    are in place or known failed."""
    if isinstance(config.async_load, bool):
        return config
    scheduling = bool(getattr(getattr(vllm_config, "scheduler_config", None), "async_scheduling", False))
    return dataclasses.replace(config, async_load=scheduling)


def _flag(extra: Mapping[str, Any], field: str, default: bool = True) -> bool:
    value = extra.get(field, default)
    if not isinstance(value, bool):
        raise UcmConfigError(field, value, "true or false")
    return value


def model_block_shape(kv_cache_config: Any, block_size: int) -> ModelBlockShape:
    """Bytes per block from vLLM's `KVCacheConfig` (one group of attention layers with equal pages)."""
    groups = list(getattr(kv_cache_config, "kv_cache_groups", []) or [])
    if len(groups) != 1:
        raise UcmConfigError(
            "model KV cache groups", len(groups), "exactly one group (decoder-only attention, no hybrid layers)"
        )
    spec = groups[0].kv_cache_spec
    page = int(spec.page_size_bytes)
    return ModelBlockShape(
        block_size=int(getattr(spec, "block_size", block_size)),
        num_layers=len(groups[0].layer_names),
        page_bytes=page,
        dtype=str(getattr(spec, "dtype", "unknown")).replace("torch.", ""),
    )
