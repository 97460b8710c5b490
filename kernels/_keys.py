"""Order-preserving integer keys of float32 scores, shared by the scoring kernel (its histogram) and top-k.

Comparing keys as signed int32 orders them as the floats; the top bits of a key name a histogram bin, and
bins are ordered as the scores in them.
"""

from __future__ import annotations

from ._triton import tl, triton


@triton.jit
def score_key(vals):
    """int32 keys of float32 values: negative floats get their magnitude bits flipped."""
    bits = vals.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def key_bin(key, BITS: tl.constexpr):
    """Histogram bin of a key: its top BITS bits, as an index in [0, 2**BITS)."""
    return (key >> (32 - BITS)) + (1 << (BITS - 1))
