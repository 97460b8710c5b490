"""ESA's warm-up at engine start compiles what the decode steps will run (CUDA: Triton's JIT).

The first requests of an engine used to decode several times slower than the next ones while vLLM's JIT monitor
reported Triton kernels compiled during inference (the selection kernels at the requests' row widths, the copy
kernel at their block counts). After `register_kv_caches` no retrieval at any row width the caches allow, nor a
load, block move or dump of any size, may compile another kernel variant.
"""

from __future__ import annotations

import pytest
import torch

from ucm.device import as_page_tensors, get_backend
from ucm.sparse.base import QueryShape, UcmSparseRole
from ucm.sparse.config import EsaConfig
from ucm.sparse.esa.esa import Esa
from ucm.store import create_store


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_no_kernel_compiles_after_the_warm_up():
    from triton import knobs

    backend = get_backend("cuda")
    device = backend.device
    layers, blocks, bs, kvh, d, heads = 4, 700, 16, 8, 128, 32
    caches = {f"model.layers.{i}.attn": (torch.zeros(blocks, bs, kvh, d, dtype=torch.bfloat16, device=device),
                                         torch.zeros(blocks, bs, kvh, d, dtype=torch.bfloat16, device=device))
              for i in range(layers)}
    row = layers * 2 * bs * kvh * d * 2
    store = create_store("UcmDram", {"kv_block_size": row, "max_cache_size": 64 * row}, backend)
    esa = Esa(EsaConfig(), UcmSparseRole.WORKER, bs, backend=backend, store=store)
    esa.register_kv_caches(caches, query_shape=QueryShape(16, heads, d, torch.bfloat16))

    compiled: list[str] = []
    previous = knobs.runtime.jit_post_compile_hook

    def hook(**kwargs):  # Triton's internal hook: keyword arguments only, their set varies across releases
        compiled.append(getattr(kwargs.get("fn"), "name", "?"))
        return previous(**kwargs) if previous is not None else None

    knobs.runtime.jit_post_compile_hook = hook
    try:
        key_view = next(iter(caches.values()))[0]
        gen = torch.Generator().manual_seed(0)
        for width in (3, 17, 100, 255, 256, 333, 512, 699):
            for batch in (1, 3, 8):
                reps = [torch.randn(width, kvh, d, generator=gen).to(device, torch.bfloat16) for _ in range(batch)]
                queries = torch.randn(batch, heads, d, generator=gen).to(device, torch.bfloat16)
                ks = [min(width, k) for k in (1, 37, 140)][:batch] + [min(width, 140)] * max(0, batch - 3)
                esa.retriever.submit_batch(queries, reps, ks).handle.wait()
            esa.retriever.representations(key_view, torch.arange(1, 1 + width // 4 + 1, device=device))
        pages = as_page_tensors(next(iter(caches.values())))
        width = sum(p[0].numel() * p.element_size() for p in pages)
        for n in (5, 16, 33, 160):
            ids = torch.randperm(blocks - 1, generator=gen)[:n] + 1
            rows = torch.randperm(2 * n, generator=gen)[:n]
            buf = backend.alloc_pinned(2 * n * width).view(2 * n, width)
            for background in (False, True):
                for where in (ids, ids.to(device)):
                    backend.scatter_blocks(buf, pages, where, rows=rows, stream=esa.retriever.stream,
                                           background=background).wait()
            backend.gather_blocks(list(caches.values()), ids.to(device),
                                  torch.empty(n, row, dtype=torch.uint8, device=device)).wait()
        torch.cuda.synchronize()
    finally:
        knobs.runtime.jit_post_compile_hook = previous
    assert compiled == [], f"kernels compiled after the warm-up: {compiled}"
