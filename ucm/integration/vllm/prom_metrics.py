"""The connector's Prometheus series (``ucm:*`` on the server's ``/metrics``), fed from its per-step stats.

vLLM's Prometheus stat logger (in the process that serves ``/metrics``) builds this once through
`UnifiedCacheConnectorV1.build_prom_metrics` and calls `UcmPromMetrics.observe` with every step's stats payload
(`ucm.integration.vllm.stats.UcmConnectorStats.data`, workers and scheduler merged). Counters add the step's
counts, histograms take its samples, gauges take the latest value (summed over tensor-parallel ranks). Every
series is labelled like vLLM's own (``model_name``, ``engine``). docs/connector.md lists them.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics

PREFIX = "ucm:"

#: stats counter -> (series name without prefix and ``_total``, help text)
COUNTER_SERIES = {
    "lookup_blocks": ("lookup_blocks", "Prompt blocks looked up in the store (beyond vLLM's prefix cache)."),
    "hit_blocks": ("hit_blocks", "Looked-up blocks found in the store and scheduled for loading."),
    "loaded_blocks": ("loaded_blocks", "Blocks loaded from the store and used (before a request's first failure)."),
    "loaded_bytes": ("loaded_bytes", "Bytes of the loaded blocks."),
    "load_failed_blocks": ("load_failed_blocks", "Blocks whose load failed (missing, evicted, corrupt, I/O)."),
    "recomputed_blocks": ("recomputed_blocks", "Blocks scheduled for loading that vLLM recomputed instead."),
    "saved_blocks": ("saved_blocks", "Blocks written to the store."),
    "saved_bytes": ("saved_bytes", "Bytes written to the store."),
    "save_skipped_blocks": ("save_skipped_blocks", "Blocks not written: already in the store."),
    "save_failed_blocks": ("save_failed_blocks", "Blocks whose dump failed."),
    "save_dropped_blocks": ("save_dropped_blocks", "Blocks not dumped: computed in a step with a failed load."),
    "store_evictions": ("store_evictions", "Blocks the store evicted."),
    "sparse_requests": ("sparse_requests", "Requests that began decoding with sparse attention."),
    "sparse_steps": ("sparse_steps", "(request, decode step) pairs attended sparsely."),
    "resident_block_steps": ("sparse_resident_block_steps",
                             "Blocks attended per sparse (request, decode step), averaged over layers, summed."),
    "full_block_steps": ("sparse_full_block_steps",
                         "Blocks dense attention would read per sparse (request, decode step), averaged over "
                         "layers, summed."),
    "retrievals": ("sparse_retrievals", "(request, layer) block selections submitted."),
}
#: stats samples -> (histogram name, help text, buckets in seconds)
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HISTOGRAM_SERIES = {
    "load_durations": ("load_seconds", "Seconds a request's store load took (submitted to waited).", _LATENCY),
    "save_durations": ("save_seconds", "Seconds from a dump's submission to the step that saw it finished.",
                       _LATENCY),
    "retrieval_durations": ("sparse_retrieval_seconds", "Host seconds of one batched block selection (a layer).",
                            _LATENCY),
}
#: stats gauges -> (gauge name, help text)
GAUGE_SERIES = {
    "store_used_bytes": ("store_used_bytes", "Bytes the workers' stores hold."),
    "store_blocks": ("store_blocks", "Blocks the workers' stores hold."),
    "store_capacity_bytes": ("store_capacity_bytes", "Capacity of the workers' stores (bounded stores only)."),
}
RESIDENT_SHARE = ("sparse_resident_share", "Blocks attended / dense, over the sparse decode steps of the last step "
                                           "that had any (averaged over layers).")


def _unregister_ours() -> None:
    """Drop ``ucm:`` collectors left by an earlier stat logger of this process (vLLM drops its own the same way
    before registering): registering a name twice raises."""
    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", "").startswith(PREFIX):
            REGISTRY.unregister(collector)


class UcmPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        _unregister_ours()

        def per_engine(metric: Any) -> dict[int, Any]:
            return {idx: metric.labels(*values) for idx, values in per_engine_labelvalues.items()}

        self.counters = {
            key: per_engine(self._counter_cls(name=PREFIX + name, documentation=doc, labelnames=labelnames))
            for key, (name, doc) in COUNTER_SERIES.items()
        }
        self.histograms = {
            key: per_engine(self._histogram_cls(name=PREFIX + name, documentation=doc, buckets=list(buckets),
                                                labelnames=labelnames))
            for key, (name, doc, buckets) in HISTOGRAM_SERIES.items()
        }
        self.gauges = {
            key: per_engine(self._gauge_cls(name=PREFIX + name, documentation=doc, labelnames=labelnames,
                                            multiprocess_mode="mostrecent"))
            for key, (name, doc) in GAUGE_SERIES.items()
        }
        name, doc = RESIDENT_SHARE
        self.resident_share = per_engine(self._gauge_cls(name=PREFIX + name, documentation=doc,
                                                         labelnames=labelnames, multiprocess_mode="mostrecent"))

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        data = transfer_stats_data
        for key, children in self.counters.items():
            if data.get(key):
                children[engine_idx].inc(data[key])
        for key, children in self.histograms.items():
            for seconds in data.get(key) or ():
                children[engine_idx].observe(seconds)
        for key, children in self.gauges.items():
            if data.get(key):
                children[engine_idx].set(sum(data[key].values()))
        if data.get("full_block_steps"):
            self.resident_share[engine_idx].set(data["resident_block_steps"] / data["full_block_steps"])
