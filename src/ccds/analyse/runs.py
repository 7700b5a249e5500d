"""`ccds analyze RUNS`: from a sweep's run store to fits, frontiers, break-even ratios,
amortisation and overlap (fits.json, runs.csv), then the plots and pages `render` draws from
them (spec §4).

Per (target, training model): each run is a point (C, P) with C = selection + training FLOPs
(ccds or paper convention) and P = −NLL or the target metric; fits use every seed's run.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..errors import CcdsError
from ..io import atomic_path, write_json, write_text
from ..store import Store
from .fit import fit_methods
from .frontier import (
    Point,
    break_even,
    break_even_interval,
    empirical_break_even,
    empirical_frontier,
    fitted_frontier,
    frontier_hull,
    group,
    noise_tolerance,
    overlap,
)
from .render import html, markdown, plot_group

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")  # Trainer runs named by a manifest (stacks.py)
BREAK_EVEN_RESAMPLES = 20  # the break-even interval's resamples (at most `bootstrap`)


def load_points(runs: list[dict], convention: str) -> dict[tuple[str, str], list[Point]]:
    sel, tr = (("selection_flops", "training_flops") if convention == "ccds" else
               ("selection_paper_flops", "training_paper_flops"))
    out: dict[tuple[str, str], list[Point]] = {}
    for r in runs:
        out.setdefault((r["target"], r["model"]), []).append(
            Point(r["method"], r["fraction"], r[sel], r[tr], r["perf"],
                  f"{r['method']}/{r['fraction']}/{r['seed']}"))
    return out


def analyze(runs_dir: Path | str, out: Path | str, *, share: str = "pbar",
            convention: str = "ccds", bootstrap: int = 200, p0: str = "measured",
            where: dict[str, str] | None = None) -> dict:
    """`runs_dir`: a sweep's output folder (its run store), a CSV/JSONL of points from
    anywhere (`points.read_points`), or Trainer runs with lm-eval results named by a manifest
    (`stacks.points_from_runs`); `where` filters the last two. p0: "measured" fixes each
    group's P0 to the recorded zero-shot performance (fitted when there is none), "fit"
    always fits it."""
    if p0 not in ("measured", "fit"):
        raise CcdsError(f"unknown P0 mode '{p0}'", None, "use measured or fit")
    if share not in ("none", "pbar", "pbar_p0"):  # else every group's fit fails alike
        raise CcdsError(f"unknown sharing '{share}'", None, "use none, pbar or pbar_p0")
    runs_dir, out = Path(runs_dir), Path(out)
    db = runs_dir / "runs.sqlite" if runs_dir.is_dir() else runs_dir
    report: dict = {"convention": convention, "share": share, "groups": []}
    if runs_dir.suffix.lower() in (".csv", ".jsonl", ".ndjson"):
        from .points import read_points

        runs, meta = read_points(runs_dir, where)
    elif runs_dir.suffix.lower() in MANIFEST_SUFFIXES or (runs_dir.is_dir()
                                                          and not db.exists()):
        from .stacks import cross_check, points_from_runs

        runs, meta = points_from_runs(runs_dir, where)
        report["trainer_total_flos"] = cross_check(runs)
    else:
        if not db.exists():
            raise CcdsError("no run store here", str(db), "pass the sweep's output folder, a "
                            ".csv/.jsonl of points, or a manifest of Trainer runs")
        store = Store(db)
        runs, meta = list(store.runs()), store.meta()
        if not runs:
            raise CcdsError("the run store has no finished runs", str(db),
                            "run the sweep first")
    write_runs_csv(runs, out / "runs.csv")
    for (target, model), pts in load_points(runs, convention).items():
        c_full = meta[f"c_full/{model}"]["analytic" if convention == "ccds" else "paper"]
        zero = meta.get(f"zero_shot/{target}/{model}") if p0 == "measured" else None
        g = analyze_group(target, model, pts, c_full, share, bootstrap,
                          meta[f"c_full/{model}"], zero["perf"] if zero else None)
        g["overlap"] = overlaps([r for r in runs if r["target"] == target
                                 and r["model"] == model and r.get("ids")])
        g["plots"] = plot_group(g, pts, out, c_full)
        report["groups"].append(g)
    write_json(out / "fits.json", report)
    write_text(out / "report.md", markdown(report))
    write_text(out / "report.html", html(report, out))
    return report


def analyze_group(target, model, pts, c_full, share, bootstrap, full_meta,
                  zero_shot: float | None = None, break_even_resamples: int | None = None
                  ) -> dict:
    """One (target, model): fits, the frontiers (staircase beyond noise and upper hull), and
    each costly method's break-even ratio by the fitted curves and by the empirical frontier,
    with bootstrap intervals over `break_even_resamples` resamples (default
    min(bootstrap, BREAK_EVEN_RESAMPLES); 0: none)."""
    g: dict = {"target": target, "model": model, "c_full": c_full, "runs": len(pts),
               "zero_shot": zero_shot, "fits": {}, "fit_error": None, "methods": {}}
    methods = sorted({p.method for p in pts})
    n_params = full_meta["params"]["non_embedding"]
    g["c_full_k"] = c_full / (n_params * full_meta["pool_tokens"])  # C_full / (N · T_pool)
    for m in methods:
        mine = [p for p in pts if p.method == m]
        g["methods"][m] = {"best": max(p.perf for p in mine),
                           "selection_share": float(np.mean([p.selection for p in mine])) / c_full,
                           "k": float(np.mean([p.selection for p in mine]))
                           / (n_params * full_meta["pool_tokens"])}
    try:
        fits = fit_methods(group(pts), c_full, share=share, p0=zero_shot,
                           bootstrap=bootstrap)
        g["fits"] = {m: f.to_dict() for m, f in fits.items()}
    except CcdsError as e:
        g["fit_error"] = str(e)
        fits = {}
    tol, how = noise_tolerance(pts)
    g["frontier_tolerance"] = {"value": tol, "from": how}
    g["frontier"] = [vars(p) for p in empirical_frontier(pts, tol=tol)]
    g["frontier_training_only"] = [vars(p) for p in empirical_frontier(pts, training_only=True,
                                                                       tol=tol)]
    g["frontier_hull"] = [vars(p) for p in frontier_hull(pts)]
    n_be = (min(bootstrap, BREAK_EVEN_RESAMPLES) if break_even_resamples is None
            else break_even_resamples)
    costly = [m for m in methods if g["methods"][m]["selection_share"] > 0.01]
    if fits:
        grid = np.geomspace(min(p.total for p in pts), max(p.total for p in pts), 60)
        _, who = fitted_frontier(fits, grid)
        g["fitted_frontier_methods"] = sorted(set(who))
        g["break_even"] = {}
    g["break_even_detail"] = {}
    for m in costly:
        d: dict = {"empirical": empirical_break_even(pts, m, tol=tol)}
        if fits:
            try:
                g["break_even"][m] = d["fitted"] = break_even(pts, m, c_full, share=share,
                                                              p0=zero_shot)
            except CcdsError as e:
                g["break_even"][m] = d["fitted"] = f"not computable: {e}"
        if n_be:
            d.update(break_even_interval(pts, m, c_full, resamples=n_be, tol=tol,
                                         fitted=bool(fits) and not isinstance(d.get("fitted"),
                                                                              str),
                                         share=share, p0=zero_shot))
        g["break_even_detail"][m] = d
    return g


def overlaps(runs: list[dict]) -> dict:
    out = {}
    for f in sorted({r["fraction"] for r in runs}):
        sel = {r["method"]: r["ids"] for r in runs if r["fraction"] == f and r["seed"] ==
               min(x["seed"] for x in runs if x["method"] == r["method"])}
        names, m = overlap(sel)
        out[f"{f:g}"] = {"methods": names, "jaccard": m.round(4).tolist()}
    return out


STACK_COLS = ["perf_stderr", "training", "attention_flops", "trainer_total_flos",
              "total_flos_ratio", "trainer_dir"]  # runs read from Trainer folders only


def write_runs_csv(runs: list[dict], path: Path) -> None:
    cols = ["target", "model", "method", "fraction", "seed", "n", "tokens", "selection_flops",
            "training_flops", "selection_paper_flops", "training_paper_flops", "perf", "metric"]
    more = STACK_COLS if any("trainer_total_flos" in r for r in runs) else []
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols + ["nll", "accuracy", "exact_match", "selection_s", "training_s",
                           "evaluation_s", "training_reused"] + more)
        for r in runs:
            ev = r.get("eval", {})
            w.writerow([r.get(c) for c in cols] + [ev.get("nll"), ev.get("accuracy"),
                                                   ev.get("exact_match")] + _walls(r)
                       + [r.get(c) for c in more])


def _walls(run: dict) -> list:
    """Wall seconds per stage kind as recorded, and whether the training was a saved adapter
    (a sweep copies the stage of cached scores and adapters into every row that uses them, so
    time spent is the sum over distinct stages, not over rows)."""
    stages = (run.get("ledger") or {}).get("stages", [])
    wall = {k: sum(s.get("wall_s", 0.0) for s in stages if s["kind"] == k)
            for k in ("selection", "training", "evaluation")}
    reused = any((s.get("detail") or {}).get("reused") for s in stages if s["kind"] == "training")
    return [round(wall[k], 3) for k in wall] + [int(reused)]
