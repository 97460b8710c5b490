"""Connector statistics of one interval: counters, latency samples and store gauges, summed over workers.

Built by the worker half (loads, dumps, store, sparse steps) and the scheduler half (lookups, hits) of the
connector once per step (`get_kv_connector_stats`); vLLM merges the workers' and the scheduler's (`aggregate`),
hands every step's payload to the Prometheus exporter (`ucm.integration.vllm.prom_metrics`) and, when stats logging
is on, merges the steps of its log interval and logs ``reduce()`` as "KV Transfer metrics: ...".
docs/connector.md documents every name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

#: Counters: sums over the steps of the interval and over the workers (block counts: per worker shard).
COUNTERS = (
    "lookup_blocks",  # prompt blocks looked up in the store (beyond vLLM's own prefix cache)
    "hit_blocks",  # of those, found in the store and scheduled for loading
    "hit_tokens",
    "loaded_blocks",  # loaded and used: the blocks before a request's first failed block
    "loaded_bytes",
    "load_failed_blocks",  # missing/corrupt/unreadable: reported to vLLM
    "recomputed_blocks",  # scheduled for loading but recomputed: the failed ones and every one after them
    "load_seconds",  # wall time the steps waited for loads
    "saved_blocks",
    "saved_bytes",
    "save_skipped_blocks",  # already in the store: not written again
    "save_failed_blocks",
    "save_dropped_blocks",  # computed in a step with a failed load: not saved (may depend on bad KV)
    "store_evictions",  # blocks the workers' stores evicted
    "sparse_requests",  # requests that began decoding sparsely (each counted once)
    "sparse_steps",  # (request, decode step) pairs attended sparsely
    "resident_block_steps",  # sum over those pairs of blocks attended, averaged over layers
    "full_block_steps",  # the same for the blocks dense attention would have read
    "retrievals",  # (request, layer) block selections submitted
)
#: Samples (lists of seconds), for the Prometheus histograms: one per request load, per finished dump task, per
#: batched retrieval.
SAMPLES = ("load_durations", "save_durations", "retrieval_durations")
#: Gauges: worker tp rank (a str) -> its store's current value; merging keeps each rank's latest.
GAUGES = ("store_used_bytes", "store_blocks", "store_capacity_bytes")


@dataclasses.dataclass
class UcmConnectorStats(KVConnectorStats):
    def __post_init__(self) -> None:
        for name in COUNTERS:
            self.data.setdefault(name, 0)

    def add(self, **counts: float) -> None:
        for name, value in counts.items():
            self.data[name] = self.data.get(name, 0) + value

    def sample(self, name: str, seconds: float) -> None:
        self.data.setdefault(name, []).append(seconds)

    def set_gauge(self, name: str, rank: int, value: float) -> None:
        self.data.setdefault(name, {})[str(rank)] = value

    def reset(self) -> None:
        self.data = dict.fromkeys(COUNTERS, 0)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        merged = UcmConnectorStats(dict(self.data))
        for name, value in other.data.items():
            mine = merged.data.get(name)
            if name in SAMPLES:
                merged.data[name] = [*(mine or ()), *value]
            elif name in GAUGES:
                merged.data[name] = {**(mine or {}), **value}  # the other is later (steps) or another rank
            else:
                merged.data[name] = (mine or 0) + value
        return merged

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, Any] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()
                               if k in COUNTERS and v}
        if d.get("lookup_blocks"):
            # what the store saved us: blocks whose KV came from it (a failed load is no hit)
            out["hit_rate"] = round(min(1.0, d["loaded_blocks"] / d["lookup_blocks"]), 4)
        if d.get("sparse_steps"):
            for name in ("resident_block_steps", "full_block_steps"):
                out.pop(name, None)
            # per sparse (request, decode step): blocks attended / dense, averaged over layers
            out["resident_blocks"] = round(d["resident_block_steps"] / d["sparse_steps"], 2)
            out["full_blocks"] = round(d["full_block_steps"] / d["sparse_steps"], 2)
            if d["full_block_steps"]:
                out["resident_share"] = round(d["resident_block_steps"] / d["full_block_steps"], 4)
        for name in GAUGES:
            if d.get(name):
                out[name] = sum(d[name].values())
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())
