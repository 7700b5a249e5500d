"""What `ccds analyze` shows people: plots per (target, model), the Markdown summary and the
HTML page, all drawn from the report dict `analyse.runs` computes (it computes nothing the
run store or fits.json depends on). The Markdown table and PNG writer serve the demo too.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from ..io import atomic_path, safe_name
from .fit import Fit, bootstrap_note, lam_text
from .frontier import Point, rescale

TASKS = (1, 5, 10, 20)  # tasks sharing one selection, in the amortisation plot


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported late: it is slow to import
    and only plotting needs it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = 110) -> str:
    """Write the figure atomically and close it; returns the name the Markdown links to."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)
    return path.name


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def unsaturated(fit: dict, best: float) -> bool:
    """A fitted ceiling over three times the method's observed gain above P0: the data
    never bends, so P̄ and λ trade off freely."""
    return fit["pbar"] - fit["p0"] > 3 * max(best - fit["p0"], 1e-12)


def run_label(p: dict) -> str:
    """'bm25 5.0%', with the seed when the run has siblings (random's seeds)."""
    seed = p.get("run", "").rsplit("/", 1)[-1]
    return f"{p['method']} {p['fraction']:.1%}" + (f" (seed {seed})" if seed not in ("", "0")
                                                   else "")


def plot_group(g: dict, pts: list[Point], out: Path, c_full: float) -> dict[str, str]:
    plt = pyplot()
    stem = safe_name(f"{g['target']}-{g['model']}")
    files = {}
    methods = sorted({p.method for p in pts})
    palette = [c for i, c in enumerate(plt.cm.tab10.colors) if i != 7]  # grey: reference lines
    colors = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
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
                color="k", lw=1.5, ls="--", label="frontier (beyond noise)", zorder=2)
        hull = [] if training_only else g.get("frontier_hull") or []
        if hull:
            ax.plot([p["selection"] + p["training"] for p in hull], [p["perf"] for p in hull],
                    color="k", lw=1, ls="-.", alpha=0.6, label="upper hull in log C (paper)",
                    zorder=2)
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
    files["frontier"] = save_png(fig, out / f"{stem}-frontier.png")
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
        files["overlap"] = save_png(fig, out / f"{stem}-overlap.png")
    expensive = [m for m, v in g["methods"].items() if v["selection_share"] > 0.01]
    if g["fits"] and expensive:
        fig, ax = plt.subplots(figsize=(6, 4))
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
        files["amortization"] = save_png(fig, out / f"{stem}-amortization.png")
    return files


def ratio_text(r) -> str:
    return "not within 10⁴x" if r is None else f"{r:.3g}x"


def interval_text(iv) -> str:
    """[lo, hi] of a break-even ratio; None ends never break even within 10⁴x."""
    lo, hi = iv
    return ("[never within 10⁴x]" if lo is None else
            f"[{lo:.3g}x, {'not within 10⁴x' if hi is None else f'{hi:.3g}x'}]")


