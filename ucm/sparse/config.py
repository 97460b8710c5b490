"""Per-method sparse configuration: the validated form of ``ucm_sparse_config`` (`EsaConfig` for ESA).

Called by `ucm.sparse.registry.create_sparse`; a bad field raises one `UcmConfigError` naming the field, the
value and what is allowed. Defaults are UCM's published ESA setting, except ``repr_tokens``: UCM keeps one mean per
block (``repr_tokens`` >= block size); 16-token means per block retrieve needles far better with 128-token blocks
(bench/results/accuracy_esa_scoring_study.md, accuracy_smollm2.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ucm.errors import UcmConfigError

INITIAL_SELECTIONS = ("representations", "attention")


@dataclasses.dataclass(frozen=True)
class EsaConfig:
    """ESA's knobs, in blocks (one block = the engine's KV block size).

    init_window_sz: leading "sink" blocks always resident. local_window_sz: last prompt blocks always resident
    (>= 1: decode writes into the last prompt block when the prompt is ragged). min_blocks: prompts with fewer
    blocks stay dense. sparse_ratio: share of the candidate blocks (between the two windows) kept in decode.
    retrieval_stride: decode steps between two retrievals. repr_tokens: tokens per block representation (mean of
    K): a block of B tokens is cut into ceil(B / repr_tokens) near-equal slices, each with its own mean, and scores
    as its best slice, so a short passage (a needle) is not averaged away by a large block. initial_selection: how
    the selection of a request's first decode steps (the ones that write the start of the answer) is made at the
    end of its prefill: "attention" (default) ranks them by the attention the last ``initial_queries`` prompt
    tokens really pay to their keys (each layer's prompt K read once per request: on an H100 2.5 ms per layer at
    128K, bench/results/score_topk_h100_attention.md; it keeps far more of full attention's answers,
    bench/results/accuracy_smollm2_ruler_attn.md); "representations" scores the blocks' representations with the
    last prompt token's query, as every later retrieval does. prefetch_ratio: spare blocks per sparse request, as a
    share of its k work slots (at most its candidates beyond k): while the steps between a retrieval's submit and
    its consume attend the current selection, the newly selected blocks are loaded into these spare blocks, a few
    layers per step, and moved into the work slots on the device at the consume step, so the store's transfers
    overlap decode instead of stalling one step per retrieval; blocks beyond the spare ones are loaded at the
    consume step; 0 loads every new block at the consume step. Default 0.4: on CUDA the loads ahead are held on
    the device until the next step's inputs are copied (`Backend.hold_stream`), and 0.4 decoded faster than 0 at
    batch 1 and 8 in the same runs (bench/results/gpu_e2e_notes.md), for 0.4 k more blocks held per request. Used
    when the retrieval cycle runs at step boundaries (engines that stage queries; elsewhere the spares stay unused).
    """

    init_window_sz: int = 1
    local_window_sz: int = 2
    min_blocks: int = 4
    sparse_ratio: float = 0.2
    retrieval_stride: int = 10
    repr_tokens: int = 16
    initial_selection: str = "attention"
    initial_queries: int = 8
    prefetch_ratio: float = 0.4

    def __post_init__(self) -> None:
        _check_int("init_window_sz", self.init_window_sz, 0)
        _check_int("local_window_sz", self.local_window_sz, 1)
        _check_int("min_blocks", self.min_blocks, 1)
        _check_int("retrieval_stride", self.retrieval_stride, 1)
        _check_int("repr_tokens", self.repr_tokens, 1)
        _check_int("initial_queries", self.initial_queries, 1)
        if self.initial_selection not in INITIAL_SELECTIONS:
            raise UcmConfigError("ucm_sparse_config.ESA.initial_selection", self.initial_selection,
                                 f"one of {list(INITIAL_SELECTIONS)}")
        ratio = self.sparse_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
            raise UcmConfigError("ucm_sparse_config.ESA.sparse_ratio", ratio, "a number in (0, 1]")
        spare = self.prefetch_ratio
        if isinstance(spare, bool) or not isinstance(spare, (int, float)) or not 0.0 <= float(spare) <= 1.0:
            raise UcmConfigError("ucm_sparse_config.ESA.prefetch_ratio", spare, "a number in [0, 1]")

    def repr_parts(self, block_size: int) -> int:
        """Representations per block of ``block_size`` tokens: ceil(block_size / repr_tokens)."""
        return -(-block_size // self.repr_tokens)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> EsaConfig:
        """Build from the user's ``ucm_sparse_config["ESA"]`` mapping (None or {} -> defaults)."""
        known = [f.name for f in dataclasses.fields(cls)]
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise UcmConfigError("ucm_sparse_config.ESA", values, f"a mapping {{field: value}} of the fields {known}")
        for name in values:
            if name not in known:
                raise UcmConfigError(f"ucm_sparse_config.ESA.{name}", values[name], f"a field of ESA: {known}")
        return cls(**values)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UcmConfigError(f"ucm_sparse_config.ESA.{name}", value, f"an integer >= {minimum}")
