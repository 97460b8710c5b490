"""Device abstraction: streams, events, pinned buffers, async copies and batched block ops per accelerator.

Use `get_backend()` to obtain the `Backend` for this process; see `ucm.device.backend` for the contract.
"""

from ucm.device.backend import Backend, CopyHandle, StreamGate
from ucm.device.pinned import PinnedBufferPool
from ucm.device.reference import as_page_tensors, bytes_per_block, page_nbytes
from ucm.device.registry import backend_class, get_backend, registered_backends
from ucm.device.selection import BlockSelection

__all__ = [
    "Backend",
    "BlockSelection",
    "CopyHandle",
    "PinnedBufferPool",
    "as_page_tensors",
    "backend_class",
    "bytes_per_block",
    "get_backend",
    "page_nbytes",
    "registered_backends",
    "StreamGate",
]
