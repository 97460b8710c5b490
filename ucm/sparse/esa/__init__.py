"""ESA: block-mean retrieval sparse attention (scheduler budget + worker retrieval, loads and block tables)."""

from ucm.sparse.esa.esa import Esa
from ucm.sparse.esa.schedule import EsaSchedule

__all__ = ["Esa", "EsaSchedule"]
