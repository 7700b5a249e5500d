"""Fits, frontier, break-even and overlap checked against known answers and the paper."""

import csv

import numpy as np
import pytest

from ccds.analyse.fit import bootstrap_note, curve, fit_methods, lam_text
from ccds.analyse.frontier import (
    Point,
    break_even,
    break_even_interval,
    empirical_break_even,
    empirical_frontier,
    fitted_frontier,
    frontier_at,
    frontier_hull,
    group,
    joins_frontier,
    noise_tolerance,
    overlap,
)
from ccds.analyse.render import unsaturated
from ccds.errors import CcdsError


def test_fit_recovers_known_parameters_from_noisy_points():
    rng = np.random.default_rng(0)
    c_full = 1e18
    true = {"a": (60.0, 40.0, 2.0), "b": (60.0, 40.0, 6.0)}
    pts = {}
    for m, (pbar, p0, lam) in true.items():
        c = np.geomspace(0.02, 2, 12) * c_full
        pts[m] = (c, curve(c, pbar, p0, lam, c_full) + rng.normal(0, 0.2, len(c)))
    for share in ("none", "pbar", "pbar_p0"):
        fits = fit_methods(pts, c_full, share=share, bootstrap=100)
        for m, (pbar, p0, lam) in true.items():
            f = fits[m]
            assert f.lam == pytest.approx(lam, rel=0.15), (share, m)
            assert f.p0 == pytest.approx(p0, abs=1.0) and f.pbar == pytest.approx(pbar, abs=1.0)
            assert f.r2 > 0.98
            lo, hi = f.intervals["lam"]
            assert lo <= lam <= hi  # the bootstrap interval covers the truth
    fixed = fit_methods(pts, c_full, pbar=60.0, bootstrap=0)
    assert fixed["a"].pbar == 60.0 and "pbar (fixed)" in fixed["a"].shared
    unbounded = fit_methods(pts, c_full, bounded=False, bootstrap=0)
    assert unbounded["b"].lam == pytest.approx(6.0, rel=0.15)


def test_fit_of_a_negative_metric_with_measured_zero_shot():
    """P = −NLL is negative: P0 must not be bounded at 0, and fixing P0 to the measured
    zero-shot value pins the curve where a few small fractions cannot."""
    rng = np.random.default_rng(1)
    c_full = 3e13
    true = {"random": 2.0, "bm25": 8.0, "less": 4.0}
    pbar, p0 = -0.80, -1.15
    pts = {}
    for m, lam in true.items():
        c = np.array([0.025, 0.05, 0.1, 0.2, 0.5]) * c_full
        pts[m] = (c, curve(c, pbar, p0, lam, c_full) + rng.normal(0, 0.005, len(c)))
    for kw in ({"share": "pbar"}, {"share": "pbar", "p0": p0}, {"share": "none", "p0": p0}):
        fits = fit_methods(pts, c_full, bootstrap=50, **kw)
        for m, lam in true.items():
            f = fits[m]
            assert f.p0 == pytest.approx(p0, abs=0.05), (kw, m)
            assert f.lam == pytest.approx(lam, rel=0.3), (kw, m)
            assert f.r2 > 0.95, (kw, m)
            lo, hi = f.intervals["lam"]
            assert lo < hi  # a real spread, not a solver stuck on a bound
    fixed = fit_methods(pts, c_full, share="pbar", p0=p0, bootstrap=0)
    assert all(f.p0 == p0 and "p0 (fixed: zero-shot)" in f.shared for f in fixed.values())
    # points on a straight line: the ceiling runs away and the report says so
    line = {"lin": (np.array([1.0, 2, 3, 4]) * 1e12, p0 + 0.02 * np.arange(1, 5))}
    f = fit_methods(line, c_full, p0=p0, bootstrap=0)["lin"]
    assert unsaturated(f.to_dict(), float(line["lin"][1].max()))
    assert not any(unsaturated(f.to_dict(), float(pts[m][1].max())) for m, f in fixed.items())


def test_too_few_points_is_a_clear_error():
    with pytest.raises(CcdsError, match="needs at least 3"):
        fit_methods({"a": (np.array([1.0, 2.0]), np.array([1.0, 2.0]))}, 1.0)
    # sharing P̄ and P0 leaves one parameter per method
    fits = fit_methods({"a": (np.array([1.0, 2.0, 4.0]), np.array([1.0, 1.5, 1.8])),
                        "b": (np.array([1.0, 3.0]), np.array([1.2, 1.7]))}, 4.0,
                       share="pbar_p0", bootstrap=0)
    assert set(fits) == {"a", "b"}


