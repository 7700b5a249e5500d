"""Middle perplexity from a reference model (S2L's baseline; Marion et al. 2023): the middle
third of the pool by the proxy's perplexity at a chosen checkpoint comes first."""

from __future__ import annotations

import numpy as np

from . import proxy
from .confidence import ConfidenceParams
from .ppl import middle_third_first


class MidPPL(proxy.ProxyMethod):
    name = "mid_ppl"
    Params = ConfidenceParams

    def score(self, pool, target, ctx, meter) -> np.ndarray:
        loss = proxy.trajectories(self.params, pool, ctx, meter).loss[:, self.params.checkpoint]
        ok = np.isfinite(loss)
        out = np.full(len(pool), -np.inf)
        out[ok] = middle_third_first(np.exp(loss[ok]), self.params.seed)
        return out
