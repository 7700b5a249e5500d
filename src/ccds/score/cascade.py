"""Cascade: a cheap method keeps the best fraction q of the pool, an expensive one ranks
only those. Cost = cheap + q × expensive (spec §2) — the adaptive selection the CCDS paper
names as future work.

The kept examples rank first, in the expensive method's order; the rest follow in the cheap
method's order, so any subset size gets a sensible ranking.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field, field_validator

from ..select import rank
from .base import REGISTRY, Method, Params, get_method


class CascadeParams(Params):
    cheap: str = "bm25"
    cheap_params: dict[str, Any] = Field(default_factory=dict)
    expensive: str = "ppl"
    expensive_params: dict[str, Any] = Field(default_factory=dict)
    keep: float = Field(0.2, gt=0, le=1, description="fraction q the cheap method keeps")

    @field_validator("cheap", "expensive")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in REGISTRY:
            raise ValueError(f"unknown selection method '{v}', choose one of: "
                             f"{', '.join(sorted(REGISTRY))}")
        return v


class Cascade(Method):
    name = "cascade"
    Params = CascadeParams

    def __init__(self, **params):
        super().__init__(**params)
        p = self.params
        self.cheap = get_method(p.cheap, **{"seed": p.seed, **p.cheap_params})
        self.expensive = get_method(p.expensive, **{"seed": p.seed, **p.expensive_params})

    @property
    def needs_target(self) -> bool:
        return self.cheap.needs_target or self.expensive.needs_target

    def fingerprint(self) -> str:
        return self.cheap.fingerprint() + "|" + self.expensive.fingerprint()

    def check_installed(self) -> None:
        self.cheap.check_installed()
        self.expensive.check_installed()

    def cost(self, pool, target) -> float:
        return self.cheap.cost(pool, target) + self.params.keep * self.expensive.cost(pool, target)

    def score(self, pool, target, ctx, meter) -> np.ndarray:
        first = np.asarray(self.cheap.score(pool, target, ctx, meter), dtype=np.float64)
        kept = np.sort(rank(first)[: max(1, int(round(self.params.keep * len(pool))))])
        second = np.asarray(self.expensive.score([pool[i] for i in kept], target, ctx, meter),
                            dtype=np.float64)
        out = _unit_ranks(first)  # everything else: cheap order, in [0, 1)
        out[kept] = 2.0 + _unit_ranks(second)  # kept: above all others, expensive order
        return out


def _unit_ranks(values: np.ndarray) -> np.ndarray:
    """Scores in [0, 1) with the same order as `values` (best highest)."""
    r = np.empty(len(values))
    r[rank(values)] = np.arange(len(values))[::-1]
    return r / max(len(values), 1)