def test_empirical_frontier_of_a_hand_made_set_is_exact():
    pts = [Point("r", 0.1, 0, 1, 10), Point("r", 0.5, 0, 5, 14), Point("x", 0.1, 3, 1, 12),
           Point("x", 0.5, 3, 5, 13), Point("y", 0.1, 0.5, 1, 11), Point("r", 1.0, 0, 10, 15),
           Point("y", 0.2, 0.5, 2, 11)]
    fr = empirical_frontier(pts)
    assert [(p.method, p.fraction) for p in fr] == [("r", 0.1), ("y", 0.1), ("x", 0.1),
                                                     ("r", 0.5), ("r", 1.0)]
    assert frontier_at(pts, 4.5).method == "x" and frontier_at(pts, 0.5) is None
    # ignoring selection cost, x's 0.1 run comes first (the fixed-training-budget view)
    assert empirical_frontier(pts, training_only=True)[0].method == "x"


def test_frontier_membership_needs_more_than_the_noise():
    """Without seeds τ is 1% of the P range: a run 0.01 better than every cheaper run (range
    10, τ = 0.1) stays off the staircase, one 0.2 better joins. With seeds τ is their pooled
    standard deviation."""
    pts = [Point("r", 0.1, 0, 1, 10), Point("x", 0.1, 1, 1, 10.01), Point("r", 0.5, 0, 5, 12),
           Point("y", 0.5, 1, 5, 12.2), Point("r", 1.0, 0, 10, 20)]
    assert noise_tolerance(pts) == (pytest.approx(0.1), "default")
    assert [(p.method, p.fraction) for p in empirical_frontier(pts)] == [
        ("r", 0.1), ("r", 0.5), ("y", 0.5), ("r", 1.0)]
    assert ("x", 0.1) in [(p.method, p.fraction) for p in empirical_frontier(pts, tol=0.0)]
    seeds = pts + [Point("r", 0.1, 0, 1, 10.4), Point("r", 0.5, 0, 5, 11.6)]
    tol, how = noise_tolerance(seeds)  # two cells, each of variance 0.08: pooled sd 0.283
    assert how == "seeds" and tol == pytest.approx(np.sqrt(0.08))
    assert ("y", 0.5) not in [(p.method, p.fraction) for p in empirical_frontier(seeds)]


def test_upper_hull_in_log_compute():
    """The paper's frontier: the concave envelope in (log C, P), up to the best run. The run at
    C = 10 lies below the chord from C = 1 to C = 100 (P 10 → 14: 12 at C = 10), so it is
    off the hull while on the staircase; the run after the best one is off both."""
    pts = [Point("a", 0.1, 0, 1, 10), Point("a", 0.2, 0, 10, 11.9),
           Point("b", 0.1, 0, 100, 14), Point("b", 0.2, 0, 1000, 13), Point("c", 0.1, 0, 2, 9)]
    assert [p.total for p in frontier_hull(pts)] == [1, 100]
    assert [p.total for p in empirical_frontier(pts, tol=0.0)] == [1, 10, 100]
    pts.append(Point("c", 0.2, 0, 10, 12.5))  # above the chord: on the hull now
    assert [p.total for p in frontier_hull(pts)] == [1, 10, 100]


def test_empirical_break_even_is_exact_and_its_interval_is_seeded_by_method():
    """The expensive run (selection 0.6, training 0.2, P 13) beats every cheap run cheaper
    than 0.5 by more than τ, and is beaten at 0.5: it joins once 0.6/r + 0.2 < 0.5, r > 2."""
    cheap = [Point("cheap", x, 0.0, x, p) for x, p in ((0.05, 10), (0.2, 11), (0.5, 13.5),
                                                       (1.0, 15))]
    pts = cheap + [Point("exp", 0.2, 0.6, 0.2, 13.0)]
    assert empirical_break_even(pts, "exp") == pytest.approx(2.0)
    assert empirical_break_even(pts, "exp", max_factor=1.5) is None
    assert empirical_break_even(cheap + [Point("exp", 0.2, 0.6, 0.2, 10.5)], "exp") is None
    iv = break_even_interval(pts, "exp", 1.0, resamples=12, share="pbar")
    again = break_even_interval(pts[::-1], "exp", 1.0, resamples=12, share="pbar")
    assert iv == again and iv["resamples"] == 12 and iv["failed"] == 0
    lo, hi = iv["empirical_interval"]
    assert lo <= 2.0 and (hi is None or hi >= 2.0)


def test_break_even_ratio_of_a_closed_form_case():
    """Shared P0 and fixed P̄ leave one rate per method. The cheap method's runs lie on rate
    a. The expensive one has a single run: selection s, training t, performance that of rate b
    after t. Moved to s/r + t its fitted rate is b·t/(s/r + t), and curves with equal P0 and
    P̄ are ordered by rate, so it joins exactly when that exceeds a: r* = s·a / (t·(b − a))."""
    c_full, pbar, p0, a, b, s, t = 1.0, 50.0, 40.0, 2.0, 5.0, 0.6, 0.2
    cheap = [Point("cheap", x, 0.0, x, float(curve(x, pbar, p0, a, c_full)))
             for x in (0.05, 0.2, 0.5, 1.0)]
    pts = cheap + [Point("exp", t, s, t, float(curve(t, pbar, p0, b, c_full)))]
    kw = {"share": "pbar_p0", "pbar": pbar, "tol": 0.0}
    assert not joins_frontier(pts, "exp", c_full, **kw)
    assert break_even(pts, "exp", c_full, **kw) == pytest.approx(s * a / (t * (b - a)),
                                                                  rel=1e-3)


