"""`ccds analyze RUNS`: from a sweep's run store to fits, frontiers, break-even ratios,
amortisation, overlap, plots, an HTML report and a Markdown summary (spec §4).

Per (target, training model): each run is a point (C, P) with C = selection + training FLOPs
(ccds or paper convention) and P = −NLL or the target metric; fits use every seed's run.
"""

from __future__ import annotations

import base64
import csv
from pathlib import Path

import numpy as np

from ..errors import CcdsError
from ..io import atomic_path, safe_name, write_json, write_text
from ..store import Store
from .fit import bootstrap_note, fit_methods, lam_text
from .frontier import Point, break_even, empirical_frontier, fitted_frontier, group, overlap

TASKS = (1, 5, 10, 20)


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
            convention: str = "ccds", bootstrap: int = 200, p0: str = "measured") -> dict:
    """p0: "measured" fixes each group's P0 to the zero-shot performance the sweep recorded
    (fitted when there is none), "fit" always fits it."""
    if p0 not in ("measured", "fit"):
        raise CcdsError(f"unknown P0 mode '{p0}'", None, "use measured or fit")
    if share not in ("none", "pbar", "pbar_p0"):  # else every group's fit fails alike
        raise CcdsError(f"unknown sharing '{share}'", None, "use none, pbar or pbar_p0")
    runs_dir, out = Path(runs_dir), Path(out)
    db = runs_dir / "runs.sqlite" if runs_dir.is_dir() else runs_dir
    if not db.exists():
        raise CcdsError("no run store here", str(db), "pass the sweep's output folder")
    store = Store(db)
    runs, meta = list(store.runs()), store.meta()
    if not runs:
        raise CcdsError("the run store has no finished runs", str(db), "run the sweep first")
    report: dict = {"convention": convention, "share": share, "groups": []}
    write_runs_csv(runs, out / "runs.csv")
    for (target, model), pts in load_points(runs, convention).items():
        c_full = meta[f"c_full/{model}"]["analytic" if convention == "ccds" else "paper"]
        zero = meta.get(f"zero_shot/{target}/{model}") if p0 == "measured" else None
        g = analyze_group(target, model, pts, c_full, share, bootstrap,
                          meta[f"c_full/{model}"], zero["perf"] if zero else None)
        g["overlap"] = overlaps([r for r in runs if r["target"] == target
                                 and r["model"] == model])
        g["plots"] = plot_group(g, pts, out, c_full)
        report["groups"].append(g)
    write_json(out / "fits.json", report)
    write_text(out / "report.md", markdown(report))
    write_text(out / "report.html", html(report, out))
    return report


def analyze_group(target, model, pts, c_full, share, bootstrap, full_meta,
                  zero_shot: float | None = None) -> dict:
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
    g["frontier"] = [vars(p) for p in empirical_frontier(pts)]
    g["frontier_training_only"] = [vars(p) for p in empirical_frontier(pts, training_only=True)]
    if fits:
        grid = np.geomspace(min(p.total for p in pts), max(p.total for p in pts), 60)
        _, who = fitted_frontier(fits, grid)
        g["fitted_frontier_methods"] = sorted(set(who))
        g["break_even"] = {}
        for m in methods:
            if g["methods"][m]["selection_share"] > 0.01:
                try:
                    g["break_even"][m] = break_even(pts, m, c_full, share=share,
                                                    p0=zero_shot)
                except CcdsError as e:
                    g["break_even"][m] = f"not computable: {e}"
    return g


def overlaps(runs: list[dict]) -> dict:
    out = {}
    for f in sorted({r["fraction"] for r in runs}):
        sel = {r["method"]: r["ids"] for r in runs if r["fraction"] == f and r["seed"] ==
               min(x["seed"] for x in runs if x["method"] == r["method"])}
        names, m = overlap(sel)
        out[f"{f:g}"] = {"methods": names, "jaccard": m.round(4).tolist()}
    return out


def write_runs_csv(runs: list[dict], path: Path) -> None:
    cols = ["target", "model", "method", "fraction", "seed", "n", "tokens", "selection_flops",
            "training_flops", "selection_paper_flops", "training_paper_flops", "perf", "metric"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols + ["nll", "accuracy", "exact_match", "selection_s", "training_s",
                           "evaluation_s", "training_reused"])
        for r in runs:
            ev = r.get("eval", {})
            w.writerow([r.get(c) for c in cols] + [ev.get("nll"), ev.get("accuracy"),
                                                   ev.get("exact_match")] + _walls(r))


