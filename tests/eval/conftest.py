"""Fixtures shared by the eval tests: the converted SmolLM2 folder (converted once per machine, then cached)."""

from __future__ import annotations

import pytest

from ucm.eval.models import ensure_smollm2


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return ensure_smollm2()
