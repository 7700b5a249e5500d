"""S2L, SmallToLarge (Yang et al. 2024): cluster the proxy's loss trajectories and sample
the clusters evenly (spec §3).

Examples whose losses move alike during training have similar gradients, so sampling every
trajectory cluster evenly keeps the subset's gradient close to the pool's. Balanced sampling
visits clusters from smallest to largest; with budget B and c clusters left it takes a whole
cluster of at most B/c examples, else a seeded sample of floor(B/c).

As a score, S2L returns a round-robin order over the clusters (round r takes the r-th member
of every cluster still holding one, largest clusters first), whose top B is exactly the
balanced sample of budget B for every B (`balanced_sample` is the reference; a property test
checks they agree), so one scoring serves every fraction.
"""

from __future__ import annotations

import importlib
import time
from typing import Literal

import numpy as np
from pydantic import Field

from ..data.composition import cluster_purity
from ..errors import require
from . import proxy

KMeansBackend = Literal["auto", "faiss", "sklearn"]


class S2LParams(proxy.ProxyParams):
    k: int = Field(100, ge=1, description="k-means clusters")
    kmeans_iters: int = Field(25, ge=1)
    backend: KMeansBackend = Field("auto", description="k-means library; auto: faiss if "
                                   "installed, else scikit-learn")
    by_source: bool = Field(False, description="cluster each source separately")


class S2L(proxy.ProxyMethod):
    name = "s2l"
    Params = S2LParams

    def cost(self, pool, target) -> float:
        p = self.params
        return proxy.cost(p, pool) + kmeans_flops(len(pool), p.k, p.checkpoints, p.kmeans_iters)

    def check_installed(self) -> None:
        kmeans_library(self.params.backend)

    def score(self, pool, target, ctx, meter) -> np.ndarray:
        p = self.params
        traj = proxy.trajectories(p, pool, ctx, meter)
        t0 = time.perf_counter()
        ok = np.isfinite(traj.loss).all(axis=1)  # no response token: never selected
        labels = np.full(len(pool), -1)
        groups = ([np.flatnonzero(ok)] if not p.by_source else
                  [np.flatnonzero(ok & (np.array([e.source for e in pool]) == s))
                   for s in sorted({e.source for e in pool})])
        offset = 0
        for g in groups:
            if len(g) == 0:
                continue
            k = max(1, round(p.k * len(g) / ok.sum())) if p.by_source else p.k
            labels[g] = offset + kmeans(traj.loss[g], k, p.seed, p.kmeans_iters, p.backend)
            offset += k
        meter.add(kmeans_flops(int(ok.sum()), p.k, traj.loss.shape[1], p.kmeans_iters))
        meter.stage.detail["clusters"] = int(len(np.unique(labels[ok])))
        meter.stage.detail["no_response"] = int((~ok).sum())
        sources = [pool[i].source for i in np.flatnonzero(ok)]
        meter.stage.detail["purity"] = {f"depth{d}": cluster_purity(labels[ok], sources, d)
                                        for d in (1, 2)}
        order = balanced_order(labels[ok], p.seed)
        scores = np.full(len(pool), -np.inf)
        scores[np.flatnonzero(ok)[order]] = -np.arange(len(order), dtype=np.float64)
        meter.stage.detail["select_wall_s"] = time.perf_counter() - t0  # after the proxy work
        return scores


def kmeans_flops(n: int, k: int, d: int, iters: int) -> float:
    """Distances to every centroid per iteration (2·n·k·d), the final assignment and the
    k-means++ seeding (3·n·d per centre)."""
    k = min(k, n)
    return 2.0 * n * k * d * (iters + 1) + 3.0 * n * d * k


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 25,
           backend: KMeansBackend = "auto") -> np.ndarray:
    """Cluster labels in 0..k-1 (k capped at the number of distinct rows): seeded k-means++
    initialisation, then Lloyd iterations in faiss (or scikit-learn)."""
    lib = kmeans_library(backend)
    x = np.ascontiguousarray(x, dtype=np.float32)
    init = kmeans_pp(x, k, seed)
    k = len(init)
    if lib.__name__ == "faiss":
        km = lib.Kmeans(x.shape[1], k, niter=iters, seed=seed, verbose=False,
                        min_points_per_centroid=1, max_points_per_centroid=1 << 30)
        km.train(x, init_centroids=init)
        return km.index.search(x, 1)[1].ravel().astype(np.int64)
    return lib.KMeans(k, init=init, n_init=1, max_iter=iters).fit_predict(x).astype(np.int64)


def kmeans_library(backend: KMeansBackend):
    """faiss or scikit-learn's `sklearn.cluster`, as `backend` says (auto: faiss if
    installed, else scikit-learn); neither installed is the s2l extra's one line."""
    if backend == "auto":
        try:
            return importlib.import_module("faiss")
        except ImportError:
            backend = "sklearn"
    return require("faiss" if backend == "faiss" else "sklearn.cluster", "s2l", "S2L's k-means")


def kmeans_pp(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means++ seeding (each next centre drawn with probability ∝ squared distance to the
    nearest chosen one); stops early when every row coincides with a centre."""
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    d2 = ((x - centres[0]) ** 2).sum(1, dtype=np.float64)
    while len(centres) < k and d2.sum() > 0:
        c = x[rng.choice(len(x), p=d2 / d2.sum())]
        centres.append(c)
        np.minimum(d2, ((x - c) ** 2).sum(1, dtype=np.float64), out=d2)
    return np.stack(centres).astype(np.float32)


def _visit_order(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cluster ids from smallest to largest (ties by id), and their sizes."""
    ids, sizes = np.unique(labels, return_counts=True)
    o = np.lexsort((ids, sizes))
    return ids[o], sizes[o]


def _members(labels: np.ndarray, cluster: int, seed: int) -> np.ndarray:
    """A cluster's members in a seeded random order (the same for every budget)."""
    idx = np.flatnonzero(labels == cluster)
    return idx[np.random.default_rng([seed, int(cluster)]).permutation(len(idx))]


def balanced_sample(labels: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """S2L's balanced sampling, exactly as written: the reference for `balanced_order`."""
    ids, sizes = _visit_order(labels)
    left, out = budget, []
    for i, (c, size) in enumerate(zip(ids, sizes, strict=True)):
        take = min(int(size), left // (len(ids) - i))
        out.append(_members(labels, c, seed)[:take])
        left -= take
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


def balanced_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Every index, in an order whose every prefix is a balanced sample."""
    ids, sizes = _visit_order(labels)
    members = [_members(labels, c, seed) for c in ids]
    out = []
    for r in range(int(sizes.max()) if len(sizes) else 0):
        out.extend(members[j][r] for j in range(len(ids) - 1, -1, -1) if sizes[j] > r)
    return np.asarray(out, dtype=np.int64)
