"""vLLM integration: the KV connector `UnifiedCacheConnectorV1` (prefix reuse from a ucm store, dumps, stats) and
the sparse-attention hooks installed through vLLM's plugin entry point.

Users point vLLM at ``kv_connector="UnifiedCacheConnectorV1"``,
``kv_connector_module_path="ucm.integration.vllm.uc_connector"``; see ``docs/connector.md``.
Nothing here is imported by ``ucm`` itself, so the rest of the package works without vLLM.
"""
