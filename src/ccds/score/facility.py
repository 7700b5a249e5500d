"""Facility location (S2L's baseline): a subset that represents the pool, chosen greedily to
maximise Σ_i max_{j∈S} sim(i, j) over the proxy's own embeddings of the examples.

sim = (1 + cos)/2 ∈ [0, 1]. The objective is submodular, so a candidate's gain can only
shrink as S grows: lazy greedy re-evaluates only the top of a heap of stale gains, and each
evaluation is one O(N·d) pass, so memory stays O(N·d) with no N×N matrix. The greedy order
is nested (its top B is the greedy solution of size B), which makes it a score.
"""

from __future__ import annotations

import heapq
import time
from typing import Literal

import numpy as np
from pydantic import Field

from . import proxy


class FacilityParams(proxy.ProxyParams):
    checkpoint: Literal[0, -1] = Field(-1, description="proxy embeddings from the first or "
                                       "last checkpoint (the only ones kept)")
    max_fraction: float = Field(1.0, gt=0, le=1, description="greedy order for this share "
                                "of the pool; the rest follows by its last gain bound")


class FacilityLocation(proxy.ProxyMethod):
    name = "facility_location"
    Params = FacilityParams

    def cost(self, pool, target) -> float:
        p = self.params
        d = proxy.proxy_counts(p)["d_model"]
        # first gains in one product, then about one O(N·d) evaluation per pick
        greedy = 2.0 * len(pool) * d * (2 + p.max_fraction * len(pool))
        return proxy.cost(p, pool, passes=1, head=False) + greedy

    def score(self, pool, target, ctx, meter) -> np.ndarray:
        p = self.params
        e = proxy.embeddings(p, pool, ctx, meter, p.checkpoint)
        t0 = time.perf_counter()
        order, evals = lazy_greedy(e, max(1, round(p.max_fraction * len(pool))))
        meter.stage.detail["select_wall_s"] = time.perf_counter() - t0  # after the proxy work
        meter.add(2.0 * len(pool) * e.shape[1] * (2 + evals))
        meter.stage.detail["gain_evaluations"] = evals
        out = np.full(len(pool), -np.inf)
        out[order] = -np.arange(len(order), dtype=np.float64)
        rest = np.setdiff1d(np.arange(len(pool)), order)
        out[rest] = -len(order) - np.arange(1, len(rest) + 1)
        return out


def _unit(e: np.ndarray) -> np.ndarray:
    e = np.asarray(e, dtype=np.float32)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def lazy_greedy(emb: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """The first k greedy picks and the number of gain evaluations it took."""
    x = _unit(emb)
    n = len(x)
    cover = np.zeros(n, dtype=np.float32)  # max similarity of each example to the subset
    # Σ_i (1 + x_i·x_j)/2 for every j at once: the exact first gains
    gains = (n + x @ x.sum(0)) / 2
    heap = [(-float(g), j) for j, g in enumerate(gains)]
    heapq.heapify(heap)
    order, evals = [], 0
    while heap and len(order) < k:
        _, j = heapq.heappop(heap)
        sim = (1 + x @ x[j]) / 2
        g = float(np.maximum(sim - cover, 0).sum())
        evals += 1
        if not heap or g >= -heap[0][0]:
            order.append(j)
            np.maximum(cover, sim, out=cover)
        else:
            heapq.heappush(heap, (-g, j))
    return np.asarray(order, dtype=np.int64), evals


def plain_greedy(emb: np.ndarray, k: int) -> np.ndarray:
    """Every gain re-evaluated at every step, blockwise: the reference for lazy_greedy."""
    x = _unit(emb)
    n = len(x)
    cover = np.zeros(n, dtype=np.float32)
    chosen = np.zeros(n, dtype=bool)
    order = []
    for _ in range(min(k, n)):
        best, best_j = -1.0, -1
        for lo in range(0, n, 4096):
            sim = (1 + x @ x[lo:lo + 4096].T) / 2  # [n, block]
            g = np.maximum(sim - cover[:, None], 0).sum(0)
            g[chosen[lo:lo + 4096]] = -1
            j = int(np.argmax(g))
            if g[j] > best:
                best, best_j = float(g[j]), lo + j
        order.append(best_j)
        chosen[best_j] = True
        np.maximum(cover, (1 + x @ x[best_j]) / 2, out=cover)
    return np.asarray(order, dtype=np.int64)
