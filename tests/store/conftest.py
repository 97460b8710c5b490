"""Shared fixtures of the store tests: a small multi-layer paged KV cache on the CPU backend, helpers to mount
size-limited / read-only tmpfs directories, and to run an engine process bound by file ownership and modes as a
non-root one is (each skipped with the reason when this machine does not allow it)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ucm.device import bytes_per_block, get_backend

HERE = Path(__file__).resolve().parent
NUM_LAYERS, NUM_PAGES, HEADS, BLOCK, HEAD_DIM = 3, 24, 2, 4, 8


def make_cache(seed: int | None = None, dtype: torch.dtype = torch.bfloat16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A list of (k, v) layers, pages [NUM_PAGES, BLOCK, HEADS, HEAD_DIM]; random when `seed` is given, else zero."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    shape = (NUM_PAGES, BLOCK, HEADS, HEAD_DIM)

    def one() -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(dtype) if gen is not None else torch.zeros(shape, dtype=dtype)

    return [(one(), one()) for _ in range(NUM_LAYERS)]


def row_bytes(cache) -> int:
    return bytes_per_block(cache_pages(cache))


def cache_pages(cache) -> list[torch.Tensor]:
    return [t for layer in cache for t in layer]


def page_bytes(cache, slot: int) -> bytes:
    """All bytes of one block (all layers) in row order."""
    return b"".join(t[slot].contiguous().view(torch.uint8).numpy().tobytes() for t in cache_pages(cache))


@pytest.fixture
def backend():
    return get_backend("cpu")


def _mount(args: list[str]) -> str | None:
    """Run mount; None on success, else the reason it failed."""
    try:
        proc = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"mount exited {proc.returncode}")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` at `path` (skips the test when this process may not mount)."""
    path.mkdir(parents=True, exist_ok=True)
    reason = _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    if reason is not None:
        pytest.skip(f"cannot mount a tmpfs here: {reason}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount_read_only(path: Path) -> None:
    reason = _mount(["-o", "remount,ro", str(path)])
    if reason is not None:
        pytest.skip(f"cannot remount {path} read-only: {reason}")


def ids_for(seed: int, n: int) -> list[str]:
    """Block ids of `n` blocks of a seeded token sequence."""
    from ucm.store import block_ids_for_tokens

    return block_ids_for_tokens(list(range(seed, seed + n * BLOCK)), BLOCK, f"test;seed={seed}")


def start_writer(root: Path, seed: int, n: int, mode: str, signal_dir: Path) -> subprocess.Popen:
    """Another engine process dumping `n` seeded blocks (slots 1..n of make_cache(seed)) into a UcmNfsStore at
    `root`. mode: plain | hang (after the first temp file is complete: write signal_dir/ready-<pid>, sleep) |
    barrier (write ready-<pid>, wait for signal_dir/go, then publish)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(HERE / "store_writer.py"), str(root), str(seed), str(n), mode, str(signal_dir)]
    return subprocess.Popen(cmd, env=env)


def run_without_file_owner_rights(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run `code` (python -c) as root without CAP_FOWNER, CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: it is bound by
    sticky directories and file modes as any unprivileged engine is (root ignores them; another user could not run
    this checkout's interpreter). Skips the test when this process is not root or cannot drop capabilities."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to own test files as another user and drop capabilities (setpriv)")
    drop = ["setpriv", "--bounding-set=-fowner,-dac_override,-dac_read_search"]
    try:
        probe = subprocess.run([*drop, "true"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot drop capabilities with setpriv: {exc}")
    if probe.returncode != 0:
        pytest.skip(f"cannot drop capabilities with setpriv: {probe.stderr.strip()}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))
    return subprocess.run([*drop, sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=120)
