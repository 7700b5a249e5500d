"""`ccds run` live on the study's pool (issue 29, "Measured: Live").

    python experiments/live.py [--targets gsm8k mmlu] [--scales 0.1 0.3 1.0]

For each target and budget (a multiple of the study's C_full), `ccds run` spends the budget
on the pool of experiments/study.yaml (rebuilt from ../shared/data), with the study's training
and evaluation settings, and its result is set beside the study's best stored run that fits
the same budget, random's seed spread there (the study's noise), and what `ccds plan` with the
paper prior would have picked among the stored runs. Runs go to runs/live/ (resumable; kill
and rerun); reports are copied to experiments/live/ and the table to experiments/live.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))


def main(argv=None) -> None:
    import replay as R

    from ccds.io import read_json, write_json, write_text
    from ccds.spend import RunConfig, run_budget
    from ccds.sweep import _data, load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="+", default=["gsm8k", "mmlu"])
    ap.add_argument("--scales", nargs="+", type=float, default=[0.1, 0.3, 1.0])
    ap.add_argument("--hours", nargs="*", type=float, default=[0.04, 0.08],
                    help="wall-clock budgets (GSM8K, --unit hours on this machine)")
    args = ap.parse_args(argv)
    study_cfg = load_config(ROOT / "experiments" / "study.yaml")
    study_cfg = study_cfg.model_copy(update={"out": ROOT / "study"})
    _data(study_cfg)  # rebuilds study/pool-*.jsonl from ../shared/data if missing
    pool = next((ROOT / "study").glob("pool-*.jsonl"))
    study = R.load_study()
    prior_plan = R.STRATEGIES["`ccds plan`, paper prior, largest affordable stored run"]

    def spend(name: str, *, target: str, **budget) -> dict:
        """`ccds run` with the study's settings into runs/live/NAME (resumed or reused if
        there), its report kept under experiments/live/NAME."""
        out = ROOT / "runs" / "live" / name
        cfg = RunConfig(pool=str(pool), target=target, train=study_cfg.train,
                        eval=study_cfg.eval, n_test=study_cfg.test_cap(target), out=out,
                        **budget)
        rep = read_json(out / "report.json") if (out / "report.json").exists() \
            else run_budget(cfg)
        keep = ROOT / "experiments" / "live" / name
        keep.mkdir(parents=True, exist_ok=True)
        for f in ("report.json", "report.md", "report.png"):
            shutil.copy(out / f, keep / f)
        return rep

    rows = []
    for target in args.targets:
        for scale in args.scales:
            budget = scale * study.c_full
            rep = spend(f"{target}-{scale:g}", target=target, budget=budget)
            arms = R.arm_table(study, target)
            best = max(((p, a) for a, (s, t, p) in arms.items() if s + t <= budget),
                       default=(study.p0[target], None))
            seeds = [r["perf"] for (m, _), rs in study.arms[target].items() if m == "random"
                     for r in rs]
            spread = _seed_sd(study.arms[target])
            w = R.StudyWorld(study, target, budget)
            pick = prior_plan(w, budget)
            rows.append({"target": target, "scale": scale, "budget": budget,
                         "run": {"method": rep["decision"]["method"],
                                 "examples": rep["final"]["examples"],
                                 "perf": -rep["final"]["T"]["nll"],
                                 "charged": rep["charged_flops"],
                                 "measured": rep["charged_measured_flops"],
                                 "pilot_flops": rep["decision"]["pilot_flops"],
                                 "arms": len(rep["decision"]["arms"])},
                         "study_best": {"perf": best[0], "arm": best[1]},
                         "seed_sd": spread, "random_runs": len(seeds),
                         "prior_plan": {"arm": pick,
                                        "perf": w.final(*pick) if pick else study.p0[target]},
                         "p0": study.p0[target]})
    walls = []
    for hours in args.hours:  # wall-clock budgets: predicted against actual
        rep = spend(f"gsm8k-{hours:g}h", target="gsm8k", budget=hours, unit="hours")
        w = rep["wall"]
        walls.append({"hours": hours, "budget_s": w["predicted_s"], "rate": w["rate"],
                      "predicted_s": w["charged_predicted_s"], "actual_s": w["actual_s"],
                      "charged": rep["charged_flops"], "budget_flops": rep["budget_flops"],
                      "method": rep["decision"]["method"], "perf": -rep["final"]["T"]["nll"]})
    md = _table(rows) + "\n" + _wall_table(walls)
    write_json(ROOT / "experiments" / "live.json", {"rows": rows, "wall": walls})
    write_text(ROOT / "experiments" / "live.md", md)
    print(md)


def _seed_sd(arms) -> float:
    """The study's noise: the standard deviation of random's two seeds, pooled over its
    fractions."""
    import numpy as np

    diffs = [rs[0]["perf"] - rs[1]["perf"] for (m, _), rs in arms.items()
             if m == "random" and len(rs) == 2]
    return float(np.sqrt(np.mean(np.square(diffs)) / 2)) if diffs else float("nan")


def _wall_table(walls) -> str:
    lines = ["| budget (hours) | = FLOPs at the measured rate | ccds run | predicted s | "
             "actual s | actual / predicted |", "|---" * 6 + "|"]
    for w in walls:
        lines.append(f"| {w['hours']:g} ({w['budget_s']:.0f} s) | {w['budget_flops']:.3g} | "
                     f"{w['method']}, P = {w['perf']:.4f} | {w['predicted_s']:.0f} | "
                     f"{w['actual_s']:.0f} | {w['actual_s'] / w['predicted_s']:.2f} |")
    return "\n".join(lines) + "\n"


def _arm(arm, none: str) -> str:
    return none if arm is None else f"{arm[0]} {arm[1]:.1%}"


def _table(rows) -> str:
    lines = ["| target | budget (× C_full) | ccds run: method, examples | P = −NLL on T | "
             "study's best at B | seed sd | paper-prior plan | charged / B | measured / "
             "charged | pilot share |", "|---" * 10 + "|"]
    for r in rows:
        run, best, plan = r["run"], r["study_best"], r["prior_plan"]
        lines.append(
            f"| {r['target']} | {r['scale']:g} | {run['method']}, {run['examples']} "
            f"({run['arms']} arms) | {run['perf']:.4f} | {best['perf']:.4f} "
            f"({_arm(best['arm'], 'none')}) | {r['seed_sd']:.3f} | {plan['perf']:.4f} "
            f"({_arm(plan['arm'], 'nothing')})"
            f" | {run['charged'] / r['budget']:.3f} | {run['measured'] / run['charged']:.3f} | "
            f"{run['pilot_flops'] / r['budget']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
