"""Registry and factory of sparse-attention methods, keyed by the user's ``ucm_sparse_method``.

Called by the engine integration (the vLLM hooks) once per process and role. Methods register as
``name -> "module:Class"`` so importing the registry does not import every algorithm.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from ucm.errors import UcmConfigError
from ucm.sparse.base import UcmSparseBase, UcmSparseRole

_METHODS: dict[str, str] = {"ESA": "ucm.sparse.esa.esa:Esa"}


def register_sparse(name: str, target: str) -> None:
    """Make ``name`` available to `create_sparse`; ``target`` is ``"module:Class"`` (a `UcmSparseBase`)."""
    _METHODS[name] = target


def known_methods() -> list[str]:
    return sorted(_METHODS)


def sparse_class(method: str) -> type[UcmSparseBase]:
    if not isinstance(method, str) or method not in _METHODS:
        raise UcmConfigError("ucm_sparse_method", method, known_methods())
    module, _, attr = _METHODS[method].partition(":")
    return getattr(importlib.import_module(module), attr)


def create_sparse(
    method: str,
    config: Mapping[str, Any] | None,
    role: UcmSparseRole,
    *,
    block_size: int,
    **kwargs: Any,
) -> UcmSparseBase:
    """The sparse algorithm ``method`` for ``role``.

    ``config`` is the user's whole ``ucm_sparse_config`` mapping (``{"ESA": {...}}``) or None for defaults;
    only the entry of ``method`` is read and validated. Extra keyword arguments go to the method's constructor
    (ESA: ``backend``, ``store``, ``offload``). Unknown methods and bad fields raise `UcmConfigError`.
    """
    cls = sparse_class(method)
    if config is not None and not isinstance(config, Mapping):
        raise UcmConfigError("ucm_sparse_config", config, "a mapping {method name: {field: value}}")
    if not isinstance(role, UcmSparseRole):
        raise UcmConfigError("role", role, [r.value for r in UcmSparseRole])
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise UcmConfigError("block_size", block_size, "an integer >= 1")
    method_config = cls.config_class.from_mapping((config or {}).get(method))
    return cls(method_config, role, block_size, **kwargs)
