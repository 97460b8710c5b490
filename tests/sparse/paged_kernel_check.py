"""Parity of the Triton paged decode attention (kernels/paged_attention.py) with the PyTorch reference.

Run as a module by tests/sparse/test_paged_attention_kernel.py: in-process on CUDA, or in a subprocess with
TRITON_INTERPRET=1 on CPU (the interpreter must be switched on before triton is imported).
"""

from __future__ import annotations

import sys

import torch
from sparse_cases import make_case

from ucm.sparse.attention import paged_decode_attention as reference


def check(device: str, big: bool) -> list[str]:
    from ucm.kernels.paged_attention import paged_decode_attention

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = [  # seq lens, block size, q heads, kv heads, head dim
        ([37, 64, 5], 16, 8, 2, 32),
        ([29, 3], 5, 4, 4, 16),
        ([200, 1], 128, 8, 1, 64),
    ]
    if big:
        shapes.append(([9000, 32768, 1500], 16, 32, 8, 128))
    done = []
    for seq_lens, block_size, hq, hkv, d in shapes:
        case = make_case(seq_lens, block_size=block_size, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype,
                         device=device, seed=len(done))
        ref = reference(case.query.float(), case.k_cache.float(), case.v_cache.float(), case.block_table,
                        case.seq_lens)
        for splits in (None, 1, 4):
            out = paged_decode_attention(case.query, case.k_cache, case.v_cache, case.block_table, case.seq_lens,
                                         max(seq_lens), num_splits=splits)
            tol = 2e-2 if dtype == torch.bfloat16 else 2e-3  # bf16 inputs / tf32 dots
            torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
        # a sparse table: every other block of each request, the last one last, shorter lengths
        table = case.block_table.clone()
        lens = case.seq_lens.clone()
        for b, n in enumerate(seq_lens):
            blocks = -(-n // block_size)
            keep = list(range(0, blocks - 1, 2)) + [blocks - 1]
            table[b, : len(keep)] = case.block_table[b, keep]
            lens[b] = (len(keep) - 1) * block_size + n - (blocks - 1) * block_size
        ref = reference(case.query.float(), case.k_cache.float(), case.v_cache.float(), table, lens)
        out = paged_decode_attention(case.query, case.k_cache, case.v_cache, table, lens, max(seq_lens))
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
        done.append(f"{seq_lens} bs={block_size} {hq}/{hkv}x{d} ok")
    return done


if __name__ == "__main__":
    print("\n".join(check(sys.argv[1], sys.argv[2] == "big")))
