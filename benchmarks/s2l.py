"""S2L against its baselines on real data (issue 4), scaled to a 2-core CPU.

Pool: GSM8K train + BIG-bench math and arithmetic tasks + Alpaca, contamination-checked
against GSM8K test. Target: GSM8K (T loss and exact match). The proxy is a small Llama
trained from scratch on the pool (S2L: Pythia-70M). SmolLM2-135M is LoRA-trained on the
subsets each method picks at 10% and 30% of the pool; S2L is also run with trajectories of
T = 3 and 6 checkpoints beside the default 12; selection cost (FLOPs, wall time) of S2L is
set beside facility location's.

    .venv/bin/python benchmarks/s2l.py       # resumable; runs kept in benchmarks/.work/s2l
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _runs import Runner

from ccds.data.composition import composition, plot_composition
from ccds.data.formats import load_examples, write_examples
from ccds.data.pool import build_pool
from ccds.data.sources import load_target
from ccds.evaluate import EvalConfig
from ccds.flops import Ledger
from ccds.io import write_json, write_text
from ccds.score import Context, get_method, run
from ccds.select import select
from ccds.train import TrainConfig

MATH = "bigbench:arithmetic,modified_arithmetic,simple_arithmetic_json,unit_conversion"
SOURCES = [("gsm8k", 400), (MATH, 400), ("alpaca", 400)]
METHODS = {  # label -> (method, params)
    "random": ("random", {}),
    "s2l": ("s2l", {}),
    "s2l-T6": ("s2l", {"checkpoints": 6}),
    "s2l-T3": ("s2l", {"checkpoints": 3}),
    "least_confidence": ("least_confidence", {}),
    "mid_ppl": ("mid_ppl", {}),
    "learnability": ("learnability", {}),
    "facility_location": ("facility_location", {}),
    "curriculum": ("curriculum", {}),
}
TRAIN = TrainConfig(epochs=1, lr=2e-4, batch_tokens=2048, max_len=512)
EVAL = EvalConfig(max_new_tokens=160)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / ".work" / "s2l")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--fractions", default="0.1,0.3")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n-test", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    target = load_target("gsm8k", n_test=args.n_test)
    pool_path = args.work / "pool.jsonl"
    if not pool_path.exists():
        pool, report = build_pool(SOURCES, [target], seed=args.seed)
        write_json(args.work / "pool-report.json", report)
        write_examples(pool, pool_path)
    pool = load_examples(pool_path)
    runner = Runner(args.work, pool, {"gsm8k": target}, TRAIN, {"gsm8k": EVAL}, args.seed)
    print(f"pool {len(pool)} examples, {runner.lengths.sum()} tokens; gsm8k T={len(target.test)}",
          flush=True)
    results = {"base": runner.base(), "runs": []}
    fractions = [float(f) for f in args.fractions.split(",")]
    subsets: dict = {}
    for label in args.methods.split(","):
        name, params = METHODS[label]
        method = get_method(name, seed=args.seed, **params)
        sel = Ledger()
        scores = run(method, pool, None, ctx=Context(runtime=runner.rt), ledger=sel,
                     cache=args.work / "scores")
        for f in fractions if not label.startswith("s2l-T") else fractions[:1]:
            idx = select(scores.values, fraction=f)
            if method.order == "given":
                idx = method.train_order(pool, idx, Context(runtime=runner.rt))
            r = runner.run(f"{label}-{f:g}", idx, ["gsm8k"], sel, order=method.order)
            if f == fractions[0] and label in ("random", "s2l", "facility_location",
                                               "learnability"):
                subsets[label] = [pool[i] for i in idx]
            results["runs"].append({"method": label, "fraction": f,
                                    "cost_estimate": method.cost(pool, None),
                                    "selection": scores.stage.to_dict(), "run": r})
    comp = composition(pool, subsets, depth=2, top=10)
    plot_composition(comp, args.out / "s2l-composition.png",
                     f"GSM8K target: what each method's {fractions[0]:.0%} is made of")
    results["composition"] = comp
    results.update(runner.meta(fractions=fractions))
    write_json(args.out / "s2l.json", results)
    write_text(args.out / "s2l.md", markdown(results))
    print(f"wrote {args.out / 's2l.md'}")
    return 0


def markdown(r: dict) -> str:
    b = r["base"]["eval"]["gsm8k"]
    lines = ["# S2L and its baselines on real data", "",
             f"Command: `{r['command']}` — {r['date']}, {r['machine']}.", "",
             f"Pool: {r['pool']['size']} examples ({r['pool']['tokens']} tokens): "
             + ", ".join(f"{k} {v}" for k, v in r["pool"]["sources"].items())
             + ". Target GSM8K, T = " + str(r["targets"]["gsm8k"]["test"]) + " test questions. "
             "SmolLM2-135M, LoRA r=16, 1 epoch on each subset. Proxy: a 2-layer, 128-wide "
             "Llama trained from scratch on the pool for 3 epochs.", "",
             f"Base model: T NLL {b['nll']:.3f}, exact match {b['primary']:.3f}.", "",
             "Selection wall time counts the proxy's training once, whichever method ran first; "
             "`proxy s` is that training, shared by every proxy-based method.", "",
             "| method | fraction | n | tokens | gsm8k share | selection FLOPs | sel s | "
             "proxy s | train s | T NLL | exact match |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["runs"]:
        run, sel = row["run"], row["selection"]
        ev = run["eval"]["gsm8k"]
        tr = [s for s in run["ledger"]["stages"] if s["kind"] == "training"][0]
        share = run["sources"].get("gsm8k", 0) / run["n"]
        lines.append(f"| {row['method']} | {row['fraction']:.0%} | {run['n']} | {run['tokens']} "
                     f"| {share:.0%} | {sel['analytic_flops']:.2e} | {sel['wall_s']:.0f} | "
                     f"{sel['detail'].get('proxy', {}).get('train_wall_s', 0):.0f} | "
                     f"{tr['wall_s']:.0f} | {ev['nll']:.3f} | {ev['primary']:.3f} |")
    s2l = next((x["selection"]["detail"] for x in r["runs"] if x["method"] == "s2l"), {})
    if "purity" in s2l:
        lines += ["", f"S2L's {s2l['clusters']} trajectory clusters: purity by source "
                  f"{s2l['purity']['depth1']:.2f} (dataset) / {s2l['purity']['depth2']:.2f} "
                  "(task); 1 = each cluster holds one source."]
    lines += ["", "![composition](s2l-composition.png)"]
    return "\n".join(lines + [""] + comparisons(r)) + "\n"


def comparisons(r: dict) -> list[str]:
    """Each method against random at the same fraction, S2L against facility location's
    cost, and S2L's result against its trajectory length: computed, not hand-written."""
    def ev(row):
        return row["run"]["eval"]["gsm8k"]

    rand = {row["fraction"]: ev(row) for row in r["runs"] if row["method"] == "random"}
    out = ["Against random of the same size (Δ T NLL: lower is better; Δ exact match: higher; "
           f"one GSM8K question is {1 / r['targets']['gsm8k']['test']:.1%} of T):", ""]
    for row in r["runs"]:
        if row["method"] != "random" and row["fraction"] in rand:
            e, base = ev(row), rand[row["fraction"]]
            out.append(f"- {row['method']} at {row['fraction']:.0%}: Δ NLL "
                       f"{e['nll'] - base['nll']:+.3f}, Δ EM {e['primary'] - base['primary']:+.3f}")
    sel = {row["method"]: row["selection"] for row in r["runs"]}
    if "s2l" in sel and "facility_location" in sel:
        a, b = sel["s2l"], sel["facility_location"]
        out += ["", f"Selection cost, S2L vs facility location: {a['analytic_flops']:.3g} vs "
                f"{b['analytic_flops']:.3g} FLOPs; the step after the shared proxy work: "
                f"{a['detail'].get('select_wall_s', float('nan')):.2f} s vs "
                f"{b['detail'].get('select_wall_s', float('nan')):.2f} s."]
    first = min(rand) if rand else None
    ts = [(row["method"], ev(row)) for row in r["runs"]
          if row["method"].startswith("s2l") and row["fraction"] == first]
    if len(ts) > 1:
        out += ["", f"S2L against trajectory length at {first:.0%}: " + ", ".join(
            f"{m} NLL {e['nll']:.3f} / EM {e['primary']:.3f}" for m, e in ts) + "."]
    return out


if __name__ == "__main__":
    sys.exit(main())
