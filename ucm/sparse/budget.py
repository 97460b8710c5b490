"""The budget controller: how many KV blocks a sparse request keeps, and which, at each scheduler step.

Pure functions of (prompt length, tokens computed, tokens after this step, block size, config), so preemption and
resume need no state: a resumed request is dense again during its re-prefill and shrinks again at its next decode
step. Called by the scheduler side of a sparse algorithm (`UcmSparseBase.block_plan`); the ESA worker uses the
same `window_layout` so both processes agree on which positions are sink, candidates, work slots and local.

Layout of a sparse request in decode (positions are logical block positions, P = prompt blocks)::

    [0, init)            sink window, resident
    [init, P - local)    candidates; the first k = int(candidates * sparse_ratio) positions keep their physical
                         blocks as work slots (the worker loads the selected blocks into them), the rest are freed
    [P - local, P)       local window (the last prompt blocks, the last one may be partial), resident
    [P, ...)             blocks of generated tokens, resident and growing
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ucm.sparse.base import BlockPlan
from ucm.sparse.config import EsaConfig

# float products like 10 * 0.7 are 7.000000000000001 but 100 * 0.29 is 28.999999999999996: floor with a margin
_EPS = 1e-9


@dataclass(frozen=True)
class WindowLayout:
    """Where the windows of a prompt lie, in logical block positions (see the module docstring)."""

    prompt_blocks: int
    sink_end: int  # sink = [0, sink_end)
    local_start: int  # candidates = [sink_end, local_start), local = [local_start, prompt_blocks)
    num_work: int  # k: work slots = candidates [sink_end, sink_end + num_work)
    sparse: bool

    @property
    def num_candidates(self) -> int:
        return self.local_start - self.sink_end


def num_work_blocks(num_candidates: int, sparse_ratio: float) -> int:
    """k = int(num_candidates * sparse_ratio), robust to float rounding; ratio 1.0 keeps every candidate."""
    return min(num_candidates, int(math.floor(num_candidates * sparse_ratio + _EPS)))


def window_layout(num_prompt_tokens: int, block_size: int, config: EsaConfig) -> WindowLayout:
    """The windows of a prompt; ``sparse`` is False when it has < min_blocks blocks or no candidate block."""
    prompt_blocks = -(-num_prompt_tokens // block_size)
    sink_end = min(config.init_window_sz, prompt_blocks)
    local_start = max(sink_end, prompt_blocks - config.local_window_sz)
    num_candidates = local_start - sink_end
    sparse = prompt_blocks >= config.min_blocks and num_candidates > 0
    num_work = num_work_blocks(num_candidates, config.sparse_ratio) if sparse else num_candidates
    return WindowLayout(prompt_blocks, sink_end, local_start, num_work, sparse)


def plan_blocks(
    num_prompt_tokens: int,
    num_computed_tokens: int,
    num_tokens: int,
    block_size: int,
    config: EsaConfig,
    offload: bool = True,
) -> BlockPlan:
    """The blocks a request keeps once it holds ``num_tokens`` tokens (``num_computed_tokens`` computed before).

    Dense (everything kept) while the prompt is being prefilled, for prompts below ``min_blocks`` blocks, and
    when ``offload`` is False (resident mode: the selection only changes the attention's block table).
    """
    if block_size < 1:
        from ucm.errors import UcmConfigError

        raise UcmConfigError("block_size", block_size, "an integer >= 1")
    total = -(-max(num_tokens, num_computed_tokens) // block_size)
    layout = window_layout(num_prompt_tokens, block_size, config)
    everything = tuple(range(total))
    in_decode = num_computed_tokens >= num_prompt_tokens
    if not (layout.sparse and in_decode):
        return BlockPlan(False, block_size, total, everything, ())
    sink = tuple(range(layout.sink_end))
    candidates = tuple(range(layout.sink_end, layout.local_start))
    work = candidates[: layout.num_work]
    if not offload:
        return BlockPlan(True, block_size, total, everything, (), work, sink, candidates)
    freed = candidates[layout.num_work :]
    kept = sink + work + tuple(range(layout.local_start, total))
    return BlockPlan(True, block_size, total, kept, freed, work, sink, candidates)
