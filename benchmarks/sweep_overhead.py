"""A sweep's overhead beyond the sum of its scoring, training and evaluation (issue 6): run a
small sweep on the embedded model in-process, time it whole, and subtract every stage's own
wall time from its run store (each method's scoring once, every run's training and
evaluation, the zero-shot evaluation). What is left is loading, tokenising, hashing and the
store: the price of resumability.

    .venv/bin/python benchmarks/sweep_overhead.py          # ~5 min on the 2-core CPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from ccds.io import write_json, write_text
from ccds.store import Store
from ccds.sweep import SweepConfig, run_sweep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--pool", type=int, default=400)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SweepConfig.model_validate({
            "out": tmp, "pool": "synth",
            "synth": {"n_pool": args.pool, "n_val": 8, "n_test": 30},
            "methods": [{"name": "random", "seeds": [0, 1]}, "bm25", "embed", "ppl"],
            "fractions": [0.05, 0.1, 0.2], "train": {"epochs": 1, "lr": 3e-4},
            "eval": {"generate": False}})
        t = time.perf_counter()
        run_sweep(cfg, log=lambda m: print(m, flush=True))
        wall = time.perf_counter() - t
        store = Store(Path(tmp) / "runs.sqlite")
        runs, meta = list(store.runs()), store.meta()
    selection = {}  # one scoring per (method, seed), shared by its fractions
    train = evaluation = 0.0
    for r in runs:
        for s in r["ledger"]["stages"]:
            if s["kind"] == "selection":
                selection[(r["method"], r["seed"])] = s["wall_s"]
            elif s["kind"] == "training":  # a reused adapter cost its time once
                train += 0.0 if s.get("detail", {}).get("reused") else s["wall_s"]
            else:
                evaluation += s["wall_s"]
    zero = sum(v["wall_s"] for k, v in meta.items() if k.startswith("zero_shot/"))
    work = sum(selection.values()) + train + evaluation + zero
    r = {"command": "python benchmarks/sweep_overhead.py " + " ".join(sys.argv[1:]),
         "date": str(date.today()), "runs": len(runs), "wall_s": wall,
         "selection_s": sum(selection.values()), "training_s": train,
         "evaluation_s": evaluation + zero, "overhead_s": wall - work,
         "overhead": (wall - work) / work}
    md = "\n".join([
        "# Sweep overhead", "",
        f"Command: `{r['command']}` — {r['date']}; {r['runs']} runs (random ×2 seeds, bm25, "
        f"embed, ppl at 5/10/20% of a {args.pool}-example synthetic pool).", "",
        "| sweep wall s | scoring s | training s | evaluation s | overhead s | overhead |",
        "|---|---|---|---|---|---|",
        f"| {wall:.1f} | {r['selection_s']:.1f} | {train:.1f} | {r['evaluation_s']:.1f} | "
        f"{r['overhead_s']:.1f} | {r['overhead']:.1%} |", "",
        "Target: ≤ 10% beyond the sum of scoring, training and evaluation.", ""])
    write_json(args.out / "speed_sweep.json", r)
    write_text(args.out / "speed_sweep.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
