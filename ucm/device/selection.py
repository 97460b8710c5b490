"""`BlockSelection`: which blocks of a paged KV cache each decode request attends to, as one typed value.

Sparse decode attention (`Backend.sparse_decode_attention`) reads, per request b, the logical blocks
``[0, sink_end)`` (sink), ``sink_end + selected[b, :counts[b]]`` (the top-k output) and
``[local_start[b], ceil(seq_lens[b] / block_size))`` (local window + generated blocks, the partial tail last),
mapped to physical blocks by the engine's ``block_table[b]``. This object carries those inputs together and
checks, once at construction, everything that can be checked without reading device memory (ranks, dtypes,
batch sizes, one device), so it is safe inside a CUDA graph capture. Value checks that need the data (e.g.
``local_start`` inside the request) stay with the implementation that reads it (`ucm.device.reference`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from ucm.errors import UcmConfigError


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _check_host_int(name: str, value: object, allowed: str, upper: int | None = None) -> None:
    """A host integer in [0, upper] (no tensor: reading one would synchronize with its device)."""
    number = None
    if not isinstance(value, bool | torch.Tensor):
        try:
            number = operator.index(value)
        except TypeError:
            pass
    if number is None or number < 0 or (upper is not None and number > upper):
        raise UcmConfigError(name, value, allowed)


@dataclass(frozen=True, eq=False)
class BlockSelection:
    """The kept blocks of a batch of B decode requests: sink + selected candidates + local window.

    All tensors on one device (the attention's: the query's for a kernel); integer dtypes.

    - ``block_table`` ``[B, width]``: the engine's dense block table (physical block ids per logical block);
    - ``seq_lens`` ``[B]``: tokens of each request (the last block holds the partial tail);
    - ``selected`` ``[B, K]`` (int64 from `Backend.topk_masked`): candidate indices, ascending, -1 padded;
      candidate c of request b is logical block ``sink_end + c``;
    - ``counts`` ``[B]``: how many leading entries of ``selected[b]`` are real;
    - ``sink_end`` host int ``>= 0`` (``<= width``): the sink blocks ``[0, sink_end)``, shared by the batch;
    - ``local_start`` ``[B]``: first local-window block, ``sink_end <= local_start[b] < ceil(seq_lens[b] / bs)``;
    - ``max_seq_len`` optional host int ``>= 0``: a bound on the kept tokens, so a kernel can size its grid
      without a device sync (default: the table's width in tokens).

    Raises `UcmConfigError` naming the field when a rank, dtype, batch size or device disagrees.
    """

    block_table: torch.Tensor
    seq_lens: torch.Tensor
    selected: torch.Tensor
    counts: torch.Tensor
    sink_end: int
    local_start: torch.Tensor
    max_seq_len: int | None = None

    def __post_init__(self) -> None:
        tensors = {"block_table": 2, "seq_lens": 1, "selected": 2, "counts": 1, "local_start": 1}
        for name, rank in tensors.items():
            t = getattr(self, name)
            shape = "[B, width]" if name == "block_table" else "[B, K]" if name == "selected" else "[B]"
            if not isinstance(t, torch.Tensor):
                raise UcmConfigError(name, type(t).__name__, f"an integer torch.Tensor {shape}")
            if t.dim() != rank or not _is_integer(t):
                raise UcmConfigError(name, f"{t.dtype} {tuple(t.shape)}", f"an integer tensor {shape}")
        batch = self.block_table.shape[0]
        for name in ("seq_lens", "selected", "counts", "local_start"):
            t = getattr(self, name)
            if t.shape[0] != batch:
                table = tuple(self.block_table.shape)
                raise UcmConfigError(f"{name} batch size", t.shape[0], f"{batch}, the rows of block_table {table}")
        device = self.block_table.device
        for name in ("seq_lens", "selected", "counts", "local_start"):
            t = getattr(self, name)
            if t.device != device:
                raise UcmConfigError(f"{name} device", str(t.device), f"{device}, block_table's device")
        width = self.block_table.shape[1]
        _check_host_int("sink_end", self.sink_end, f"a host int in [0, {width}] (the block_table width)", width)
        if self.max_seq_len is not None:
            _check_host_int("max_seq_len", self.max_seq_len, "None or a host int >= 0")

    @property
    def batch_size(self) -> int:
        """B: the number of requests."""
        return self.block_table.shape[0]

    @property
    def device(self) -> torch.device:
        """The device every tensor of the selection lives on."""
        return self.block_table.device

    def check_query(self, query: torch.Tensor) -> None:
        """Raise `UcmConfigError` unless ``query`` is ``[B, num_q_heads, head_dim]`` for this selection's B."""
        if query.dim() != 3 or query.shape[0] != self.batch_size:
            raise UcmConfigError("query shape", tuple(query.shape), f"[{self.batch_size}, num_q_heads, head_dim]")


__all__ = ["BlockSelection"]
