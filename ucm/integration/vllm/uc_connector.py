"""`UnifiedCacheConnectorV1`: the vLLM KV connector of ucm (prefix reuse from a store, dumps, sparse attention).

vLLM builds one instance per role from ``kv_transfer_config`` (``kv_connector="UnifiedCacheConnectorV1"``,
``kv_connector_module_path="ucm.integration.vllm.uc_connector"``): one in the scheduler process
(`ConnectorScheduler` does the work) and one in every worker process (`ConnectorWorker`). This class only
validates the configuration (`ConnectorConfig`, errors at engine start) and routes vLLM's calls to the right half.
With a sparse method it also owns the sparse objects the release bindings (`ucm.integration.vllm.compat`) drive:
``sparse_budget`` (`SparseBudget`, scheduler role) and ``sparse_runtime`` (`SparseWorkerRuntime`, worker role,
created in `register_kv_caches`). Scheduler -> worker sparse data travels in `UcmConnectorMetadata.sparse`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from ucm.integration.vllm.compat import set_load_failure_policy
from ucm.integration.vllm.compat.config_check import reporting_config_errors
from ucm.integration.vllm.config import ConnectorConfig, model_block_shape, resolve_async_load
from ucm.integration.vllm.kv_layout import detect_layout
from ucm.integration.vllm.metadata import UcmConnectorMetadata, UcmHandshake
from ucm.integration.vllm.sparse_budget import SparseBudget
from ucm.integration.vllm.sparse_worker import SparseWorkerRuntime
from ucm.integration.vllm.stats import UcmConnectorStats
from ucm.store import make_namespace

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so it shares vLLM's log handlers


class UnifiedCacheConnectorV1(KVConnectorBase_V1):
    """ucm's KV connector for vLLM v1 (both roles); see ``docs/connector.md`` for the configuration."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        with reporting_config_errors(vllm_config):  # the checks that need the model: raised in the user's process
            self._init(vllm_config, role, kv_cache_config)

    def _init(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.block_size = int(vllm_config.cache_config.block_size)
        self.config = resolve_async_load(
            ConnectorConfig.parse(extra, model_block_shape(kv_cache_config, self.block_size)), vllm_config
        )
        # Blocks that fail to load are recomputed, never handed to the model (vLLM's default would fail the request).
        set_load_failure_policy(self._kv_transfer_config, self.config.load_failure_policy)
        self._scheduler = None
        self._worker = None
        self.sparse_budget: SparseBudget | None = None  # scheduler role, sparse engines
        self.sparse_runtime: SparseWorkerRuntime | None = None  # worker role, sparse engines (register_kv_caches)
        self._sparse_meta_taken: KVConnectorMetadata | None = None  # the step metadata the runtime last took
        if role == KVConnectorRole.SCHEDULER:
            from ucm.integration.vllm.scheduler_side import ConnectorScheduler

            self._scheduler = ConnectorScheduler(self.config, self.block_size)
        else:
            from ucm.integration.vllm.worker_side import ConnectorWorker

            self._worker = ConnectorWorker(self.config, _tp_rank())
        if self.config.sparse_method is not None:
            from ucm.integration.vllm.plugin import require_sparse_hooks

            # unsupported vLLM, plugin not loaded or an engine setting the hooks cannot serve: fail now,
            # never run silently dense
            require_sparse_hooks().check_engine(vllm_config)
            if role == KVConnectorRole.SCHEDULER:
                # blocks filled in decode are freed once the workers confirmed their store copy
                self.sparse_budget = SparseBudget(self._create_sparse(role), stored=self._scheduler.stored_positions)

    def _create_sparse(self, role: KVConnectorRole, **kwargs: Any) -> Any:
        from ucm.sparse.base import UcmSparseRole
        from ucm.sparse.registry import create_sparse

        sparse_role = UcmSparseRole.SCHEDULER if role == KVConnectorRole.SCHEDULER else UcmSparseRole.WORKER
        return create_sparse(
            self.config.sparse_method, self.config.sparse_config, sparse_role, block_size=self.block_size, **kwargs
        )

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # Loads and dumps run outside the graph (start_load_kv / wait_for_save). The sparse hooks run per layer
        # in the steps that need them; unless ucm_sparse_full_graphs is false, releases whose bindings put the
        # other steps' view into vLLM's metadata keep full graphs (those steps) and piecewise graphs (the others).
        extra_config = extra_config or {}
        if not extra_config.get("ucm_sparse_method"):
            return False
        if extra_config.get("ucm_sparse_full_graphs", True) is False:
            return True
        from ucm.integration.vllm.compat import bindings

        return not bindings().full_graph_steps

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return UcmConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls, vllm_config: VllmConfig, metric_types: dict[type, type], labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> Any:
        """The ``ucm:*`` series on ``/metrics`` (`prom_metrics.UcmPromMetrics`); None, leaving the engine without
        them, on a vLLM whose metrics module lacks the connector metrics API (the log line still works)."""
        try:
            from ucm.integration.vllm.prom_metrics import UcmPromMetrics
        except ImportError as exc:
            logger.warning("UCM connector: no Prometheus series on this vLLM (%s)", exc)
            return None
        return UcmPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped dump is a later miss, never a lost hand-off

    # ============================================================== worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        with reporting_config_errors(self._vllm_config):  # layout and store checks: raised in the user's process
            self._register_kv_caches(kv_caches)

    def _register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        group = self._kv_cache_config.kv_cache_groups[0]
        layout = detect_layout(
            kv_caches, list(group.layer_names), int(self._kv_cache_config.num_blocks), _attn_backend_names(group)
        )
        if layout.bytes_per_block != self.config.block.bytes_per_block:
            from ucm.errors import UcmConfigError

            raise UcmConfigError(
                "ucm_connector_config.kv_block_size",
                self.config.block.bytes_per_block,
                f"{layout.bytes_per_block} (bytes per block of the registered KV caches)",
            )
        namespace = _namespace(self._vllm_config, self._worker.tp_rank, self.block_size, layout.tag)
        self._worker.start(layout, namespace)
        if self.config.sparse_method is not None:
            # the worker's algorithm shares the connector's store and reads K through the release's views
            from ucm.integration.vllm.compat import bindings

            sparse = self._create_sparse(KVConnectorRole.WORKER, backend=self._worker.backend,
                                         store=self._worker.store)
            # K views from the caches as vLLM registered them (logical shape, the backend's strides); the layout's
            # pages are the same memory re-viewed in physical order for the store's byte rows
            logical = {name: kv_caches[name] for name in layout.layer_names}
            sparse.register_kv_caches(layout.as_dict(), bindings().key_views(logical, self._vllm_config),
                                      query_shape=bindings().query_shape(self._vllm_config))
            self.sparse_runtime = SparseWorkerRuntime(
                sparse, self.block_size, store_ids=self._worker.request_block_ids,
                on_stats=self._worker.record_sparse_step,
            )

    def get_handshake_metadata(self) -> UcmHandshake | None:
        if self._worker is None or self._worker.layout is None:
            return None
        return UcmHandshake(self._worker.namespace, self._worker.layout.bytes_per_block)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None and isinstance(connector_metadata, UcmConnectorMetadata):
            self._worker.bind(connector_metadata)
            self.prepare_sparse_step(connector_metadata)

    def prepare_sparse_step(self, connector_metadata: KVConnectorMetadata | None) -> None:
        """Worker: hand the step's sparse metadata to the sparse runtime, once per step. The release bindings call
        it before the step's attention metadata is built, earlier than vLLM binds the metadata."""
        if self.sparse_runtime is None or not isinstance(connector_metadata, UcmConnectorMetadata):
            return
        if connector_metadata is self._sparse_meta_taken:
            return
        self._sparse_meta_taken = connector_metadata
        self.sparse_runtime.on_step_meta(connector_metadata.sparse, connector_metadata.finished_req_ids)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if self._worker is not None and isinstance(meta, UcmConnectorMetadata):
            self._worker.load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # the step's requests have their blocks: loaded before it was scheduled, or waited in start_load_kv

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return  # dumps are whole rows (all layers), submitted once per step in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if self._worker is not None and isinstance(meta, UcmConnectorMetadata):
            self._worker.save(meta)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self._worker is not None and isinstance(kv_connector_metadata, UcmConnectorMetadata):
            self._worker.handle_preemptions(kv_connector_metadata)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        self._worker.poll()
        # nothing is ever sent (blocks are never held after a request finishes); received: the requests whose
        # asynchronous prefix loads ended (their failed blocks go out in this step's get_block_ids_with_load_errors)
        return None, (self._worker.finished_loads() or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        part = self._worker if self._worker is not None else self._scheduler
        return part.take_stats() if part is not None else None

    def build_connector_worker_meta(self) -> Any:
        return self._worker.take_worker_meta() if self._worker is not None else None

    def shutdown(self) -> None:
        for part in (self._worker, self._scheduler):
            if part is not None:
                part.close()

    # ============================================================== scheduler side
    @property
    def block_namespaces(self) -> dict[int, str]:
        """tp rank -> the namespace its blocks are named under (scheduler role; from the workers' handshakes)."""
        return dict(self._scheduler.namespaces) if self._scheduler is not None else {}

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        if self._scheduler is not None:
            self._scheduler.set_handshakes(metadata)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        meta = self._scheduler.build_meta(scheduler_output)
        if self.sparse_budget is not None:
            meta.sparse = self.sparse_budget.step_meta(scheduler_output)
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        if self._scheduler is not None:
            self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        if self.sparse_budget is not None:
            self.sparse_budget.request_finished(request.request_id)
        return self._scheduler.request_finished(request)


# ------------------------------------------------------------------ helpers
def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except (AssertionError, ImportError, RuntimeError):
        return 0


def _attn_backend_names(group: Any) -> dict[str, str]:
    """Layer name -> attention backend name (through the release bindings; empty on an unsupported vLLM, where
    only dense engines run and the tag omits the backend)."""
    from ucm.integration.vllm.compat import UnsupportedVllmError, bindings

    try:
        return bindings().attention_backend_names(list(group.layer_names))
    except UnsupportedVllmError:
        return {}


def _namespace(vllm_config: Any, tp_rank: int, block_size: int, layout_tag: str) -> str:
    """Everything that makes one engine's block bytes differ from another's for the same tokens."""
    model = vllm_config.model_config
    return make_namespace(
        model=model.model,
        revision=getattr(model, "revision", None),
        dtype=str(vllm_config.cache_config.cache_dtype),
        model_dtype=str(model.dtype).replace("torch.", ""),
        block_size=block_size,
        tp_rank=tp_rank,
        tp_size=vllm_config.parallel_config.tensor_parallel_size,
        pp_rank=0,
        layout=layout_tag,
    )
