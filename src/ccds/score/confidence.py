"""Least confidence from a reference model (S2L's baseline): the examples whose response
tokens the proxy, at a chosen checkpoint (early 0 or late −1), finds least probable."""

from __future__ import annotations

import numpy as np

from . import proxy


class ConfidenceParams(proxy.ProxyParams):
    checkpoint: int = -1


class LeastConfidence(proxy.ProxyMethod):
    name = "least_confidence"
    Params = ConfidenceParams

    def score(self, pool, target, ctx, meter) -> np.ndarray:
        conf = proxy.trajectories(self.params, pool, ctx, meter).confidence
        c = conf[:, self.params.checkpoint]
        return np.where(np.isfinite(c), -c, -np.inf)
