"""RESULTS.md of a study from what `ccds analyze` wrote (runs.csv, fits.json): every number
in it is computed here from the runs, none typed in.

    ccds sweep run experiments/study.yaml && ccds analyze study
    python experiments/results.py study/report --out experiments/RESULTS.md

Noise: a target's noise level is the largest gap between the random seeds at one fraction
below 100%; a method "beats random" at a training budget only when its gain over the mean
of the random seeds at that fraction exceeds that level.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from ccds.analyse.fit import bootstrap_note, lam_text
from ccds.analyse.render import run_label
from ccds.io import read_json, write_text
from ccds.plan import paper_prior

PAPER_LAM = {m.name: m.lam for m in paper_prior(7e9)}  # λ per C_full, MMLU, Llama-2-7B


def load(report: Path) -> tuple[list[dict], dict]:
    with open(report / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("fraction", "perf", "selection_flops", "training_flops"):
            r[k] = float(r[k])
    return rows, read_json(report / "fits.json")


def noise(rows: list[dict]) -> tuple[dict[float, float], float]:
    """Per fraction, the mean P of the random seeds; and the largest seed gap below 100%."""
    by_f = defaultdict(list)
    for r in rows:
        if r["method"] == "random":
            by_f[r["fraction"]].append(r["perf"])
    mean = {f: float(np.mean(v)) for f, v in by_f.items()}
    gaps = [max(v) - min(v) for f, v in by_f.items() if f < 1 and len(v) > 1]
    return mean, max(gaps) if gaps else float("nan")


def compute_spent(rows: list[dict]) -> str:
    """Hours this study cost the machine: distinct scorings and trainings counted once (rows
    copy the stage of the scores and adapter they reuse), every evaluation counted."""
    scoring = {(r["method"], r["selection_s"]): float(r["selection_s"]) for r in rows}
    trainings = [float(r["training_s"]) for r in rows if r["training_reused"] == "0"]
    sel, tr = sum(scoring.values()) / 3600, sum(trainings) / 3600
    ev = sum(float(r["evaluation_s"]) for r in rows) / 3600
    return (f"Compute spent: **{sel + tr + ev:.1f} h** of 2-core CPU time — scoring "
            f"{sel:.1f} h, {len(trainings)} distinct LoRA trainings {tr:.1f} h (the other "
            f"{len(rows) - len(trainings)} runs reuse a saved adapter: a target-agnostic subset "
            f"or the full pool), evaluation {ev:.1f} h. ")


def pool_size(rows: list[dict]) -> str:
    n = max(int(r["n"]) for r in rows)
    full = [float(r["training_s"]) for r in rows
            if float(r["fraction"]) == 1.0 and r["training_reused"] == "0"]
    epoch = (f": one LoRA epoch on all of it took {min(full) / 60:.0f}–{max(full) / 60:.0f} "
             "min (the sessions ran on different CPUs under different loads), and every "
             "method trains its own subsets below 100%") if full else ""
    return (f"The pool has {n:,} examples (BIG-bench, GSM8K train and Alpaca in equal parts, "
            f"test copies dropped), fewer than the few thousand first planned{epoch}.")


def target_section(target: str, rows: list[dict], g: dict) -> list[str]:
    mean, level = noise(rows)
    methods = sorted({r["method"] for r in rows} - {"random"})
    fractions = sorted({r["fraction"] for r in rows if r["fraction"] < 1})
    perf = {(r["method"], r["fraction"]): r["perf"] for r in rows if r["method"] != "random"}
    n_seeds = len({r["seed"] for r in rows if r["method"] == "random"})
    full = {r["perf"] for r in rows if r["fraction"] == 1.0}  # shared runs count once
    full_spread = max(full) - min(full) if full else float("nan")
    full_n = next((r["n"] for r in rows if r["fraction"] == 1.0), "all")
    out = [f"## {target}", "",
           f"P = −(test NLL); zero-shot P0 = {g['zero_shot']:.3f}; random at 100% "
           f"{mean.get(1.0, float('nan')):.3f}. Noise: the {n_seeds} random seeds differ by up "
           f"to **{level:.3f}** at one fraction, so smaller gaps below are within noise. "
           f"At 100% every run trains on the same {full_n} examples, yet P spans "
           f"{full_spread:.3f} over {len(full)} runs (training order per seed; part of the "
           "study ran on another CPU, whose bf16 kernels round differently).", "",
           "**At a fixed training budget** (same fraction of the pool): P − mean random P; "
           "★ beyond the noise level.", "",
           "| method | " + " | ".join(f"{f:.1%}" for f in fractions) + " | beats random at |",
           "|---|" + "---|" * (len(fractions) + 1)]
    for m in methods:
        cells, wins = [], []
        for f in fractions:
            if (m, f) not in perf or f not in mean:
                cells.append("—")
                continue
            d = perf[m, f] - mean[f]
            star = " ★" if d > level else ""
            cells.append(f"{d:+.3f}{star}")
            if star:
                wins.append(f"{f:.1%}")
        out.append(f"| {m} | " + " | ".join(cells) + f" | {', '.join(wins) or 'none'} |")
    fr = g["frontier"]
    on = sorted({p["method"] for p in fr})
    out += ["", f"**Compute-optimal frontier** (selection + training FLOPs, ccds convention; "
            f"C_full = {g['c_full']:.2e}): {len(fr)} runs — "
            + ", ".join(map(run_label, fr))
            + f". Methods on it: {', '.join(on)}. On the fitted frontier: "
            f"{', '.join(g.get('fitted_frontier_methods') or []) or 'no fit'}.", ""]
    if g["fits"]:
        out += ["**Fits** P(C) = (P̄ − P0)(1 − exp(−λC/C_full)) + P0, λ per C_full; the "
                "paper's λ is its MMLU rate at Llama-2-7B in the same unit.", "",
                "| method | λ | λ 95% interval (bootstrap) | R² | points | paper λ (MMLU, 7B) |",
                "|---|---|---|---|---|---|"]
        for m, f in sorted(g["fits"].items(), key=lambda kv: -kv[1]["lam"]):
            lam, iv = lam_text(f, ".2f")
            out.append(f"| {m} | {lam} | {iv} | {f['r2']:.2f} | {f['n']} | "
                       + (f"{PAPER_LAM[m]:.2f}" if m in PAPER_LAM else "—") + " |")
        out += ["", bootstrap_note(g["fits"]), ""] if bootstrap_note(g["fits"]) else [""]
    elif g["fit_error"]:
        out += [f"Fit failed: {g['fit_error']}", ""]
    detail = g.get("break_even_detail") or {}
    if detail:
        n = max(d.get("resamples", 0) for d in detail.values())
        out += ["**Break-even model-size ratio** (trained model r× the selection model; also "
                "the number of tasks one selection must serve), by the fitted curves and by "
                f"the empirical frontier, with 95% intervals over {n} bootstrap resamples of "
                "the runs (∞: not within 10⁴ in part of them).", "",
                "| method | fitted | interval | empirical frontier | interval |",
                "|---|---|---|---|---|"]
        for m, d in sorted(detail.items()):
            out.append(f"| {m} | {_ratio(d.get('fitted'))} | {_interval(d.get('fitted_interval'))}"
                       f" | {_ratio(d.get('empirical'))} | "
                       f"{_interval(d.get('empirical_interval'))} |")
        out.append("")
    plot = (g.get("plots") or {}).get("frontier")
    if plot:
        out += [f"![{target} frontier](../study/report/{plot})", ""]
    return out


def _ratio(r) -> str:
    return ("never within 10⁴" if r is None else r if isinstance(r, str) else f"{r:.1f}")


def _interval(iv) -> str:
    if not iv or all(x is None for x in iv):
        return "never within 10⁴"
    lo, hi = (("∞" if x is None else f"{x:.1f}") for x in iv)
    return f"{lo}–{hi}"


def dsir_section(by_target: dict[str, list[dict]], groups: list[dict]) -> list[str]:
    """Where DSIR lands against the other cheap targeted methods: at a fixed training
    budget (its P minus theirs, against the seed noise) and on the compute-optimal
    frontier."""
    if not any(r["method"] == "dsir" for rows in by_target.values() for r in rows):
        return []
    fractions = sorted({r["fraction"] for rows in by_target.values() for r in rows
                        if r["method"] == "dsir" and r["fraction"] < 1})
    out = ["## DSIR against BM25 and embeddings", "",
           "DSIR (hashed unigram + bigram importance weights, Gumbel top-k; the reference's "
           "defaults, so examples under 100 tokens, words and punctuation runs, rank last) "
           "was added to the stored sweep at " + ", ".join(f"{f:.1%}" for f in fractions) + " (nothing else recomputed). "
           "Cells: DSIR's P minus BM25's / embeddings' at the same fraction; ★ beyond the "
           "seed noise.", "",
           "| target | " + " | ".join(f"{f:.1%}" for f in fractions)
           + " | DSIR on the frontier | frontier runs |",
           "|---|" + "---|" * (len(fractions) + 2)]
    for g in groups:
        rows = by_target[g["target"]]
        _, level = noise(rows)
        perf = {(r["method"], r["fraction"]): r["perf"] for r in rows}
        cells = []
        for f in fractions:
            parts = []
            for m in ("bm25", "embed"):
                if ("dsir", f) in perf and (m, f) in perf:
                    d = perf["dsir", f] - perf[m, f]
                    parts.append(f"{d:+.3f}{' ★' if abs(d) > level else ''}")
                else:
                    parts.append("—")
            cells.append(" / ".join(parts))
        fr = g["frontier"]
        mine = [i for i, p in enumerate(fr) if p["method"] == "dsir"]
        on = ("no" if not mine else "only as the cheapest run" if mine == [0]
              else ", ".join(f"{fr[i]['fraction']:.1%}" for i in mine))
        out.append(f"| {g['target']} | " + " | ".join(cells) + f" | {on} | "
                   + ", ".join(map(run_label, fr)) + " |")
    shares = []
    for g in groups:
        sel: dict[str, float] = {}
        for r in by_target[g["target"]]:
            if r["method"] in ("dsir", "bm25", "embed"):
                sel[r["method"]] = max(sel.get(r["method"], 0.0), float(r["selection_flops"]))
        shares.append(f"{g['target']} " + ", ".join(
            f"{m} {sel[m] / g['c_full']:.1e}" for m in ("dsir", "bm25", "embed") if m in sel))
    out += ["", "Selection cost as a share of a full-pool LoRA epoch (C_full), per target: "
            + "; ".join(shares) + ".", ""]
    return out


def gain(rows: list[dict], method: str, fraction: float) -> tuple[float, float] | None:
    """(P of `method` − mean random P, noise level) at one fraction, if both were run."""
    mean, level = noise(rows)
    p = [r["perf"] for r in rows if r["method"] == method and r["fraction"] == fraction]
    return (p[0] - mean[fraction], level) if p and fraction in mean else None


def _verdict(d: tuple[float, float] | None, want_positive: bool = True) -> str:
    if d is None:
        return "not run"
    diff, level = d
    if abs(diff) <= level:
        return f"{diff:+.3f}, within noise (±{level:.3f})"
    return f"{diff:+.3f}, " + ("agrees" if (diff > 0) == want_positive else "disagrees")


def claims(by_target: dict[str, list[dict]], groups: list[dict]) -> list[str]:
    """Each paper finding beside what this study measured, per target."""
    names = [g["target"] for g in groups]
    cells: dict[str, list[str]] = defaultdict(list)
    for g in groups:
        rows = by_target[g["target"]]
        on = {p["method"] for p in g["frontier"]}
        cheap = [m for m in ("bm25", "embed") if any(r["method"] == m for r in rows)]
        cells["cheap"].append(", ".join(f"{m} {'on' if m in on else 'off'}" for m in cheap)
                              + (" — agrees" if any(m in on for m in cheap) else " — disagrees")
                              if cheap else "not run")
        costly = [m for m in ("ppl", "less") if any(r["method"] == m for r in rows)]
        cells["costly"].append(", ".join(f"{m} {'on' if m in on else 'off'}" for m in costly)
                               + (" — agrees" if not on & set(costly) else " — disagrees")
                               if costly else "not run")
        be = g.get("break_even") or {}
        cells["break_even"].append(", ".join(f"{m} {_ratio(be.get(m))}" for m in costly)
                                   or "not run")
        small = min((r["fraction"] for r in rows), default=None)
        cells["less_fixed"].append(f"{small:.1%}: " + _verdict(gain(rows, "less", small)))
        cells["s2l_fixed"].append(", ".join(f"{f:.1%}: {_verdict(gain(rows, 's2l', f))}"
                                            for f in sorted({r["fraction"] for r in rows})
                                            if f <= 0.1))
        lam = {m: f["lam"] for m, f in (g.get("fits") or {}).items() if m in PAPER_LAM}
        cells["lam"].append(" > ".join(sorted(lam, key=lambda m: -lam[m])) or "no fit")
    paper_order = " > ".join(sorted(PAPER_LAM, key=lambda m: -PAPER_LAM[m]))
    table = [
        ("cheap methods (BM25, embeddings) are on the compute-optimal frontier when the "
         "trained model is the selection model", "cheap"),
        ("perplexity and LESS are not, at equal model sizes", "costly"),
        ("they join at a trained model about 5x (PPL) and 10x (LESS) the selection model",
         "break_even"),
        ("at a fixed training budget LESS beats random (MMLU 7B, 2.5%: 46.13 vs 45.18)",
         "less_fixed"),
        ("S2L beats random at small budgets on math (its paper: MathInstruct, 11%)",
         "s2l_fixed"),
        (f"fitted λ, highest first (MMLU 7B): {paper_order}", "lam")]
    out = ["## The papers' findings, checked", "",
           "Each finding of Yin & Rush (2024) and Yang et al. (2024) beside what this study "
           "measured, per target; a gain over random counts only beyond the seed noise.", "",
           "| finding | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    out += [f"| {text} | " + " | ".join(cells[key]) + " |" for text, key in table]
    return out + ["", WHY, ""]


WHY = (
    "**Why a study this small can agree, and where it cannot.** The frontier findings are "
    "about cost ratios, and those carry over: a method's selection cost over the pool "
    "divided by the cost of training on the whole pool does not depend on the pool's size, "
    "and here the selection model is the trained model (r = 1), the paper's 7B-with-7B "
    "setting. Perplexity's forward pass over the pool costs about half of a LoRA epoch on "
    "it, and LESS's per-example gradients over the pool alone about as much as the epoch "
    "(a forward and a backward per token), before its warmup and projection. The "
    "fixed-budget gains are another matter: a 135M model, a 1,500-example pool, one epoch, "
    "and P = −(test NLL) on 114 / 54 / 30 test items (MMLU / BBH / GSM8K), against "
    "Llama-2-7B on 270k examples scored by accuracy. With two random seeds the noise level "
    "is itself a rough estimate, so a gain beyond it is evidence, not proof. LESS here warms "
    "up for one epoch instead of four (its checkpoints would cost four times as much); "
    "S2L's proxy is a small Llama trained on this pool, not Pythia-70M on MathInstruct. The "
    "cascade reranks BM25's top 20% by perplexity, so from 25% up it trains BM25's subset "
    "(identical rows), and its cost is BM25's plus perplexity on a fifth of the pool.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="the folder `ccds analyze` wrote")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = ap.parse_args(argv)
    rows, fits = load(args.report)
    by_target = defaultdict(list)
    for r in rows:
        by_target[r["target"]].append(r)
    lines = ["# What the small-scale study found", "",
             f"Generated by `python experiments/results.py {args.report}` from the runs of "
             f"`ccds sweep run experiments/study.yaml` ({len(rows)} runs) and `ccds analyze`. "
             "Convention: " + fits["convention"] + " FLOPs. " + compute_spent(rows)
             + pool_size(rows), ""]
    lines += claims(by_target, fits["groups"])
    lines += dsir_section(by_target, fits["groups"])
    for g in fits["groups"]:
        lines += target_section(g["target"], by_target[g["target"]], g)
    write_text(args.out, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
