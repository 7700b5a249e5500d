"""High learnability (S2L's baseline; Zhou et al. 2023): examples whose proxy loss drops the
most between an early and a late checkpoint are the ones the model learns from."""

from __future__ import annotations

import numpy as np

from . import proxy


class LearnabilityParams(proxy.ProxyParams):
    early: int = 0
    late: int = -1


class Learnability(proxy.ProxyMethod):
    name = "learnability"
    Params = LearnabilityParams

    def score(self, pool, target, ctx, meter) -> np.ndarray:
        loss = proxy.trajectories(self.params, pool, ctx, meter).loss
        drop = loss[:, self.params.early] - loss[:, self.params.late]
        return np.where(np.isfinite(drop), drop, -np.inf)
