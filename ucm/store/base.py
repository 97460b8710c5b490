"""The KV store contract: one asynchronous interface for every store (DRAM, shared filesystem, ...).

Who calls what, and when (the connector owns one store per worker; the scheduler side may own a second
instance on the same storage just to `lookup`):

- scheduler side, when a request arrives: ``lookup_prefix(ids)`` -> how many leading blocks can be loaded
  (ids from `ucm.store.naming.block_ids_for_tokens`).
- worker side, during/after prefill: ``dump(ids, BlockPages(kv_caches, slots))`` -> `StoreTask`; poll
  ``task.done()`` from ``get_finished`` and keep the source blocks unchanged until it is done.
- worker side, on a prefix hit or when the sparse algorithm needs blocks back: ``load(ids, BlockPages(...))``
  -> `StoreTask`; ``task.wait()`` before the forward that reads those pages. A load may cover a sub-range of
  the stored row (e.g. one layer) via ``BlockPages.row_offset``.
- scheduler side, when the workers report blocks they failed to load: ``report_failed_loads(ids)`` (a store on
  shared storage checks them again, so that its lookup stops offering a block that can never load).
- anyone: ``stats()`` for metrics, ``close()`` at shutdown.

A *stored block* is one vLLM block for all layers of one worker: the bytes of one row of a `ucm.device` block
buffer (uint8, the pages of every listed page tensor concatenated in order; a layer cache is a tensor or a
(k, v) tuple, a list of layers is flattened in order). Its width is the store's ``kv_block_size``.

Guarantees of every implementation:
- every method is safe to call from several threads at once;
- a block becomes visible to ``lookup`` only once its whole content is written (published); a dump that fails or
  is interrupted (even by killing the process) never becomes visible;
- a load never hands out bytes that differ from what was dumped: a block that is missing, evicted, corrupt or
  unreadable is reported in ``task.failed_ids`` and its destination pages are not written;
- device copies go through `ucm.device.Backend` (batched gather/scatter on a side stream), ordered after the work
  already queued on the calling thread's current stream when ``dump``/``load`` is called.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from ucm.device import Backend, as_page_tensors, bytes_per_block
from ucm.device.backend import Cache
from ucm.errors import UcmConfigError
from ucm.store.errors import StoreTransferError


@dataclasses.dataclass(frozen=True)
class BlockPages:
    """Where blocks live in device memory: a paged KV cache plus one cache slot (page index) per block id.

    ``cache``: a page tensor, a (k, v) tuple, or a list of layers (each a tensor or a (k, v) tuple); pages along
    dim 0, one page contiguous. ``slots``: int64 tensor, ``slots[i]`` is the page index of the i-th block id.
    ``row_offset``: byte offset of these pages inside the stored row (loads only; dumps are always whole rows
    with offset 0). Example: to load only layer L of a model whose layers all have ``p`` bytes per page, pass
    ``BlockPages(kv_caches[L], slots, row_offset=L * p)``. ``background``: a load ahead of its use, running beside
    the engine's compute: the store asks the device layer to keep it from competing with that compute.
    """

    cache: Cache
    slots: torch.Tensor
    row_offset: int = 0
    background: bool = False

    @property
    def pages(self) -> list[torch.Tensor]:
        """The flattened page tensors, in row order."""
        return as_page_tensors(self.cache)

    @property
    def row_bytes(self) -> int:
        """Bytes of one block's pages here (= the covered sub-range of a stored row)."""
        return bytes_per_block(self.pages)

    def check(self, num_ids: int, kv_block_size: int, whole_row: bool, block_ids: Sequence[str] = ()) -> None:
        """Raise `UcmConfigError` unless these pages fit `num_ids` blocks of a `kv_block_size`-byte row.

        Slots on the host are checked against the pages (indexing would wrap a negative slot to another page);
        slots on a device are not: reading them back would wait for the device. `block_ids` name bad slots."""
        if self.slots.dtype != torch.int64 or self.slots.dim() != 1 or self.slots.numel() != num_ids:
            raise UcmConfigError(
                "BlockPages.slots", f"{self.slots.dtype} {tuple(self.slots.shape)}", f"int64 [{num_ids}]"
            )
        if self.slots.device.type == "cpu" and num_ids:
            self._check_slots(block_ids)
        width = self.row_bytes
        if whole_row and (self.row_offset != 0 or width != kv_block_size):
            raise UcmConfigError(
                "dump source", f"{width} B per block at offset {self.row_offset}",
                f"whole rows: offset 0 and kv_block_size={kv_block_size} B per block",
            )
        if self.row_offset < 0 or self.row_offset + width > kv_block_size:
            raise UcmConfigError(
                "load destination", f"{width} B per block at offset {self.row_offset}",
                f"a sub-range of the {kv_block_size} B row",
            )


    def _check_slots(self, block_ids: Sequence[str]) -> None:
        num_pages = min(page.shape[0] for page in self.pages)  # layers may differ: every one must hold the slot
        low, high = torch.aminmax(self.slots)
        if low >= 0 and high < num_pages:
            return
        bad = torch.nonzero((self.slots < 0) | (self.slots >= num_pages)).flatten().tolist()
        shown = ", ".join(
            f"slot {int(self.slots[i])} of {block_ids[i] if i < len(block_ids) else f'position {i}'}" for i in bad[:4]
        )
        more = f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""
        raise UcmConfigError("BlockPages.slots", shown + more, f"page indices in [0, {num_pages}) of every layer")


