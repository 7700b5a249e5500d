"""Least confidence from a reference model (S2L's baseline): the examples whose response
tokens the proxy, at a chosen checkpoint (early 0 or late −1), finds least probable."""

from __future__ import annotations

import numpy as np

from . import proxy
from .base import Method


class ConfidenceParams(proxy.ProxyParams):
    checkpoint: int = -1


class LeastConfidence(Method):
    name = "least_confidence"
    needs_target = False
    Params = ConfidenceParams

    def cost(self, pool, target) -> float:
        return proxy.cost(self.params, pool)

    def score(self, pool, target, ctx, meter) -> np.ndarray:
        conf = proxy.trajectories(self.params, pool, ctx, meter).confidence
        c = conf[:, self.params.checkpoint]
        return np.where(np.isfinite(c), -c, -np.inf)
