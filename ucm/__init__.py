"""UCM: sparse-attention KV-cache framework for LLM serving (vLLM plug-in).

Layers, top to bottom (data flows one way):
  ucm.integration.vllm  -> vLLM connector and hooks
  ucm.sparse            -> sparse-attention algorithms (ESA) and the budget controller
  ucm.store             -> KV block stores (UcmDram, UcmNfsStore)
  ucm.device            -> device abstraction (streams, copies, block ops) with cpu / cuda / npu backends
"""

__version__ = "0.1.0"