def _walls(run: dict) -> list:
    """Wall seconds per stage kind as recorded, and whether the training was a saved adapter
    (a sweep copies the stage of cached scores and adapters into every row that uses them, so
    time spent is the sum over distinct stages, not over rows)."""
    stages = (run.get("ledger") or {}).get("stages", [])
    wall = {k: sum(s.get("wall_s", 0.0) for s in stages if s["kind"] == k)
            for k in ("selection", "training", "evaluation")}
    reused = any((s.get("detail") or {}).get("reused") for s in stages if s["kind"] == "training")
    return [round(wall[k], 3) for k in wall] + [int(reused)]


def plot_group(g: dict, pts: list[Point], out: Path, c_full: float) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fit import Fit

    stem = safe_name(f"{g['target']}-{g['model']}")
    files = {}
    methods = sorted({p.method for p in pts})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, training_only in zip(axes, (False, True), strict=True):
        for m in methods:
            mine = [p for p in pts if p.method == m]
            x = [p.training if training_only else p.total for p in mine]
            ax.scatter(x, [p.perf for p in mine], color=colors[m], label=m, s=25, zorder=3)
            if not training_only and m in g["fits"]:
                f = Fit.from_dict(g["fits"][m])
                lo = max(min(x), 1e-3 * c_full)
                grid = np.geomspace(lo, max(p.total for p in pts) * 1.2, 100)
                ax.plot(grid, f(grid), color=colors[m], lw=1, alpha=0.8)
        fr = g["frontier_training_only" if training_only else "frontier"]
        xs = [p["training"] if training_only else p["selection"] + p["training"] for p in fr]
        ax.step(xs + [max(xs) * 1.2], [p["perf"] for p in fr] + [fr[-1]["perf"]], where="post",
                color="k", lw=1.5, ls="--", label="frontier", zorder=2)
        if g.get("zero_shot") is not None:
            ax.axhline(g["zero_shot"], color="grey", lw=1, ls=":", label="zero-shot (P0)")
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs" if training_only else "selection + training FLOPs")
        ax.set_title("fixed training budget (selection free)" if training_only
                     else "compute-constrained")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("P (−test NLL)" if pts and pts[0].perf < 0 else "P")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{g['target']} — {g['model']}")
    fig.tight_layout()
    files["frontier"] = _save(fig, out / f"{stem}-frontier.png")
    plt.close(fig)
    if g["overlap"]:
        last = list(g["overlap"].values())[0]  # the smallest fraction: where methods differ most
        fig, ax = plt.subplots(figsize=(5, 4))
        im = ax.imshow(last["jaccard"], vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(last["methods"])), last["methods"], rotation=45, ha="right")
        ax.set_yticks(range(len(last["methods"])), last["methods"])
        for i, row in enumerate(last["jaccard"]):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if v < 0.6 else "k")
        fig.colorbar(im, ax=ax, label="Jaccard")
        ax.set_title(f"selection overlap at {list(g['overlap'])[0]} of the pool")
        fig.tight_layout()
        files["overlap"] = _save(fig, out / f"{stem}-overlap.png")
        plt.close(fig)
    expensive = [m for m, v in g["methods"].items() if v["selection_share"] > 0.01]
    if g["fits"] and expensive:
        fig, ax = plt.subplots(figsize=(6, 4))
        from .frontier import rescale

        cheap = [m for m in methods if m not in expensive]
        for m in cheap:
            mine = [p for p in pts if p.method == m]
            ax.scatter([p.total for p in mine], [p.perf for p in mine], color=colors[m],
                       label=m, s=18)
        for m in expensive:
            for i, k in enumerate(TASKS):
                mine = [p for p in rescale(pts, k, {m}) if p.method == m]
                ax.plot([p.total for p in mine], [p.perf for p in mine], marker="o", ms=3,
                        color=colors[m], alpha=1 - 0.2 * i, label=f"{m} over {k} task(s)")
        ax.set_xscale("log")
        ax.set_xlabel("FLOPs charged to one task")
        ax.legend(fontsize=7)
        ax.set_title("amortising selection over tasks")
        fig.tight_layout()
        files["amortization"] = _save(fig, out / f"{stem}-amortization.png")
        plt.close(fig)
    return files


def unsaturated(fit: dict, best: float) -> bool:
    """A fitted ceiling over three times the method's observed gain above P0: the data
    never bends, so P̄ and λ trade off freely."""
    return fit["pbar"] - fit["p0"] > 3 * max(best - fit["p0"], 1e-12)


