"""Accuracy evaluation of sparse attention in vLLM: test models (``models``) and the harness (``__main__``)."""
