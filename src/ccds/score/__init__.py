"""Selection methods behind one interface (`base.Method`); importing registers them."""

from . import (  # noqa: F401  (registers)
    bm25,
    cascade,
    confidence,
    curriculum,
    dsir,
    embed,
    facility,
    learnability,
    less,
    mid_ppl,
    ppl,
    random,
    s2l,
)
from .base import REGISTRY, Context, Method, Scores, get_method, read_scores, run

__all__ = ["REGISTRY", "Context", "Method", "Scores", "get_method", "read_scores", "run"]
