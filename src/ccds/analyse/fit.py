"""Performance against compute (spec §4): P(C) = (P̄ − P0)·(1 − exp(−λ·C/C_full)) + P0.

C_full is the cost of training on the whole pool, so λ reads as "how much of the headroom
one full-training's worth of compute buys". Fits are least squares: bounded (P0 ≤ P̄, λ ≥ 0,
and P0 ≥ 0 when the metric is, as accuracy is; P = −NLL is negative) with SciPy's
trust-region solver, or Levenberg–Marquardt when unbounded. P̄ can be fitted per method,
fixed (CCDS fixes it per model size), or shared by every method (one joint fit, as the paper
draws its curves); P0 can be shared, or fixed to the measured zero-shot performance, which is
what P0 means and what a sweep records. Every parameter gets a bootstrap interval (runs
resampled within each method), and every fit its R² and residuals.

λ is identified only from below once a method's curve is flat over its runs: when
exp(−λ·C_min/C_full) < 1e-3 at its cheapest run, any larger λ fits as well, and the solver
stops wherever the gradient vanishes, which moves between machines with the BLAS's last bits.
So λ is bounded (λ·C_min/C_full ≤ 30, where the curve is flat to 1e-13), a fit or resample
past the flat point is *saturated*: counted, and ranked as +∞ in the bootstrap, and an
interval whose upper end falls among those has none ("not identified"). Resamples whose
solver fails to converge are counted and left out. Each method resamples from its own
seeded stream, so its interval does not depend on the platform or on the other methods.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import least_squares

from ..errors import CcdsError

FLAT = float(np.log(1e3))  # λ·x_min past this: within 0.1% of the ceiling at every run
LAM_CAP = 30.0  # λ·x_min bound for the solver: flat to exp(−30) ≈ 1e-13


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
    # (low, high) at 95%; high is None where it is not identified (saturated resamples)
    intervals: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    shared: list[str] = field(default_factory=list)
    lam_flat: float | None = None  # λ past which the curve is flat over this method's runs
    saturated: bool = False  # the fit itself is flat: λ is only known to exceed lam_flat
    # resamples: asked, converged, failed (not converged: left out), saturated (ranked as +∞)
    bootstrap: dict[str, int] = field(default_factory=dict)

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
    cap = {m: LAM_CAP / x_min(pts[m][0], c_full) if x_min(pts[m][0], c_full) > 0 else np.inf
           for m in methods}

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
        ub = np.array([top if name == "p0" else cap[who] if name == "lam" else np.inf
                       for name, who in layout])
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
    return sol.x, unpack(sol.x), resid(sol.x), p, owner, sol.status > 0


def x_min(c: np.ndarray, c_full: float) -> float:
    """The cheapest costing run's C / C_full (0 when none costs anything)."""
    pos = np.asarray(c, dtype=float)[np.asarray(c) > 0]
    return float(pos.min()) / c_full if len(pos) else 0.0


def _stream(seed: int, method: str) -> np.random.Generator:
    """The resampling stream of one method: seeded by the method's name, not its position."""
    return np.random.default_rng([seed, int(hashlib.sha256(method.encode()).hexdigest()[:8], 16)])


def _interval(vals: np.ndarray) -> tuple[float, float | None]:
    """2.5th and 97.5th percentiles, linear between ranks, of values where +∞ marks a
    saturated resample; an end that falls among those is None (not identified)."""
    finite = vals[np.isfinite(vals)]
    top = float(finite.max()) if len(finite) else -np.inf
    lo, hi = np.percentile(np.where(np.isfinite(vals), vals, 1e300), [2.5, 97.5])
    return (float(lo) if lo <= top else None), (float(hi) if hi <= top else None)


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
    x, v, res, p, owner, _ = _solve(pts, c_full, pbar, p0, layout, bounded)
    rngs = {m: _stream(seed, m) for m in methods}
    boots, failed = [], 0
    for _ in range(bootstrap):
        sample = {}
        for m in methods:
            c_m, p_m = pts[m]
            idx = rngs[m].integers(0, len(c_m), len(c_m))
            sample[m] = (c_m[idx], p_m[idx])
        try:
            _, bv, _, _, _, ok = _solve(sample, c_full, pbar, p0, layout, bounded, x0=x.copy())
        except (ValueError, np.linalg.LinAlgError):
            ok = False
        if not ok:
            failed += 1
            continue
        for m in methods:  # a resample flat over its runs knows λ only from below
            if bv["lam"][m] * x_min(sample[m][0], c_full) >= FLAT:
                bv["lam"][m] = np.inf
        boots.append(bv)
    fits = {}
    for i, m in enumerate(methods):
        r = res[owner == i]
        pm = p[owner == i]
        ss_tot = float(((pm - pm.mean()) ** 2).sum())
        r2 = 1 - float((r ** 2).sum()) / ss_tot if ss_tot > 0 and len(r) > 1 else float("nan")
        xm = x_min(pts[m][0], c_full)
        flat = FLAT / xm if xm > 0 else None
        intervals = {}
        for name in ("pbar", "p0", "lam"):
            vals = np.array([b[name][m] for b in boots])
            if len(vals):
                lo, hi = _interval(vals)
                intervals[name] = (flat if lo is None else lo, hi)
        counts = {"resamples": bootstrap, "converged": len(boots), "failed": failed,
                  "saturated": sum(1 for b in boots if np.isinf(b["lam"][m]))}
        shared = ([] if share == "none" else ["pbar"] + (["p0"] if share == "pbar_p0" else []))
        shared += ["pbar (fixed)"] if pbar is not None else []
        shared += ["p0 (fixed: zero-shot)"] if p0 is not None else []
        lam = float(v["lam"][m])
        fits[m] = Fit(m, float(v["pbar"][m]), float(v["p0"][m]), lam, c_full,
                      int((owner == i).sum()), r2, r.tolist(), intervals, shared, flat,
                      flat is not None and lam >= flat, counts if bootstrap else {})
    return fits


def lam_text(fit: dict, fmt: str = ".3g") -> tuple[str, str]:
    """λ and its 95% interval as a report prints them: '> X' where the data bound λ only from
    below (X: where the curve goes flat over the method's runs)."""
    lam = f"> {fit['lam_flat']:{fmt}}" if fit.get("saturated") else f"{fit['lam']:{fmt}}"
    iv = (fit.get("intervals") or {}).get("lam")
    if not iv:
        return lam, "—"
    if iv[1] is None:
        return lam, f"> {iv[0]:{fmt}} (upper end not identified)"
    return lam, f"{iv[0]:{fmt}}–{iv[1]:{fmt}}"


def bootstrap_note(fits: dict[str, dict]) -> str:
    """One sentence on the resamples a report's λ intervals leave out or rank as +∞."""
    flat = [f"{m} {f['bootstrap']['saturated']}" for m, f in fits.items()
            if f.get("bootstrap", {}).get("saturated")]
    failed = max((f.get("bootstrap", {}).get("failed", 0) for f in fits.values()), default=0)
    parts = []
    if flat:
        parts.append("Bootstrap resamples already flat at their cheapest run (λ known only "
                     "from below, ranked above every finite λ): " + ", ".join(flat) + " of "
                     f"{next(iter(fits.values()))['bootstrap']['resamples']}.")
    if failed:
        parts.append(f"{failed} resample(s) did not converge and are left out.")
    return " ".join(parts)
