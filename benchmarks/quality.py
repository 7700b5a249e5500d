"""Selection quality on real data (issue 3): does each method's top 5% beat a random 5% of
equal tokens?

Pool: BIG-bench + GSM8K train + Alpaca from ../shared/data, contamination-checked against
the targets. Targets: MMLU, BBH, GSM8K (T capped so the run fits a 2-core CPU). For every
method and target: score, take the top `fraction`, LoRA-train SmolLM2-135M, evaluate on T;
then train on a seeded random subset with the same number of tokens and evaluate it too.
Target-independent methods (ppl) are trained once and evaluated on every target.

Every finished run is a JSON file under --work, so an interrupted benchmark resumes where it
stopped. The results go to benchmarks/results/quality.{json,md}.

    .venv/bin/python benchmarks/quality.py            # ~2 h on the 2-core bf16 CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _runs import Runner

from ccds.data.formats import load_examples, write_examples
from ccds.data.pool import build_pool
from ccds.data.sources import load_target
from ccds.evaluate import EvalConfig
from ccds.flops import Ledger
from ccds.io import read_json, write_json, write_text
from ccds.score import Context, get_method, run
from ccds.select import select
from ccds.train import TrainConfig

SOURCES = [("bigbench", 700), ("gsm8k", 650), ("alpaca", 650)]
TARGETS = {"mmlu": 2, "bbh": 2, "gsm8k": 30}  # T cap (per subject/task for mmlu, bbh)
METHODS = {  # name -> (method, params); LESS with one warmup epoch = one checkpoint, for time
    "bm25": ("bm25", {}),
    "embed": ("embed", {}),
    "ppl": ("ppl", {}),
    "less": ("less", {"warmup_epochs": 1}),
    "cascade": ("cascade", {"cheap": "bm25", "expensive": "ppl", "keep": 0.2}),
}
TRAIN = TrainConfig(epochs=1, lr=5e-4, batch_tokens=1024, max_len=512)
EVAL = EvalConfig(max_new_tokens=48)
EVAL_GSM8K = EvalConfig(max_new_tokens=128)


def load_targets(names: list[str]) -> dict:
    """MMLU, GSM8K, and BBH's multiple-choice tasks (23 of 27): decoding on this CPU costs
    ~0.3 s a step, so BBH is scored by option likelihood and only GSM8K generates."""
    from ccds.data.sources import bbh_target, bbh_tasks, load_bbh

    out = {}
    for name in names:
        if name == "bbh":
            mc = [t for t in bbh_tasks() if all(e.choices for e in load_bbh(None, [t], limit_per_task=2))]
            out[name] = bbh_target(None, mc, n_test=TARGETS[name], name="bbh")
        else:
            out[name] = load_target(name, n_test=TARGETS[name])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / ".work" / "quality")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-only", action="store_true",
                    help="write the results of the runs finished so far, run nothing")
    args = ap.parse_args(argv)
    targets = load_targets(args.targets.split(","))
    pool_path = args.work / "pool.jsonl"
    if not pool_path.exists():
        pool, report = build_pool(SOURCES, list(targets.values()), seed=args.seed)
        write_json(args.work / "pool-report.json", report)
        write_examples(pool, pool_path)
    pool = load_examples(pool_path)
    runner = Runner(args.work, pool, targets, TRAIN, {"gsm8k": EVAL_GSM8K, "mmlu": EVAL,
                                                      "bbh": EVAL}, args.seed)
    rt, lengths = runner.rt, runner.lengths
    print(f"pool {len(pool)} examples, {lengths.sum()} tokens; targets "
          f"{', '.join(f'{k} (T={len(t.test)})' for k, t in targets.items())}", flush=True)
    results = {"base": runner.base(), "runs": []}
    random_order = get_method("random", seed=args.seed + 1).score(pool, None, None, None)
    for label in args.methods.split(","):
        name, params = METHODS[label]
        method = get_method(name, seed=args.seed, **params)
        for tname in list(targets) if method.needs_target else [None]:
            key = f"{label}-{tname or 'all'}"
            done = [args.work / "runs" / f"{k}.json" for k in (key, f"{key}-random")]
            if all(p.exists() for p in done):  # finished earlier: read, do not rescore
                top, rnd = (read_json(p) for p in done)
                selection = [s for s in top["ledger"]["stages"] if s["kind"] == "selection"][0]
            elif args.report_only:
                continue
            else:
                target = targets[tname] if tname else None
                sel = Ledger()
                scores = run(method, pool, target, ctx=Context(runtime=rt), ledger=sel,
                             cache=args.work / "scores")
                names = [tname] if tname else list(targets)
                top = runner.run(key, select(scores.values, fraction=args.fraction), names, sel)
                ridx = select(random_order, tokens=top["tokens"], lengths=lengths)
                rnd = runner.run(f"{key}-random", ridx, names, Ledger())
                selection = scores.stage.to_dict()
            results["runs"].append({"method": label, "target": tname,
                                    "cost_estimate": method.cost(pool, targets[tname] if tname
                                                                 else None),
                                    "selection": selection, "top": top, "random": rnd})
    results.update(runner.meta(fraction=args.fraction))
    if args.report_only and (args.out / "quality.json").exists():  # keep the run's own
        prev = read_json(args.out / "quality.json")
        results.update({k: prev[k] for k in ("command", "date", "wall_s")})
    write_json(args.out / "quality.json", results)
    write_text(args.out / "quality.md", markdown(results))
    print(f"wrote {args.out / 'quality.md'} ({results['wall_s'] / 60:.1f} min)")
    return 0


def markdown(r: dict) -> str:
    lines = ["# Selection quality on real data", "",
             f"Command: `{r['command']}` — {r['date']}, {r['machine']}, "
             f"{r['wall_s'] / 60:.0f} min.", "",
             f"Pool: {r['pool']['size']} examples ({r['pool']['tokens']} tokens) from "
             + ", ".join(f"{k} {v}" for k, v in r["pool"]["sources"].items())
             + f". Each method's top {r['fraction']:.0%} vs a seeded random subset with the "
             "same number of tokens; SmolLM2-135M, LoRA r=16, 1 epoch, lr 5e-4, 1024-token micro-batches. BBH: its 23 multiple-choice tasks. T sizes: "
             + ", ".join(f"{k} {v['test']} ({v['metric']})" for k, v in r["targets"].items())
             + ". Lower NLL is better; Δ = method − random.", "",
             "| target | method | n | tokens | selection FLOPs (analytic / measured) | "
             "training FLOPs | sel s | train s | T NLL | random NLL | Δ NLL | metric | "
             "random metric | Δ metric |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = r["base"]["eval"]
    for t, b in base.items():
        lines.append(f"| {t} | base model | — | — | — | — | — | — | {b['nll']:.3f} | — | — | "
                     f"{b['primary']:.3f} | — | — |")
    for row in r["runs"]:
        sel = row["selection"]
        for t, ev in row["top"]["eval"].items():
            rv = row["random"]["eval"][t]
            tr = [s for s in row["top"]["ledger"]["stages"] if s["kind"] == "training"][0]
            m = measured_cell(sel)
            lines.append(
                f"| {t} | {row['method']} | {row['top']['n']} | {row['top']['tokens']} | "
                f"{sel['analytic_flops']:.2e} / {m} | {tr['analytic_flops']:.2e} | "
                f"{sel['wall_s']:.0f} | {tr['wall_s']:.0f} | "
                f"{ev['nll']:.3f} | {rv['nll']:.3f} | {ev['nll'] - rv['nll']:+.3f} | "
                f"{ev['primary']:.3f} | {rv['primary']:.3f} | "
                f"{ev['primary'] - rv['primary']:+.3f} |")
    lines += ["", "Measured FLOPs are FlopCounterMode's count of what ran, plus work a method "
              "reused from an earlier target (LESS's warmup and pool gradients, shared by "
              "targets) and work outside torch counted where it runs (BM25's sparse products); "
              "`n/a`: a run made before BM25's count was recorded.", "",
              "Where each method beats random of equal tokens (lower T NLL; higher metric):", ""]
    for method in dict.fromkeys(row["method"] for row in r["runs"]):
        rows = [(t, ev, row["random"]["eval"][t]) for row in r["runs"]
                if row["method"] == method for t, ev in row["top"]["eval"].items()]
        nll = [f"{t} {ev['nll'] - rv['nll']:+.3f}" for t, ev, rv in rows if ev["nll"] < rv["nll"]]
        met = [f"{t} {ev['primary'] - rv['primary']:+.3f}" for t, ev, rv in rows
               if ev["primary"] > rv["primary"]]
        lines.append(f"- {method}: NLL on {', '.join(nll) or 'no target'}; metric on "
                     f"{', '.join(met) or 'no target'}")
    return "\n".join(lines) + "\n"


def measured_cell(sel: dict) -> str:
    measured = sel.get("measured_flops")
    if not measured:
        return "n/a"
    reused = sel.get("detail", {}).get("reused_flops") or 0.0
    return f"{measured + reused:.2e}" + (f" ({reused:.1e} reused)" if reused else "")


if __name__ == "__main__":
    sys.exit(main())
