"""The compute-optimal frontier, break-even model-size ratios, amortisation, overlap (spec §4).

A run is a point (C, P) with C = selection + training cost. The empirical frontier at budget
K is the best P among runs with C ≤ K; the fitted frontier is the best fitted curve at K.

Membership beyond noise: taken from the cheapest run up, a run joins the empirical frontier
(the staircase) only if its P beats the best P of every cheaper run by more than a tolerance
τ. τ is the seeds' spread when there are seeds: the pooled standard deviation of P over the
runs that share a method and a fraction, sqrt(Σ (n_i − 1)·s_i² / Σ (n_i − 1)); without
seeds, 1% of the group's P range (max P − min P). τ = 0 is the plain staircase. Beside it,
`frontier_hull` is the frontier as the paper draws it: the upper (concave) hull of the runs
in (log C, P), up to the best run.

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

from ..errors import CcdsError
from .fit import Fit, _interval, _stream, fit_methods

DEFAULT_TOL_SHARE = 0.01  # τ without seeds: this share of the group's P range


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


def noise_tolerance(points: Sequence[Point]) -> tuple[float, str]:
    """τ, the margin a run must beat every cheaper run's P by to join the frontier, and where
    it comes from: "seeds" (pooled standard deviation of P within each (method, fraction)
    with several runs) or "default" (DEFAULT_TOL_SHARE of the P range)."""
    cells: dict[tuple[str, float], list[float]] = {}
    for p in points:
        cells.setdefault((p.method, p.fraction), []).append(p.perf)
    ss, dof = 0.0, 0
    for v in cells.values():
        if len(v) > 1:
            ss += float(np.var(v, ddof=1)) * (len(v) - 1)
            dof += len(v) - 1
    if dof:
        return float(np.sqrt(ss / dof)), "seeds"
    perfs = [p.perf for p in points]
    return (DEFAULT_TOL_SHARE * (max(perfs) - min(perfs)) if perfs else 0.0), "default"


def empirical_frontier(points: Sequence[Point], training_only: bool = False,
                       tol: float | None = None) -> list[Point]:
    """The runs that raise the best P as the budget grows (a monotone staircase), each by more
    than `tol` over the best of all cheaper runs (None: `noise_tolerance`; 0: any gain, the
    plain staircase). `training_only`: the fixed-training-budget view, selection cost
    ignored."""
    def cost(p):
        return p.training if training_only else p.total

    tol = noise_tolerance(points)[0] if tol is None else tol
    out, best = [], -np.inf
    for p in sorted(points, key=lambda p: (cost(p), -p.perf)):
        if p.perf > best + tol:
            out.append(p)
        best = max(best, p.perf)
    return out


def frontier_hull(points: Sequence[Point], training_only: bool = False) -> list[Point]:
    """The paper's frontier: the upper (concave) hull of the runs in (log C, P), from the
    cheapest run to the best one (runs that cost nothing are left out: log 0)."""
    def cost(p):
        return p.training if training_only else p.total

    pts = sorted((p for p in points if cost(p) > 0), key=lambda p: (cost(p), -p.perf))
    hull: list[Point] = []
    for p in pts:
        if hull and cost(hull[-1]) == cost(p):
            continue  # same cost, lower P
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            ox, ax_, bx = np.log(cost(o)), np.log(cost(a)), np.log(cost(p))
            if (ax_ - ox) * (p.perf - o.perf) - (a.perf - o.perf) * (bx - ox) >= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    if not hull:
        return []
    top = max(range(len(hull)), key=lambda i: (hull[i].perf, -i))
    return hull[:top + 1]


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
               steps: int = 40, **fit_kw) -> float | None:
    """Smallest factor r ≥ 1 (model-size ratio, or tasks sharing the selection) at which
    `method` joins the frontier; None if not even at `max_factor`. Bisection on log r
    (`steps` halvings of [0, log max_factor])."""
    cheaper = cheaper_methods(points, method)  # as priced before any rescaling

    def ok(r):
        return joins_frontier(rescale(points, r, {method}), method, c_full, cheaper, **fit_kw)

    if ok(1.0):
        return 1.0
    if not ok(max_factor):
        return None
    lo, hi = 0.0, np.log(max_factor)
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(np.exp(mid)) else (mid, hi)
    return float(np.exp(hi))


def empirical_break_even(points: Sequence[Point], method: str, *, tol: float | None = None,
                         max_factor: float = 1e4) -> float | None:
    """Smallest r ≥ 1 at which one of `method`'s runs, its selection cost divided by r, joins
    the empirical frontier (beyond the tolerance τ, `noise_tolerance` of the unmoved runs when
    None); None if not even at `max_factor`. Exact: the frontier changes only where a moved
    run's cost crosses another run's, so those ratios are the only candidates."""
    tol = noise_tolerance(points)[0] if tol is None else tol

    def ok(r):
        return any(p.method == method for p in
                   empirical_frontier(rescale(points, r, {method}), tol=tol))

    if ok(1.0):
        return 1.0
    cands = set()
    for p in points:
        if p.method != method or p.selection <= 0:
            continue
        for q in points:
            if q is p:
                continue
            if q.method != method:  # s_p/r + t_p = C_q
                gap = q.total - p.training
                r = p.selection / gap if gap > 0 else None
            else:  # s_p/r + t_p = s_q/r + t_q
                den = q.training - p.training
                r = (p.selection - q.selection) / den if den != 0 else None
            if r is not None and 1.0 < r <= max_factor:
                cands.add(r)
    for r in sorted(cands):
        if ok(r * (1 + 1e-9)):
            return float(r)
    return None


def break_even_interval(points: Sequence[Point], method: str, c_full: float, *,
                        resamples: int = 20, seed: int = 0, tol: float | None = None,
                        steps: int = 8, max_factor: float = 1e4, fitted: bool = True,
                        **fit_kw) -> dict:
    """95% bootstrap intervals of `method`'s break-even ratio, by the fitted curves
    (`break_even`, `steps` bisection halvings per resample) and by the empirical frontier
    (`empirical_break_even`, τ held at the unmoved runs' value). Each method's runs are
    resampled with replacement from its own stream, seeded by its name (`fit._stream`), so
    the interval does not depend on the platform or on the other methods' order. A resample
    that never breaks even within `max_factor` ranks as +∞; an end among those is None.
    Resamples whose fit fails are counted and left out. Each method's runs are put in a
    canonical order first, so neither the input's order nor the other methods move it."""
    tol = noise_tolerance(points)[0] if tol is None else tol
    by: dict[str, list[Point]] = {}
    for p in points:
        by.setdefault(p.method, []).append(p)
    for ps in by.values():  # a canonical order: the input's order does not move the interval
        ps.sort(key=lambda p: (p.fraction, p.training, p.selection, p.perf, p.run))
    rngs = {m: _stream(seed, m) for m in sorted(by)}
    fit_vals, emp_vals, failed = [], [], 0
    for _ in range(resamples):
        sample = []
        for m in sorted(by):
            idx = rngs[m].integers(0, len(by[m]), len(by[m]))
            sample += [by[m][i] for i in idx]
        r = empirical_break_even(sample, method, tol=tol, max_factor=max_factor)
        emp_vals.append(np.inf if r is None else r)
        if fitted:
            try:
                r = break_even(sample, method, c_full, max_factor=max_factor, steps=steps,
                               **fit_kw)
            except (CcdsError, ValueError, np.linalg.LinAlgError):
                failed += 1
                continue
            fit_vals.append(np.inf if r is None else r)
    out = {"resamples": resamples, "empirical_interval": list(_interval(np.array(emp_vals)))
           if emp_vals else None}
    if fitted:
        out["fitted_interval"] = list(_interval(np.array(fit_vals))) if fit_vals else None
        out["failed"] = failed
    return out


def jaccard(a: Sequence[str], b: Sequence[str]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / max(len(sa | sb), 1)


def overlap(selections: dict[str, Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """Pairwise Jaccard similarity of the methods' selected ids (one fraction)."""
    names = list(selections)
    m = np.array([[jaccard(selections[a], selections[b]) for b in names] for a in names])
    return names, m