class StoreTask(abc.ABC):
    """One `dump` or `load` in flight. Thread-safe; keep it until `done()` (it keeps its tensors alive)."""

    op: ClassVar[str] = ""

    def __init__(self, block_ids: Sequence[str]):
        self.block_ids = list(block_ids)

    @abc.abstractmethod
    def done(self) -> bool:
        """True once every block of the task has finished, successfully or not (non-blocking)."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> None:
        """Block until done. Raises `StoreLoadError` / `StoreDumpError` naming the failed block ids (the other
        blocks completed), or `TimeoutError` when `timeout` seconds pass first."""

    @property
    @abc.abstractmethod
    def failed_ids(self) -> list[str]:
        """Ids that failed so far, in request order (final once `done()`)."""

    @property
    @abc.abstractmethod
    def failure_reasons(self) -> dict[str, str]:
        """Failed id -> a sentence saying why."""

    def _raise_if_failed(self, error_type: type[StoreTransferError]) -> None:
        failed = self.failed_ids
        if failed:
            raise error_type(failed, self.failure_reasons)


@dataclasses.dataclass
class StoreStats:
    """Counters since the store was created (sizes: bytes). ``used_bytes``/``stored_blocks`` are the current
    content as this process sees it; ``capacity_bytes`` is None when unbounded."""

    blocks_dumped: int = 0
    bytes_dumped: int = 0
    dumps_skipped: int = 0  # already stored (or being stored) when dump was called
    blocks_loaded: int = 0
    bytes_loaded: int = 0
    lookup_hits: int = 0
    lookup_misses: int = 0
    evictions: int = 0
    dump_failures: int = 0
    load_failures: int = 0
    gc_skipped: int = 0  # entries a garbage collection pass could not use or delete (summed over passes)
    used_bytes: int = 0
    stored_blocks: int = 0
    capacity_bytes: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)


class KVStoreBase(abc.ABC):
    """A KV block store. Subclasses set `name` and `config_fields`, and implement the abstract methods.

    Constructed by `ucm.store.create_store(name, config, backend)`; ``config`` is the user's
    ``ucm_connector_config`` mapping, validated by `ucm.store.config` against `config_fields`.
    """

    name: ClassVar[str] = ""
    #: field -> one-line description of accepted values (used in error messages and docs/stores.md)
    config_fields: ClassVar[Mapping[str, str]] = {}
    #: True when background loads (`BlockPages.background`) run on a device stream of their own, ordered after the
    #: caller's queued work and nothing else of the store: a caller may then queue them from a held stream
    #: (`Backend.hold_stream`) without holding the store's other copies
    background_apart: ClassVar[bool] = False

    def __init__(self, config: Mapping[str, Any], backend: Backend):
        self.backend = backend
        self.kv_block_size: int = int(config["kv_block_size"])

    @classmethod
    def check_values(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """The checked values of `config`'s fields; raise one `UcmConfigError` for the first bad one.

        Builds nothing (no memory, threads or files), so the connector calls it in the process that builds the
        engine config, before any engine starts; ``kv_block_size`` may be absent there (derived from the model
        later), and checks that need it then wait for the constructor. Unknown fields are refused before, by
        `ucm.store.factory.check_config`. Default: no checks."""
        return {}

    # ------------------------------------------------------------------ queries (scheduler and worker side)
    @abc.abstractmethod
    def lookup(self, block_ids: Sequence[str]) -> list[bool]:
        """Per id, whether the block is published (loadable now). Cheap; counts hits/misses in `stats`."""

    def lookup_prefix(self, block_ids: Sequence[str]) -> int:
        """Number of leading ids that are all published (stops at the first miss).

        Called by the connector's scheduler side to size the external prefix hit."""
        count = 0
        for hit in self.lookup(block_ids):
            if not hit:
                break
            count += 1
        return count

    # ------------------------------------------------------------------ transfers (worker side)
    @abc.abstractmethod
    def dump(self, block_ids: Sequence[str], source: BlockPages) -> StoreTask:
        """Copy whole rows ``source`` (slot i -> block_ids[i]) into the store and publish each block once durable.

        Asynchronous: returns at once with a task. Ids already stored are skipped (success); an id another task
        is dumping right now is done only once it is stored. The source pages must not be overwritten until the
        task is done. Failures (no space, read-only or missing directory, store full of blocks being loaded) are
        reported by the task per id; a failed block is not visible."""

    @abc.abstractmethod
    def load(self, block_ids: Sequence[str], destination: BlockPages) -> StoreTask:
        """Copy stored rows (or the sub-range ``destination.row_offset`` .. + ``row_bytes``) into the destination
        pages (block_ids[i] -> slot i; slots distinct). Asynchronous; the task's `wait()` raises `StoreLoadError`
        naming blocks that were missing, evicted or failed verification; only those pages are left unwritten.
        A block being loaded is never evicted."""

    # ------------------------------------------------------------------ failed loads (scheduler side, optional)
    def report_failed_loads(self, block_ids: Sequence[str]) -> StoreTask | None:
        """Ids a worker could not load from this storage: the connector's scheduler side passes on what its workers
        report, so that a lookup-only instance stops offering a block that can never load (its `lookup` shares no
        memory with the worker's instance).

        A store on shared storage checks those blocks again, asynchronously, and hides from `lookup` the ones that
        fail for good (a corrupt file that cannot be deleted, one this engine cannot verify); a block that failed
        for a passing reason stays visible. Returns a task that ends once they were checked (its ``failed_ids``:
        those that cannot be loaded now), or None: nothing to check (default; a process-local store is looked up
        through the worker's own reports)."""
        return None

    # ------------------------------------------------------------------ pinned loads (optional)
    def pin(self, block_ids: Sequence[str]) -> Any | None:
        """Keep these blocks loadable until `unpin` (never evicted) and resolve them once, so that repeated loads
        of any of them (`load_pinned`) cost no per-id lookup. None: this store cannot pin (use `load`).

        For a reader that loads subsets of one fixed set many times (a sparse request's prompt blocks, every
        layer at every retrieval); ids not stored now stay unloadable through the pin."""
        return None

    def load_pinned(self, groups: Sequence[tuple[Any, Sequence[int]]], destination: BlockPages) -> StoreTask:
        """`load` of pinned blocks: for each (pin, indices) group the blocks at those positions of the pin's id
        list, in order, into ``destination``'s slots (one task and one copy for all groups)."""
        raise NotImplementedError(f"{self.name} cannot pin blocks")

    def load_pinned_layers(
        self, items: Sequence[tuple[Sequence[tuple[Any, Sequence[int]]], BlockPages]]
    ) -> StoreTask:
        """`load_pinned` into several destinations at once, (groups, destination) each (e.g. every layer's loads of
        a step, each into its own layer's pages): one task for all of them. This default takes one destination
        through `load_pinned`; a store that loads several at once overrides it."""
        if len(items) == 1:
            return self.load_pinned(*items[0])
        raise NotImplementedError(f"{self.name} loads pinned blocks into one destination per call")

    def unpin(self, pinned: Any) -> None:
        """End a `pin` (idempotent): its blocks may be evicted again."""
        return None

    # ------------------------------------------------------------------ housekeeping
    @abc.abstractmethod
    def stats(self) -> StoreStats:
        """A snapshot of the counters (see `StoreStats`)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Wait for tasks in flight, release threads and pinned memory. Idempotent; later calls raise
        `StoreClosedError`."""

    def __enter__(self) -> KVStoreBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
