"""Selection methods behind one interface (`base.Method`); importing registers them."""

from . import bm25, cascade, embed, less, ppl, random  # noqa: F401  (registers)
from .base import REGISTRY, Context, Method, Scores, get_method, read_scores, run

__all__ = ["REGISTRY", "Context", "Method", "Scores", "get_method", "read_scores", "run"]
