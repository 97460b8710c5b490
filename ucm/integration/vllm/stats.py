"""Connector statistics: counters per interval, summed over workers, reduced for vLLM's log line and metrics.

Built by the worker half (loads, dumps) and the scheduler half (lookups, hits) of the connector; vLLM aggregates
them (`aggregate`) and logs ``reduce()`` as "KV Transfer metrics: ..." when stats logging is on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

#: Counter names; every one is a sum over steps and workers (seconds are summed wall time).
COUNTERS = (
    "lookup_blocks",  # prompt blocks looked up in the store (beyond vLLM's own prefix cache)
    "hit_blocks",  # of those, found in the store and scheduled for loading
    "hit_tokens",
    "loaded_blocks",
    "loaded_bytes",
    "load_failed_blocks",  # missing/corrupt/unreadable: reported to vLLM for recomputation
    "load_seconds",
    "saved_blocks",
    "saved_bytes",
    "save_skipped_blocks",  # already in the store: not written again
    "save_failed_blocks",
    "save_dropped_blocks",  # computed in a step with a failed load: not saved (may depend on bad KV)
    "sparse_requests",
    "resident_blocks",  # sparse: blocks attended (summed over requests and layers)
    "full_blocks",  # sparse: blocks dense attention would have read
)


@dataclasses.dataclass
class UcmConnectorStats(KVConnectorStats):
    def __post_init__(self) -> None:
        for name in COUNTERS:
            self.data.setdefault(name, 0)

    def add(self, **counts: float) -> None:
        for name, value in counts.items():
            self.data[name] = self.data.get(name, 0) + value

    def reset(self) -> None:
        self.data = dict.fromkeys(COUNTERS, 0)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        merged = UcmConnectorStats(dict(self.data))
        for name, value in other.data.items():
            merged.data[name] = merged.data.get(name, 0) + value
        return merged

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, Any] = {k: v for k, v in self.data.items() if v}
        if self.data.get("lookup_blocks"):
            out["hit_rate"] = round(self.data["hit_blocks"] / self.data["lookup_blocks"], 4)
        if self.data.get("full_blocks"):
            out["resident_share"] = round(self.data["resident_blocks"] / self.data["full_blocks"], 4)
        if "load_seconds" in out:
            out["load_seconds"] = round(out["load_seconds"], 4)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())
