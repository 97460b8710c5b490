"""What a vLLM release module binds: the contract between vLLM's internals and the release-independent hooks.

The release-independent side (`ucm.integration.vllm.sparse_budget`, `ucm.integration.vllm.sparse_worker`, the
connector) imports only this module from `compat`; the release modules implement it. Data flows one way: vLLM's
hook points (wrapped by `VllmBindings.install`) call the objects our connector owns, found through vLLM's KV
connector (``connector.sparse_budget`` in the scheduler, ``connector.sparse_runtime`` in each worker), and those
objects reach back into vLLM only through the small interfaces below.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ucm.sparse.base import QueryShape, SparseAttentionView


@dataclass(frozen=True)
class BatchRow:
    """One request of a worker step, read from vLLM's model runner (row order = the attention batch order).

    ``block_ids``: the runner's own block-table row (logical position -> physical block) before the scheduler's
    sparse updates are applied; ``query_start``: index of the request's first query token in the step.
    """

    req_id: str
    num_prompt_tokens: int
    num_computed_tokens: int
    num_scheduled_tokens: int
    block_ids: Sequence[int]
    query_start: int


class SchedulerBlocks(abc.ABC):
    """The scheduler's per-request KV block lists of one engine (vLLM's KV cache manager), as the sparse budget
    edits them. Positions are logical block positions of a request."""

    block_size: int
    null_block_id: int

    @abc.abstractmethod
    def block_ids(self, req_id: str) -> list[int] | None:
        """The request's block ids (the null block id where freed); None when it holds no blocks."""

    @abc.abstractmethod
    def holds_null(self, req_id: str, position: int) -> bool:
        """Whether the request's block at ``position`` is the null block (False when it holds no block there);
        O(1): the budget's per-step check that a request is still shrunk."""

    @abc.abstractmethod
    def release(self, req_id: str, positions: Sequence[int]) -> None:
        """Give the blocks at ``positions`` back to vLLM's pool and put the null block in their place (the list
        keeps its length, as vLLM's sliding window does)."""

    @abc.abstractmethod
    def make_exclusive(self, req_id: str, position: int) -> tuple[int, str]:
        """Make the block at ``position`` writable by this request only: a block shared through the prefix cache
        is replaced by a private copy (copied on the worker before the step), a private block is dropped from
        the prefix cache index. Returns (block id now at the position, "copied" | "unindexed" | "kept")."""


class MetadataAdapter(abc.ABC):
    """Reads one attention backend's dense block table / lengths and builds a copy of its metadata whose
    attention reads a `SparseAttentionView` (the original is shared by all layers of the step and stays)."""

    def block_table(self, metadata: Any) -> torch.Tensor:
        return metadata.block_table

    def seq_lens(self, metadata: Any) -> torch.Tensor:
        return metadata.seq_lens

    @abc.abstractmethod
    def with_view(self, metadata: Any, view: SparseAttentionView, layer: Any, impl: Any) -> Any:
        """A copy of ``metadata`` for this layer only."""


class VllmBindings(abc.ABC):
    """Everything the hooks need from one vLLM release line. One instance per process (`compat.bindings`)."""

    #: (major, minor) of the release line.
    release: tuple[int, int]
    #: True when a sparse step without per-layer work is written into the runner's own metadata (its steps may
    #: then run as full CUDA graphs, the others piecewise); False: the layer hooks run every step (piecewise).
    full_graph_steps: bool = False

    @abc.abstractmethod
    def install(self) -> None:
        """Wrap vLLM's hook points in this process (idempotent). Each wrapper calls the original straight away
        unless the engine's KV connector carries a sparse method."""

    @abc.abstractmethod
    def installed(self) -> bool:
        """True once `install` ran in this process."""

    @abc.abstractmethod
    def check_engine(self, vllm_config: Any) -> None:
        """Raise `UcmConfigError` for an engine configuration the sparse hooks cannot serve (called by the
        connector of a sparse engine at start)."""

    @abc.abstractmethod
    def key_views(self, kv_caches: Mapping[str, Any], vllm_config: Any) -> dict[str, torch.Tensor]:
        """Per layer, a K view ``[num_blocks, block_size, num_kv_heads, head_size]`` of the registered cache."""

    def query_shape(self, vllm_config: Any) -> QueryShape | None:
        """The query rows the attention hook copies into the sparse method's `UcmSparseBase.query_stage` in every
        forward; None when this release's hook does not copy them."""
        return None

    @abc.abstractmethod
    def attention_backend_names(self, layer_names: Sequence[str]) -> dict[str, str]:
        """Layer name -> attention backend name (and kernel variant where it changes the page bytes), for the
        block namespace: engines whose pages differ must never share block ids."""
