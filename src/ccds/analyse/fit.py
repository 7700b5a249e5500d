"""Performance against compute (spec §4): P(C) = (P̄ − P0)·(1 − exp(−λ·C/C_full)) + P0.

C_full is the cost of training on the whole pool, so λ reads as "how much of the headroom
one full-training's worth of compute buys". Fits are least squares: bounded (P0 ≤ P̄, λ ≥ 0,
and P0 ≥ 0 when the metric is, as accuracy is; P = −NLL is negative) with SciPy's
trust-region solver, or Levenberg–Marquardt when unbounded. P̄ can be fitted per method,
fixed (CCDS fixes it per model size), or shared by every method (one joint fit, as the paper
draws its curves); P0 can be shared, or fixed to the measured zero-shot performance, which is
what P0 means and what a sweep records. Every parameter gets a bootstrap interval (runs
resampled within each method), and every fit its R² and residuals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import least_squares

from ..errors import CcdsError


def curve(c: np.ndarray, pbar: float, p0: float, lam: float, c_full: float) -> np.ndarray:
    return (pbar - p0) * (1 - np.exp(-lam * np.asarray(c, dtype=float) / c_full)) + p0


@dataclass
class Fit:
    method: str
    pbar: float
    p0: float
    lam: float
    c_full: float
    n: int
    r2: float
    residuals: list[float]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    shared: list[str] = field(default_factory=list)

    def __call__(self, c) -> np.ndarray:
        return curve(c, self.pbar, self.p0, self.lam, self.c_full)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Fit:
        d = dict(d)
        d["intervals"] = {k: tuple(v) for k, v in d.get("intervals", {}).items()}
        return cls(**d)


def fit_methods(points: dict[str, tuple[np.ndarray, np.ndarray]], c_full: float, *,
                pbar: float | None = None, p0: float | None = None, share: str = "none",
                bounded: bool = True, bootstrap: int = 200, seed: int = 0) -> dict[str, Fit]:
    """Fit every method's (C, P) points. share: "none" (P̄ per method unless fixed),
    "pbar" (one P̄ for all), "pbar_p0" (one P̄ and one P0; only λ per method).
    `pbar`, `p0`: fix that parameter (P0 = the zero-shot performance, when measured)."""
    if share not in ("none", "pbar", "pbar_p0"):
        raise CcdsError(f"unknown sharing '{share}'", None, "use none, pbar or pbar_p0")
    pts = {m: (np.asarray(c, dtype=float), np.asarray(p, dtype=float))
           for m, (c, p) in points.items()}
    if share == "none":
        return {m: _fit_group({m: xy}, c_full, pbar, p0, "none", bounded, bootstrap, seed)[m]
                for m, xy in pts.items()}
    return _fit_group(pts, c_full, pbar, p0, share, bounded, bootstrap, seed)


def _layout(methods: list[str], pbar_fixed: bool, p0_fixed: bool, share: str
            ) -> list[tuple[str, str]]:
    """The parameter vector as (name, method or '*' when shared)."""
    out = []
    if not pbar_fixed:
        out += [("pbar", "*")] if share != "none" else [("pbar", methods[0])]
    if p0_fixed:
        pass
    elif share == "pbar_p0":
        out.append(("p0", "*"))
    else:
        out += [("p0", m) for m in methods]
    out += [("lam", m) for m in methods]
    return out


def _solve(pts, c_full, pbar, p0, layout, bounded, x0=None):
    methods = list(pts)
    c = np.concatenate([pts[m][0] for m in methods])
    p = np.concatenate([pts[m][1] for m in methods])
    owner = np.concatenate([[i] * len(pts[m][0]) for i, m in enumerate(methods)])

    def unpack(x):
        v = {"pbar": {}, "p0": {}, "lam": {}}
        for (name, who), val in zip(layout, x, strict=True):
            for m in (methods if who == "*" else [who]):
                v[name][m] = val
        if pbar is not None:
            v["pbar"] = dict.fromkeys(methods, pbar)
        if p0 is not None:
            v["p0"] = dict.fromkeys(methods, p0)
        return v

    def resid(x):
        v = unpack(x)
        pred = np.empty_like(p)
        for i, m in enumerate(methods):
            s = owner == i
            pred[s] = curve(c[s], v["pbar"][m], v["p0"][m], v["lam"][m], c_full)
        return pred - p

    if x0 is None:
        x0 = _start(c / c_full, p, p0, layout)
    if bounded:
        # P0 ≥ 0 only for a metric that cannot be negative; P0 ≤ P̄ is kept by bounding P0
        # below the fixed P̄ (if any) and P̄ above the data's minimum and the fixed P0
        p0_lo = 0.0 if p.min() >= 0 and (p0 is None or p0 >= 0) else -np.inf
        lb = np.array([{"lam": 0.0, "p0": p0_lo}.get(name, -np.inf) for name, _ in layout])
        top = pbar if pbar is not None else np.inf
        ub = np.array([top if name == "p0" else np.inf for name, _ in layout])
        floor = float(p.min()) if p0 is None else max(float(p.min()), p0)
        lb = np.array([floor if name == "pbar" else b
                       for (name, _), b in zip(layout, lb, strict=True)])
        with np.errstate(invalid="ignore"):
            lo_in = np.where(np.isfinite(lb), lb + 1e-6 * (np.abs(lb) + 1), -np.inf)
            hi_in = np.where(np.isfinite(ub), ub - 1e-6 * (np.abs(ub) + 1), np.inf)
        x0 = np.minimum(np.maximum(x0, lo_in), hi_in)
        sol = least_squares(resid, x0, bounds=(lb, ub), method="trf", x_scale="jac")
    else:
        sol = least_squares(resid, x0, method="lm", x_scale="jac")
    return sol.x, unpack(sol.x), resid(sol.x), p, owner


def _start(x: np.ndarray, p: np.ndarray, p0: float | None, layout) -> np.ndarray:
    """A start the solver converges from: P0 at (or below) the data, P̄ above it, and λ from
    the mean slope of the data over compute (the curve's initial slope is (P̄ − P0)·λ)."""
    hi, lo = float(p.max()), float(p.min())
    spread = hi - lo + 1e-9
    base = p0 if p0 is not None else lo - 0.5 * spread
    pbar = max(hi, base) + spread
    slope = np.polyfit(x, p, 1)[0] if len(x) > 1 and np.ptp(x) > 0 else 0.0
    lam = float(np.clip(slope / (pbar - base), 1e-3, 1e3)) if slope > 0 else 1.0
    start = {"pbar": pbar, "p0": base, "lam": lam}
    return np.array([start[name] for name, _ in layout])


def _fit_group(pts, c_full, pbar, p0, share, bounded, bootstrap, seed) -> dict[str, Fit]:
    methods = list(pts)
    layout = _layout(methods, pbar is not None, p0 is not None, share)
    for m in methods:
        free = sum(1 for _, who in layout if who in (m, "*")) if share == "none" else 1
        if len(pts[m][0]) < free:
            raise CcdsError(f"method '{m}' has {len(pts[m][0])} run(s); fitting its {free} free "
                            f"parameter(s) needs at least {free}",
                            None, "add fractions, fix P̄ (--pbar), or share it (--share pbar)")
    if sum(len(c) for c, _ in pts.values()) < len(layout):
        raise CcdsError(f"{sum(len(c) for c, _ in pts.values())} runs cannot fit "
                        f"{len(layout)} parameters", None, "add runs or share parameters")
    x, v, res, p, owner = _solve(pts, c_full, pbar, p0, layout, bounded)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(bootstrap):
        sample = {}
        for m in methods:
            c_m, p_m = pts[m]
            idx = rng.integers(0, len(c_m), len(c_m))
            sample[m] = (c_m[idx], p_m[idx])
        try:
            boots.append(_solve(sample, c_full, pbar, p0, layout, bounded, x0=x.copy())[1])
        except (ValueError, np.linalg.LinAlgError):
            continue
    fits = {}
    for i, m in enumerate(methods):
        r = res[owner == i]
        pm = p[owner == i]
        ss_tot = float(((pm - pm.mean()) ** 2).sum())
        r2 = 1 - float((r ** 2).sum()) / ss_tot if ss_tot > 0 and len(r) > 1 else float("nan")
        intervals = {}
        for name in ("pbar", "p0", "lam"):
            vals = np.array([b[name][m] for b in boots])
            if len(vals):
                intervals[name] = (float(np.percentile(vals, 2.5)),
                                   float(np.percentile(vals, 97.5)))
        shared = ([] if share == "none" else ["pbar"] + (["p0"] if share == "pbar_p0" else []))
        shared += ["pbar (fixed)"] if pbar is not None else []
        shared += ["p0 (fixed: zero-shot)"] if p0 is not None else []
        fits[m] = Fit(m, float(v["pbar"][m]), float(v["p0"][m]), float(v["lam"][m]), c_full,
                      int((owner == i).sum()), r2, r.tolist(), intervals, shared)
    return fits