FIT_HEADERS = ["method", "λ (per C_full)", "λ 95%", "P0", "P̄", "R²", "selection / C_full"]


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
            rows, loose = [], []
            for m, f in g["fits"].items():
                if unsaturated(f, g["methods"][m]["best"]):
                    loose.append(m)
                lam, iv = lam_text(f)
                rows.append([m, lam, iv, f"{f['p0']:.4g}", f"{f['pbar']:.4g}", f"{f['r2']:.3f}",
                             f"{g['methods'][m]['selection_share']:.3g}"])
            lines.append(markdown_table(FIT_HEADERS, rows))
            lines += ["", bootstrap_note(g["fits"]), ""] if bootstrap_note(g["fits"]) else [""]
            if loose:
                lines += [f"P̄ not identified for {', '.join(loose)}: their runs show no "
                          "saturation, so the fit is a line and only the initial slope "
                          "(P̄ − P0)·λ is meaningful; add larger fractions, or share P̄.", ""]
        fr = ", ".join(map(run_label, g["frontier"]))
        lines += [f"Compute-optimal frontier (runs): {fr}.", ""]
        tol = g.get("frontier_tolerance")
        if tol:
            lines += ["A run is on it only if it beats every cheaper run's P by more than "
                      f"τ = {tol['value']:.3g}: "
                      + ("the seeds' spread (pooled standard deviation of P over runs of one "
                         "method and fraction)." if tol["from"] == "seeds" else
                         "1% of the runs' P range (no seeds to measure the noise)."), ""]
        if g.get("frontier_hull"):
            lines += ["Upper hull in (log C, P), the frontier as the paper draws it: "
                      + ", ".join(map(run_label, g["frontier_hull"])) + ".", ""]
        fr2 = ", ".join(map(run_label, g["frontier_training_only"]))
        lines += [f"Frontier ignoring selection cost: {fr2}.", ""]
        if g.get("fitted_frontier_methods"):
            lines += ["Fitted frontier made of: " + ", ".join(g["fitted_frontier_methods"]) + ".",
                      ""]
        detail = g.get("break_even_detail") or {}
        if detail:
            lines += ["Break-even ratio r (trained model r× the selection model, or tasks "
                      "sharing one selection), 95% bootstrap interval in brackets: fitted, the "
                      "smallest r at which the method's fitted curve beats every cheaper "
                      "method's somewhere; empirical, the smallest r at which one of its runs "
                      "joins the frontier above.", ""]
        for m, r in (g.get("break_even") or {}).items():
            txt = (r if isinstance(r, str) else "already on the frontier" if r == 1 else
                   f"{r:.3g}x (or shared by {int(np.ceil(r))} tasks)" if r else
                   "not within 10⁴x")
            d = detail.get(m) or {}
            lines.append(f"- break-even for {m}: {txt}"
                         + (f" {interval_text(d['fitted_interval'])}"
                            if d.get("fitted_interval") else "")
                         + (f"; empirical {ratio_text(d['empirical'])}" if d else "")
                         + (f" {interval_text(d['empirical_interval'])}"
                            if d.get("empirical_interval") else ""))
        for m, d in detail.items():
            if m not in (g.get("break_even") or {}):
                lines.append(f"- break-even for {m}: empirical {ratio_text(d['empirical'])}"
                             + (f" {interval_text(d['empirical_interval'])}"
                                if d.get("empirical_interval") else ""))
        lines.append("")
        for f, o in g["overlap"].items():
            pairs = [f"{a}–{b} {o['jaccard'][i][j]:.0%}" for i, a in enumerate(o["methods"])
                     for j, b in enumerate(o["methods"]) if j > i]
            if pairs:
                lines.append(f"- overlap at {float(f):.1%}: " + ", ".join(pairs))
        lines += [""] + [f"![{k}]({v})" for k, v in g["plots"].items()] + [""]
    if report.get("trainer_total_flos"):
        lines += trainer_flos_lines(report["trainer_total_flos"])
    return "\n".join(lines)


def trainer_flos_lines(checks: list[dict]) -> list[str]:
    """The Trainer's own `total_flos` beside ccds's count, per run: shown, never used."""
    def num(x):
        return "—" if x is None else f"{x:.3e}"

    rows = [[c["run"], c["training"], f"{c['tokens']:,}", num(c["training_flops"]),
             num(c["attention_flops"]), num(c["training_paper_flops"]),
             num(c["trainer_total_flos"]),
             "—" if c["total_flos_ratio"] is None else f"{c['total_flos_ratio']:.3g}x"]
            for c in checks]
    return ["## The Trainer's total_flos beside ccds's count", "",
            "Training FLOPs above are ccds's (LoRA: 4·N·T + 6·N_lora·T, the head and "
            "attention); the Trainer's total_flos is 6 × every non-embedding weight (frozen "
            "and LoRA ones included) × the tokens it ran, padding included: a cross-check, "
            "not used. Attention —: no subset lengths to count it from, so left out.", "",
            markdown_table(["run", "training", "tokens T", "ccds", "of which attention",
                            "6·N·T (paper)", "Trainer total_flos", "total_flos / ccds"],
                           rows), ""]


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
