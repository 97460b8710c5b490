"""Sparse-attention framework: the algorithm contract (`UcmSparseBase`), its factory, budget and ESA.

The engine integration calls `create_sparse(method, ucm_sparse_config, role, block_size=...)` and then the
methods documented in `ucm.sparse.base`.
"""

from ucm.sparse.base import (
    INVALID_SLOTS,
    BlockPlan,
    PackedKeys,
    SparseAttentionView,
    SparseBatch,
    SparseRequestStep,
    SparseRequestView,
    SparseStepStats,
    UcmSparseBase,
    UcmSparseRole,
)
from ucm.sparse.budget import plan_blocks, window_layout
from ucm.sparse.config import EsaConfig
from ucm.sparse.registry import create_sparse, known_methods, register_sparse

__all__ = [
    "INVALID_SLOTS",
    "BlockPlan",
    "EsaConfig",
    "PackedKeys",
    "SparseAttentionView",
    "SparseBatch",
    "SparseRequestStep",
    "SparseRequestView",
    "SparseStepStats",
    "UcmSparseBase",
    "UcmSparseRole",
    "create_sparse",
    "known_methods",
    "plan_blocks",
    "register_sparse",
    "window_layout",
]
