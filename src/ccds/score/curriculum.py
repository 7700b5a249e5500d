"""Confidence curriculum (S2L's baseline; Varshney et al. 2022): a seeded random subset,
trained easy to hard — most to least confident under the proxy at a chosen checkpoint.

Selection here is random on purpose: the method changes only the order, so comparing it with
`random` at the same seed isolates the effect of the curriculum. Consumers train with
`TrainConfig(order="given")` on `train_order(...)` (the CLI and sweeps do this).
"""

from __future__ import annotations

import numpy as np

from . import proxy
from .confidence import ConfidenceParams


class Curriculum(proxy.ProxyMethod):
    name = "curriculum"
    Params = ConfidenceParams
    order = "given"

    def score(self, pool, target, ctx, meter) -> np.ndarray:
        proxy.trajectories(self.params, pool, ctx, meter)  # computed (and charged) here
        return np.random.default_rng(self.params.seed).random(len(pool))

    def train_order(self, pool, subset, ctx) -> np.ndarray:
        conf = proxy.trajectories(self.params, pool, ctx).confidence[:, self.params.checkpoint]
        c = np.nan_to_num(conf[subset], nan=-1.0)  # no response token: last
        return np.asarray(subset)[np.argsort(-c, kind="stable")]
