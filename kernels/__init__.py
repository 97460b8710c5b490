"""Triton kernels behind the CUDA backend (importable without a GPU; run on CPU under TRITON_INTERPRET=1)."""