def run_label(p: dict) -> str:
    """'bm25 5.0%', with the seed when the run has siblings (random's seeds)."""
    seed = p.get("run", "").rsplit("/", 1)[-1]
    return f"{p['method']} {p['fraction']:.1%}" + (f" (seed {seed})" if seed not in ("", "0")
                                                   else "")


def _save(fig, path: Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path.name


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    lines = ["# ccds analysis", "",
             f"FLOPs convention: {report['convention']}; fits share: {report['share']}.", ""]
    for g in report["groups"]:
        lines += [f"## {g['target']} — {g['model']}", "",
                  f"{g['runs']} runs; full training C_full = {g['c_full']:.3e} FLOPs."
                  + (f" Zero-shot P = {g['zero_shot']:.4g} (the fits' P0)."
                     if g.get("zero_shot") is not None else ""), ""]
        if g["fit_error"]:
            lines += [f"Fit: {g['fit_error']}", ""]
        else:
            lines += ["| method | λ (per C_full) | λ 95% | P0 | P̄ | R² | selection / C_full |",
                      "|---|---|---|---|---|---|---|"]
            loose = []
            for m, f in g["fits"].items():
                if unsaturated(f, g["methods"][m]["best"]):
                    loose.append(m)
                lam, iv = lam_text(f)
                lines.append(f"| {m} | {lam} | {iv} | {f['p0']:.4g} | {f['pbar']:.4g} | "
                             f"{f['r2']:.3f} | {g['methods'][m]['selection_share']:.3g} |")
            lines += ["", bootstrap_note(g["fits"]), ""] if bootstrap_note(g["fits"]) else [""]
            if loose:
                lines += [f"P̄ not identified for {', '.join(loose)}: their runs show no "
                          "saturation, so the fit is a line and only the initial slope "
                          "(P̄ − P0)·λ is meaningful; add larger fractions, or share P̄.", ""]
        fr = ", ".join(map(run_label, g["frontier"]))
        lines += [f"Compute-optimal frontier (runs): {fr}.", ""]
        fr2 = ", ".join(map(run_label, g["frontier_training_only"]))
        lines += [f"Frontier ignoring selection cost: {fr2}.", ""]
        if g.get("fitted_frontier_methods"):
            lines += ["Fitted frontier made of: " + ", ".join(g["fitted_frontier_methods"]) + ".",
                      ""]
        for m, r in (g.get("break_even") or {}).items():
            txt = (r if isinstance(r, str) else "already on the frontier" if r == 1 else
                   f"{r:.3g}x (or shared by {int(np.ceil(r))} tasks)" if r else
                   "not within 10⁴x")
            lines.append(f"- break-even for {m}: {txt}")
        lines.append("")
        for f, o in g["overlap"].items():
            pairs = [f"{a}–{b} {o['jaccard'][i][j]:.0%}" for i, a in enumerate(o["methods"])
                     for j, b in enumerate(o["methods"]) if j > i]
            if pairs:
                lines.append(f"- overlap at {float(f):.1%}: " + ", ".join(pairs))
        lines += [""] + [f"![{k}]({v})" for k, v in g["plots"].items()] + [""]
    return "\n".join(lines)


def html(report: dict, out: Path) -> str:
    """The Markdown summary as one self-contained page (plots inlined)."""
    import html as h

    body, table = [], []

    def flush():
        if table:
            body.append("<table border=1 cellspacing=0 cellpadding=3>" + "".join(table)
                        + "</table>")
            table.clear()

    for line in markdown(report).splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not set("".join(cells)) <= set("-"):
                table.append("<tr>" + "".join(f"<td>{h.escape(c)}</td>" for c in cells)
                             + "</tr>")
            continue
        flush()
        if line.startswith("!["):
            data = base64.b64encode((out / line[line.index("(") + 1:-1]).read_bytes()).decode()
            body.append(f'<img src="data:image/png;base64,{data}" style="max-width:100%">')
        elif line.startswith("#"):
            n = len(line) - len(line.lstrip("#"))
            body.append(f"<h{n}>{h.escape(line[n:].strip())}</h{n}>")
        elif line.strip():
            body.append(f"<p>{h.escape(line)}</p>")
    flush()
    return ("<!doctype html><meta charset=utf-8><title>ccds analysis</title><body style="
            "'font-family:sans-serif;max-width:1100px;margin:auto'>\n" + "\n".join(body)
            + "\n</body>\n")