def test_overlap_is_jaccard():
    names, m = overlap({"a": ["1", "2", "3"], "b": ["2", "3", "4"], "c": ["9"]})
    assert names == ["a", "b", "c"]
    assert m[0, 1] == pytest.approx(2 / 4) and m[0, 2] == 0 and m[1, 1] == 1


@pytest.mark.data
def test_paper_points_reproduce_the_papers_conclusions(shared_data):
    full = {"llama-2-7b": 4.593e18, "llama-2-13b": 8.638e18, "llama-2-70b": 4.926e19}
    text = (shared_data / "ccds_paper" / "mmlu_points.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    for model, c_full in full.items():
        pts = [Point(r["method"], float(r["fraction"]),
                     max(float(r["total_flops"]) - float(r["fraction"]) * c_full, 0.0),
                     float(r["fraction"]) * c_full, float(r["accuracy"]))
               for r in rows if r["model"] == model and r["view"] == "compute_constrained"]
        on = {p.method for p in empirical_frontier(pts) if p.fraction < 1}
        fits = fit_methods(group(pts), c_full, share="pbar", bootstrap=0)
        _, best = fitted_frontier(fits, np.geomspace(0.03, 1, 50) * c_full)
        if model == "llama-2-70b":  # PPL and LESS join the frontier at 70B
            assert {"ppl", "less"} <= on
            assert joins_frontier(pts, "ppl", c_full, share="pbar")
            assert joins_frontier(pts, "less", c_full, share="pbar")
        else:  # at 7B and 13B the cheap methods make the (fitted) frontier
            if model == "llama-2-7b":
                assert on <= {"bm25", "embed"}
            assert not joins_frontier(pts, "less", c_full, share="pbar")
            assert not joins_frontier(pts, "ppl", c_full, share="pbar")
            assert set(best) <= {"bm25", "embed", "random"}


def test_unidentified_lambda_is_reported_as_a_lower_bound():
    """A method whose runs all sit on its ceiling bounds λ only from below: the fit says so,
    the saturated resamples are counted (not averaged into a huge number that moves between
    machines), and the interval has no upper end."""
    c_full = 1e14
    c = np.array([0.1, 0.1, 0.25, 0.5, 0.5, 1.0]) * c_full
    noise = np.array([0.004, -0.003, 0.002, -0.004, 0.003, -0.002])
    rising = curve(c, -1.0, -2.0, 3.0, c_full) + noise
    pts = {"flat": (c, -1.0 + noise), "rising": (c, rising)}
    fits = fit_methods(pts, c_full, share="pbar", p0=-2.0, bootstrap=200)
    flat, ok = fits["flat"], fits["rising"]
    assert flat.saturated and flat.lam >= flat.lam_flat == pytest.approx(np.log(1e3) / 0.1)
    assert flat.bootstrap["saturated"] > 5 and flat.bootstrap["converged"] == 200
    assert flat.intervals["lam"][1] is None and flat.intervals["lam"][0] > 0
    assert lam_text(flat.to_dict()) == (f"> {flat.lam_flat:.3g}",
                                       f"> {flat.intervals['lam'][0]:.3g} (upper end not "
                                       "identified)")
    assert "flat" in bootstrap_note({m: f.to_dict() for m, f in fits.items()})
    assert not ok.saturated and ok.bootstrap["saturated"] == 0
    lo, hi = ok.intervals["lam"]
    assert lo < 3.0 < hi
    # the same data with the last bits moved (another CPU) gives the same answer
    moved = {m: (cc, p * (1 + 1e-10)) for m, (cc, p) in pts.items()}
    again = fit_methods(moved, c_full, share="pbar", p0=-2.0, bootstrap=200)
    assert again["flat"].bootstrap == flat.bootstrap
    assert again["flat"].intervals["lam"][0] == pytest.approx(flat.intervals["lam"][0], rel=1e-6)


def test_resamples_that_do_not_converge_are_counted_and_left_out(monkeypatch):
    from ccds.analyse import fit as fit_mod

    calls = {"n": 0}
    real = fit_mod.least_squares

    def every_third_fails(*a, **kw):
        sol = real(*a, **kw)
        calls["n"] += 1
        if calls["n"] > 1 and calls["n"] % 3 == 0:
            sol.status = 0  # "maximum number of function evaluations exceeded"
        return sol

    monkeypatch.setattr(fit_mod, "least_squares", every_third_fails)
    c = np.geomspace(0.02, 1, 8) * 1e14
    f = fit_methods({"a": (c, curve(c, 2.0, 1.0, 4.0, 1e14))}, 1e14, bootstrap=30)["a"]
    assert f.bootstrap == {"resamples": 30, "converged": 20, "failed": 10, "saturated": 0}
    assert "10 resample(s) did not converge" in bootstrap_note({"a": f.to_dict()})
