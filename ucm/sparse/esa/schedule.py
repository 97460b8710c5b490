"""ESA's retrieval pipeline schedule: at which decode step a retrieval is submitted, consumed and its loads waited.

Owned by the ESA worker (`ucm.sparse.esa.esa.Esa`). ``d`` is the worker's clock: it counts the engine's steps that
decode (d = 0 is the first). Every request of a step follows the same clock, so the requests of a batch submit,
consume and wait together, each stage one batched launch per layer however many requests decode; a request's
own first decode step (the step where the budget shrinks it) applies its initial selection (below) and joins
the clock from its next step on: its first retrieval comes at most ``stride`` steps later.

- a request's first decode step: the *initial* selection, scored at the end of prefill with the last prompt
  token's query, is applied:
  its loads (offload mode) are submitted for all layers at `execute_begin` and each layer waits for its own just
  before its attention (the only step that waits for loads submitted in the same step).
- submit at d >= 2 with (d - 2) % s == 0: score the candidates with this step's query on a side stream, overlapped
  with the rest of the step;
- consume at submit + max(1, s - 2), once the layer's attention of that step is queued (`attention_finished`):
  read the top-k and start loading the blocks not already resident (delta) into the work slots that held
  unselected blocks; queued after that attention, the loads never overwrite a slot it reads;
- wait at consume + 1: wait for the layer's loads just before its attention; the new blocks are attended from
  this step on (resident mode: the new table is used from this step on, nothing to wait for). The worker waits
  at the request's next step that runs, whatever the clock says (a request not scheduled at consume + 1 waits
  when it runs again).

For s >= 3 this is UCM's schedule: submit at d = 2 (mod s), consume at d = 0, wait at d = 1. For s = 1 and 2 the
pipeline runs every step / every other step with the same one-step lag between stages.

Boundary mode (the engine stages every layer's query, `UcmSparseBase.query_stage`): the same submit and consume
steps, each stage once per step for every layer instead of in the layer hooks: submit after the step's forward
(its staged queries), consume before the consume step's forward, whose loads are waited there too, so that step
already attends the new blocks and no step between needs a layer hook (on a GPU: each runs as one CUDA graph).
"""

from __future__ import annotations

from ucm.errors import UcmConfigError


class EsaSchedule:
    """The pipeline stages of decode step ``d`` for retrieval stride ``stride``."""

    def __init__(self, stride: int):
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise UcmConfigError("ucm_sparse_config.ESA.retrieval_stride", stride, "an integer >= 1")
        self.stride = stride
        self.lag = max(1, stride - 2)

    def is_submit(self, d: int) -> bool:
        return d >= 2 and (d - 2) % self.stride == 0

    def is_consume(self, d: int) -> bool:
        return d - self.lag >= 2 and self.is_submit(d - self.lag)

    def is_wait(self, d: int) -> bool:
        """True when loads submitted at a consume step are waited (d = 0 waits the initial loads, too)."""
        return d == 0 or self.is_consume(d - 1)

    def stages(self, d: int) -> tuple[str, ...]:
        """The stages of step d in the order the worker runs them: wait, consume, submit."""
        return tuple(
            name for name, hit in (("wait", self.is_wait(d)), ("consume", self.is_consume(d)),
                                   ("submit", self.is_submit(d))) if hit
        )
