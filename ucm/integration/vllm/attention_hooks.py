"""Per-layer sparse attention hooks: attention begin/finished around each vLLM attention layer's implementation.

Installed by `ucm.integration.vllm.plugin` in every vLLM process: `install()` wraps ``Attention.__init__`` so
that each new layer's ``impl.forward`` goes through `SparseAttentionForward` (vLLM's attention custom ops are
registered at import time and call ``layer.impl.forward``, so wrapping the instance method is the stable point).

The wrapper does nothing unless a sparse step is in progress: `ucm.integration.vllm.model_runner_hooks` puts a
`SparseStep` on vLLM's forward context for steps of an engine whose connector has a sparse method. Then, per
layer: ``sparse.attention_begin(...)`` may return a sparse block table and sequence lengths, the layer's attention
runs with metadata rebuilt for that view (`ucm.integration.vllm.attention_backends`), and
``sparse.attention_finished(...)`` follows. Without a step (dense engines, profiling and warm-up runs) the
original implementation is called with the original arguments.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from ucm.errors import UcmError
from ucm.integration.vllm.attention_backends import adapter_for
from ucm.sparse.base import UcmSparseBase

#: Attribute of vLLM's ForwardContext holding the current `SparseStep` (absent: no sparse step).
STEP_ATTR = "ucm_sparse_step"


class SparseViewMissingError(UcmError, RuntimeError):
    """A request whose blocks were freed by the budget would be attended densely (it would read freed blocks)."""


@dataclass
class SparseStep:
    """One model step of a sparse engine, as the attention hooks need it.

    ``shrunk_rows``: batch rows of requests whose freed positions still hold stale block ids in vLLM's own
    block table; their attention must use the sparse view. ``layers_seen`` counts hooked layer calls (tests and
    stats read it), ``layers_sparse`` those that attended through a sparse view.
    """

    sparse: UcmSparseBase
    shrunk_rows: frozenset[int] = frozenset()
    layers_seen: int = 0
    layers_sparse: int = 0


class SparseAttentionForward:
    """Replaces one layer's ``impl.forward``; calls the original with a sparse view when a step asks for it."""

    def __init__(self, layer_name: str, forward: Any):
        self.layer_name = layer_name
        self.forward = forward
        functools.update_wrapper(self, forward)

    def __call__(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: Any,
        attn_metadata: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        step = current_step() if attn_metadata is not None else None
        if step is None:
            return self.forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
        step.layers_seen += 1
        adapter = adapter_for(attn_metadata)
        view = step.sparse.attention_begin(
            self.layer_name, query, key, value, kv_cache,
            adapter.block_table(attn_metadata), adapter.seq_lens(attn_metadata),
        )
        if view is not None:
            attn_metadata = adapter.with_view(attn_metadata, view, layer, getattr(self.forward, "__self__", None))
            step.layers_sparse += 1
        elif step.shrunk_rows:
            raise SparseViewMissingError(
                f"layer {self.layer_name}: the sparse method returned no view although batch rows "
                f"{sorted(step.shrunk_rows)} hold freed blocks"
            )
        output = self.forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
        step.sparse.attention_finished(self.layer_name, query, key, value, output, kv_cache)
        return output


def current_step() -> SparseStep | None:
    """The sparse step in progress in this process, if any (read from vLLM's forward context)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    return getattr(get_forward_context(), STEP_ATTR, None)


def wrap_layer(layer: Any) -> None:
    """Route ``layer.impl.forward`` through `SparseAttentionForward` (idempotent)."""
    impl = getattr(layer, "impl", None)
    if impl is None or isinstance(impl.forward, SparseAttentionForward):
        return
    impl.forward = SparseAttentionForward(layer.layer_name, impl.forward)


def install() -> None:
    """Wrap every attention layer built from now on in this process (idempotent)."""
    from vllm.model_executor.layers.attention.attention import Attention

    if getattr(Attention.__init__, "_ucm_sparse_hook", False):
        return
    original = Attention.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        wrap_layer(self)

    __init__._ucm_sparse_hook = True  # type: ignore[attr-defined]
    Attention.__init__ = __init__
