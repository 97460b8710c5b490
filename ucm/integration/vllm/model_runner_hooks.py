"""Per-step sparse hooks in vLLM's model runner: execute begin/finished around each forward.

Installed by `ucm.integration.vllm.plugin`: `install()` wraps ``GPUModelRunner.execute_model`` and
``GPUModelRunner._model_forward`` (the CPU and NPU runners derive from it). Both wrappers call the original
straight away unless the worker's KV connector carries a sparse method (``connector.ucm_sparse``).

For a sparse engine, per step:
- ``execute_model``: reads the budget's block updates sent by the scheduler (`scheduler_hooks.BLOCK_UPDATES_ATTR`)
  and forgets requests that finished or were resumed after preemption (their rows are rebuilt by vLLM);
- ``_model_forward`` (inside vLLM's forward context, metadata built, connector metadata bound): builds the
  engine-independent `SparseBatch` (batch order, each request's block row with freed positions as the null
  block), calls ``sparse.execute_begin(batch)``, publishes a `SparseStep` on the forward context for the
  attention hooks, runs the forward, then ``sparse.execute_finished()`` and hands its stats to the connector.

State lives on the model runner instance (`WorkerSparseHook`), one per engine worker; nothing global.
"""

from __future__ import annotations

import functools
from typing import Any

from ucm.integration.vllm.attention_hooks import STEP_ATTR, SparseStep
from ucm.integration.vllm.scheduler_hooks import BLOCK_UPDATES_ATTR, connector_sparse
from ucm.sparse.base import SparseBatch, SparseRequestStep, SparseStepStats, UcmSparseBase

#: Attribute of the model runner holding its `WorkerSparseHook`.
HOOK_ATTR = "_ucm_sparse_hook"
NULL_BLOCK_ID = 0  # vLLM's block pool hands out block 0 as the null block


class WorkerSparseHook:
    """Worker-side state of the sparse hooks for one model runner."""

    def __init__(self, sparse: UcmSparseBase, connector: Any, block_size: int):
        self.sparse = sparse
        self.connector = connector
        self.block_size = block_size
        self.overrides: dict[str, dict[int, int]] = {}  # req id -> {position: block id} from the scheduler
        self.resumed: set[str] = set()  # resumed in the current step
        self.totals = SparseStepStats()
        self.steps = 0
        self.last_step: SparseStep | None = None

    # ------------------------------------------------------------------ execute_model
    def on_scheduler_output(self, scheduler_output: Any) -> None:
        for req_id in scheduler_output.finished_req_ids:
            self.overrides.pop(req_id, None)
            self.sparse.request_finished(req_id)
        self.resumed = set(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
        for new_req in scheduler_output.scheduled_new_reqs:
            self.overrides.pop(new_req.req_id, None)
        for req_id in self.resumed:
            self.overrides.pop(req_id, None)  # re-prefilled into fresh blocks
        for req_id, updates in (getattr(scheduler_output, BLOCK_UPDATES_ATTR, None) or {}).items():
            self.overrides.setdefault(req_id, {}).update(updates)

    # ------------------------------------------------------------------ _model_forward
    def build_batch(self, runner: Any) -> tuple[SparseBatch, frozenset[int]]:
        """The step's requests in batch order, and the rows holding freed positions."""
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        starts = runner.query_start_loc.np[: num_reqs + 1]
        hashes_of = getattr(self.connector, "request_block_ids", None)  # store ids of the prompt blocks
        requests: list[SparseRequestStep] = []
        shrunk: set[int] = set()
        for row, req_id in enumerate(batch.req_ids[:num_reqs]):
            block_ids: list[int] = list(runner.requests[req_id].block_ids[0])
            overrides = self.overrides.get(req_id)
            if overrides:
                for pos, block_id in overrides.items():
                    if pos < len(block_ids):
                        block_ids[pos] = block_id
                if any(block_id == NULL_BLOCK_ID for block_id in overrides.values()):
                    shrunk.add(row)
            requests.append(
                SparseRequestStep(
                    req_id=req_id,
                    num_prompt_tokens=int(batch.num_prompt_tokens[row]),
                    num_computed_tokens=int(batch.num_computed_tokens_cpu[row]),
                    num_scheduled_tokens=int(starts[row + 1] - starts[row]),
                    block_ids=block_ids,
                    query_start=int(starts[row]),
                    block_hashes=hashes_of(req_id) if hashes_of is not None else None,
                    resumed=req_id in self.resumed,
                )
            )
        return SparseBatch(requests, self.block_size, NULL_BLOCK_ID), frozenset(shrunk)

    def record(self, stats: SparseStepStats) -> None:
        self.steps += 1
        t = self.totals
        t.sparse_requests += stats.sparse_requests
        t.resident_blocks += stats.resident_blocks
        t.full_blocks += stats.full_blocks
        t.retrievals += stats.retrievals
        t.blocks_loaded += stats.blocks_loaded
        t.load_failures += stats.load_failures
        t.failed_block_hashes.extend(stats.failed_block_hashes)
        report = getattr(self.connector, "record_sparse_step", None)
        if report is not None:
            report(stats)


def worker_hook(runner: Any) -> WorkerSparseHook | None:
    """The runner's hook when its engine has a sparse method, created on first use; else None."""
    hook = runner.__dict__.get(HOOK_ATTR)
    if hook is not None:
        return hook
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    connector = get_kv_transfer_group()
    sparse = connector_sparse(connector)
    if sparse is None:
        return None
    hook = WorkerSparseHook(sparse, connector, runner.cache_config.block_size)
    runner.__dict__[HOOK_ATTR] = hook
    return hook


def hook_runner_class(cls: type) -> None:
    """Wrap ``cls.execute_model`` and ``cls._model_forward`` (idempotent). Runner classes that override them
    (vllm-ascend's NPUModelRunner) are wrapped themselves, see `ucm.integration.vllm.ascend`."""
    if getattr(cls.execute_model, "_ucm_sparse_hook", False) and getattr(cls._model_forward, "_ucm_sparse_hook", False):
        return
    execute_model = cls.execute_model
    model_forward = cls._model_forward

    @functools.wraps(execute_model)
    def execute_model_hooked(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        hook = worker_hook(self)
        if hook is not None:
            hook.on_scheduler_output(scheduler_output)
        return execute_model(self, scheduler_output, *args, **kwargs)

    @functools.wraps(model_forward)
    def model_forward_hooked(self: Any, *args: Any, **kwargs: Any) -> Any:
        hook = self.__dict__.get(HOOK_ATTR)
        if hook is None:
            return model_forward(self, *args, **kwargs)
        from vllm.forward_context import get_forward_context

        context = get_forward_context()
        if context.attn_metadata is None or self.input_batch.num_reqs == 0 or getattr(context, STEP_ATTR, None):
            return model_forward(self, *args, **kwargs)  # dummy/profiling run, or already inside a step
        batch, shrunk = hook.build_batch(self)
        hook.sparse.execute_begin(batch)
        step = SparseStep(hook.sparse, shrunk)
        setattr(context, STEP_ATTR, step)
        try:
            return model_forward(self, *args, **kwargs)
        finally:
            setattr(context, STEP_ATTR, None)
            hook.last_step = step
            hook.record(hook.sparse.execute_finished())

    execute_model_hooked._ucm_sparse_hook = True  # type: ignore[attr-defined]
    model_forward_hooked._ucm_sparse_hook = True  # type: ignore[attr-defined]
    cls.execute_model = execute_model_hooked
    cls._model_forward = model_forward_hooked


def install() -> None:
    """Wrap vLLM's model runner step methods (idempotent)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    hook_runner_class(GPUModelRunner)
