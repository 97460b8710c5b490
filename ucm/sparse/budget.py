"""The budget controller: how many KV blocks a sparse request keeps, and which, at each scheduler step.

Pure functions of (prompt length, tokens after this step, block size, config), so preemption and resume need no
state: a resumed request is dense again during its re-prefill (prompt + the tokens generated so far) and shrinks
again at its next decode step to the layout of its current length. Called by the scheduler side of a sparse
algorithm (`UcmSparseBase.block_plan`); the ESA worker uses the same `window_layout` /
`WindowLayout.local_start_at` so both processes agree on which positions are sink, candidates, work slots and
local at every step.

Layout of a sparse request in decode, T blocks after this step (logical block positions, P = prompt blocks)::

    [0, init)                 sink window, resident
    [init, L)                 candidates, L = local_start_at(T) = max(P - local, T - 1 - local): the prompt's
                              candidates [init, P - local) and every block that left the local window since
                              (prompt blocks of the prompt's local window, then generated blocks)
      [init, init + k)        work slots: k = int(prompt candidates * sparse_ratio) physical blocks the worker
                              loads the selected candidates into and the attention reads
      [init + k, init + k + s) spare slots: s = int(k * prefetch_ratio) (fewer than the prompt candidates beyond k)
                              blocks the worker loads the next selection's new blocks into ahead of time, never
                              attended; the other candidates are freed
    [L, T - 1)                local window: the last ``local`` full blocks, resident
    T - 1                     the partial tail (the block decode writes), resident

so a request keeps sink + k + s + local + 1 blocks (sink + k + local while decode still fills a ragged last prompt
block) whatever its output length. A generated block is dumped to the store by the connector when it fills
(named like prompt blocks: the chained hash of the prompt + output tokens); it leaves the local window ``local``
blocks later and is freed then, but only once its store copy is confirmed (`BlockPlan.decode_blocks_from`: the
scheduler's budget holds an unconfirmed block resident, so a failed dump never leaves a hole in the context).

k is capped at the prompt's k, it does not grow with the candidates: the budget stays constant however long the
generation (the point of offloading generated blocks), the work slots stay the same physical blocks for the whole
decode (the scheduler never allocates, retains or makes exclusive a block after the first decode step, so no
allocation can fail mid-decode and both processes derive the same slots from the prompt alone), and the retrieval
k of the worker is one number per request. Growing k (int(ratio * candidates) as candidates grow) would keep the
attended share constant but make the budget grow linearly with the output, as dense attention does, only slower.
``sparse_ratio`` 1.0 keeps every candidate (k = all prompt candidates and no generated block is freed): the
attention reads every block, as dense attention does.
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
    block_size: int = 1
    local: int = 0  # local window in blocks (config.local_window_sz)
    #: first position whose store copy is written in decode (the ragged last prompt block, then generated blocks)
    decode_blocks_from: int = 0
    num_spare: int = 0  # s: spare slots = candidates [sink_end + num_work, sink_end + num_work + num_spare)

    @property
    def num_candidates(self) -> int:
        """Candidates of the prompt (those of the first decode step of a fresh request)."""
        return self.local_start - self.sink_end

    @property
    def frees_candidates(self) -> bool:
        """Whether candidates beyond the k work slots are freed (sparse_ratio < 1); else every block stays."""
        return self.sparse and self.num_work < self.num_candidates

    def local_start_at(self, num_tokens: int) -> int:
        """L: the first local-window position once the request holds ``num_tokens`` tokens (candidates are
        [sink_end, L)); the local window is the last ``local`` full blocks before the partial tail."""
        total = -(-num_tokens // self.block_size)
        return max(self.local_start, total - 1 - self.local)


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
    # spare slots leave at least one candidate to free: a request that frees nothing is never shrunk (and its
    # work slots never made exclusive)
    num_spare = max(0, min(num_candidates - num_work - 1, num_work_blocks(num_work, config.prefetch_ratio)))
    num_spare = num_spare if sparse else 0
    return WindowLayout(prompt_blocks, sink_end, local_start, num_work, sparse, block_size, config.local_window_sz,
                        num_prompt_tokens // block_size, num_spare)


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
    tokens = max(num_tokens, num_computed_tokens)
    total = -(-tokens // block_size)
    layout = window_layout(num_prompt_tokens, block_size, config)
    everything = tuple(range(total))
    in_decode = num_computed_tokens >= num_prompt_tokens
    if not (layout.sparse and in_decode):
        return BlockPlan(False, block_size, total, everything, ())
    sink = tuple(range(layout.sink_end))
    local_start = min(layout.local_start_at(tokens), total)
    candidates = tuple(range(layout.sink_end, local_start))
    work = candidates[: layout.num_work]
    if not offload:
        return BlockPlan(True, block_size, total, everything, (), work, sink, candidates)
    if not layout.frees_candidates:  # ratio 1.0: every candidate stays (k covers the prompt's)
        return BlockPlan(True, block_size, total, everything, (), work, sink, candidates)
    spare_end = layout.num_work + layout.num_spare
    spare = candidates[layout.num_work : spare_end]
    freed = candidates[spare_end:]
    kept = sink + work + spare + tuple(range(local_start, total))
    return BlockPlan(True, block_size, total, kept, freed, work, sink, candidates, layout.decode_blocks_from, spare)
