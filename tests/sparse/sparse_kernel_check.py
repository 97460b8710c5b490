"""Parity of the fused sparse paged decode attention (kernels/sparse_paged_attention.py) with the PyTorch
reference path: the sparse block table (`sparse_block_tables`) fed to `ucm.sparse.attention.paged_decode_attention`.

Run as a module by tests/sparse/test_sparse_paged_attention.py: in-process on CUDA, or in a subprocess with
TRITON_INTERPRET=1 on CPU (the interpreter must be switched on before triton is imported).
"""

from __future__ import annotations

import sys

import torch
from sparse_cases import make_case

from ucm.device import BlockSelection
from ucm.device import reference as device_reference
from ucm.sparse.attention import paged_decode_attention as reference
from ucm.sparse.esa.step import sparse_block_tables


def random_selection(seq_lens: list[int], block_size: int, sink_end: int, local: int, ratio: float, seed: int):
    """Per request a random ascending subset of its candidates [sink_end, local_start), -1 padded; request 1 (if
    any) selects nothing, and a request with no candidate keeps only its windows."""
    gen = torch.Generator().manual_seed(seed)
    local_start, picks = [], []
    for b, n in enumerate(seq_lens):
        total = -(-n // block_size)
        start = max(sink_end, total - local)
        candidates = start - sink_end
        k = 0 if b == 1 else max(1, int(candidates * ratio)) if candidates else 0
        picks.append(torch.randperm(candidates, generator=gen)[:k].sort().values)
        local_start.append(start)
    width = max(len(p) for p in picks) + 1  # one more column of padding than needed, as a wider top-k returns
    selected = torch.full((len(seq_lens), width), -1, dtype=torch.int64)
    for b, p in enumerate(picks):
        selected[b, : len(p)] = p
    counts = torch.tensor([len(p) for p in picks], dtype=torch.int64)
    return selected, counts, torch.tensor(local_start, dtype=torch.int64)


def check(device: str, big: bool) -> list[str]:
    from ucm.kernels.sparse_paged_attention import sparse_paged_decode_attention

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = [  # seq lens, block size, q heads, kv heads, head dim, sink blocks, local blocks
        ([150, 64, 97], 16, 8, 2, 32, 1, 2),
        ([61, 33, 8], 5, 4, 4, 16, 0, 1),
        ([700, 300], 3, 8, 1, 64, 2, 3),
    ]
    if big:
        shapes.append(([9000, 32768, 1500, 20000], 16, 32, 8, 128, 1, 2))
    done = []
    for seq_lens, block_size, hq, hkv, d, sink, local in shapes:
        case = make_case(seq_lens, block_size=block_size, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype,
                         device=device, seed=len(done))
        sink_end = min(sink, min(-(-n // block_size) for n in seq_lens) - 1)
        selected, counts, local_start = random_selection(seq_lens, block_size, sink_end, local, 0.3, len(done))
        table, lens = sparse_block_tables(case.block_table.cpu(), case.seq_lens.cpu(), selected, counts, sink_end,
                                          local_start, block_size)
        q, kc, vc = case.query.float().cpu(), case.k_cache.float().cpu(), case.v_cache.float().cpu()
        ref = reference(q, kc, vc, table, lens)
        host = BlockSelection(case.block_table.cpu(), case.seq_lens.cpu(), selected, counts, sink_end, local_start)
        torch.testing.assert_close(  # the device layer's reference reads the selection the way the kernel does
            device_reference.sparse_decode_attention(q, kc, vc, host), ref)
        fields = (case.block_table, case.seq_lens, selected.to(device), counts.to(device), sink_end,
                  local_start.to(device))
        args = (case.query, case.k_cache, case.v_cache)
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-3  # bf16 inputs / tf32 dots
        for splits in (None, 1, 4):
            out = sparse_paged_decode_attention(*args, BlockSelection(*fields), num_splits=splits)
            torch.testing.assert_close(out.float().cpu(), ref, atol=tol, rtol=tol)
        bounded = BlockSelection(*fields, max_seq_len=int(lens.max()))
        out = sparse_paged_decode_attention(*args, bounded, block_t=32, num_stages=3)
        torch.testing.assert_close(out.float().cpu(), ref, atol=tol, rtol=tol)
        done.append(f"{seq_lens} bs={block_size} {hq}/{hkv}x{d} sink={sink_end} ok")
    return done


if __name__ == "__main__":
    print("\n".join(check(sys.argv[1], sys.argv[2] == "big")))
