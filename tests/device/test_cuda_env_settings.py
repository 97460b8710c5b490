"""The CUDA backend's environment knobs for comparing copy paths in an engine: read on a host without a GPU (the
backend module imports anywhere); a bad value is one clear error naming the variable and what it takes."""

from __future__ import annotations

import pytest

from ucm.backends import cuda
from ucm.errors import UcmConfigError


def test_background_programs_default_and_override():
    assert cuda.background_programs({}) == cuda.BACKGROUND_PROGRAMS
    assert cuda.background_programs({"UCM_BACKGROUND_PROGRAMS": "48"}) == 48


@pytest.mark.parametrize("value", ["0", "-3", "1025", "many", ""])
def test_a_bad_background_programs_value_names_the_variable(value):
    with pytest.raises(UcmConfigError, match=r"UCM_BACKGROUND_PROGRAMS.*\[1, 1024\]"):
        cuda.background_programs({"UCM_BACKGROUND_PROGRAMS": value})


def test_copy_path_choices_default_and_override():
    assert cuda.env_choice("UCM_BACKGROUND_COPY", "dma", ["dma", "kernel"], {}) == "dma"
    environ = {"UCM_BACKGROUND_COPY": "kernel"}
    assert cuda.env_choice("UCM_BACKGROUND_COPY", "dma", ["dma", "kernel"], environ) == "kernel"


def test_a_bad_copy_path_choice_names_the_variable_and_the_values():
    with pytest.raises(UcmConfigError, match=r"UCM_BACKGROUND_COPY.*'dma', 'kernel'"):
        cuda.env_choice("UCM_BACKGROUND_COPY", "dma", ["dma", "kernel"], {"UCM_BACKGROUND_COPY": "engines"})
