"""The compute-optimal frontier, break-even model-size ratios, amortisation, overlap (spec §4).

A run is a point (C, P) with C = selection + training cost. The empirical frontier at budget
K is the best P among runs with C ≤ K; the fitted frontier is the best fitted curve at K.

Break-even: scale the trained model by r with the selection model fixed. Training cost
scales with r, selection cost does not, so in units of C_full each run moves from
s + t to s/r + t (s, t its selection and training shares). A method's break-even r is the
smallest r at which, refitted on the moved points, it beats every cheaper method's curve
at some budget in the range of interest. Sharing one selection over m tasks charges s/m, the
same move, so the number of tasks at which a method joins is found the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .fit import Fit, fit_methods


@dataclass
class Point:
    method: str
    fraction: float
    selection: float  # FLOPs
    training: float  # FLOPs
    perf: float
    run: str = ""

    @property
    def total(self) -> float:
        return self.selection + self.training


def empirical_frontier(points: Sequence[Point], training_only: bool = False) -> list[Point]:
    """The runs that raise the best P as the budget grows (a monotone staircase).
    `training_only`: the fixed-training-budget view, selection cost ignored."""
    def cost(p):
        return p.training if training_only else p.total

    out, best = [], -np.inf
    for p in sorted(points, key=lambda p: (cost(p), -p.perf)):
        if p.perf > best:
            out.append(p)
            best = p.perf
    return out


def frontier_at(points: Sequence[Point], budget: float) -> Point | None:
    """The best run affordable at `budget`."""
    ok = [p for p in points if p.total <= budget]
    return max(ok, key=lambda p: p.perf) if ok else None


def fitted_frontier(fits: dict[str, Fit], budgets: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """max over methods of the fitted curves, and which method gives it, at each budget."""
    names = list(fits)
    vals = np.stack([fits[m](budgets) for m in names])
    best = vals.argmax(axis=0)
    return vals.max(axis=0), [names[i] for i in best]


def group(points: Sequence[Point]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out: dict[str, list[Point]] = {}
    for p in points:
        out.setdefault(p.method, []).append(p)
    return {m: (np.array([p.total for p in ps]), np.array([p.perf for p in ps]))
            for m, ps in out.items()}


def rescale(points: Sequence[Point], factor: float, methods: set[str] | None = None
            ) -> list[Point]:
    """Selection cost divided by `factor` (a model-size ratio or a number of tasks)."""
    return [Point(p.method, p.fraction, p.selection / factor if methods is None or
                  p.method in methods else p.selection, p.training, p.perf, p.run)
            for p in points]


def selection_share(points: Sequence[Point], method: str) -> float:
    return float(np.mean([p.selection for p in points if p.method == method]))


def cheaper_methods(points: Sequence[Point], method: str) -> set[str]:
    mine = selection_share(points, method)
    return {p.method for p in points if selection_share(points, p.method) < mine}


def joins_frontier(points: Sequence[Point], method: str, c_full: float,
                   cheaper: set[str] | None = None, tol: float = 0.01, **fit_kw) -> bool:
    """Does `method`'s fitted curve beat every cheaper method's somewhere in the budget range
    the runs span, by more than `tol` × the spread of the runs' performance (so two curves
    meeting at the ceiling do not count)?"""
    cheaper = cheaper_methods(points, method) if cheaper is None else cheaper
    if not cheaper:
        return True
    fits = fit_methods(group([p for p in points if p.method in cheaper | {method}]), c_full,
                       bootstrap=0, **fit_kw)
    lo = min(p.total for p in points if p.method == method)
    hi = max(p.total for p in points)
    grid = np.geomspace(max(lo, 1e-300), hi, 400)
    best_other = np.max([fits[m](grid) for m in cheaper], axis=0)
    spread = max(p.perf for p in points) - min(p.perf for p in points)
    return bool(np.any(fits[method](grid) > best_other + tol * spread))


def break_even(points: Sequence[Point], method: str, c_full: float, *, max_factor: float = 1e4,
               **fit_kw) -> float | None:
    """Smallest factor r ≥ 1 (model-size ratio, or tasks sharing the selection) at which
    `method` joins the frontier; None if not even at `max_factor`. Bisection on log r."""
    cheaper = cheaper_methods(points, method)  # as priced before any rescaling

    def ok(r):
        return joins_frontier(rescale(points, r, {method}), method, c_full, cheaper, **fit_kw)

    if ok(1.0):
        return 1.0
    if not ok(max_factor):
        return None
    lo, hi = 0.0, np.log(max_factor)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(np.exp(mid)) else (mid, hi)
    return float(np.exp(hi))


def jaccard(a: Sequence[str], b: Sequence[str]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / max(len(sa | sb), 1)


def overlap(selections: dict[str, Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """Pairwise Jaccard similarity of the methods' selected ids (one fraction)."""
    names = list(selections)
    m = np.array([[jaccard(selections[a], selections[b]) for b in names] for a in names])
    return names, m
