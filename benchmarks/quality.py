"""Selection quality on real data (issue 3): does each method's top 5% beat a random 5% of
equal tokens?

Pool: BIG-bench + GSM8K train + Alpaca from ../shared/data, contamination-checked against
the targets. Targets: MMLU, BBH, GSM8K (T capped so the run fits a 2-core CPU). For every
method and target: score, take the top `fraction`, LoRA-train SmolLM2-135M, evaluate on T;
then train on a seeded random subset with the same number of tokens and evaluate it too.
Target-independent methods (ppl) are trained once and evaluated on every target.

Every finished run is a JSON file under --work, so an interrupted benchmark resumes where it
stopped. The results go to benchmarks/results/quality.{json,md}.

    .venv/bin/python benchmarks/quality.py            # ~85 min on the 2-core CPU
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from ccds.data.formats import load_examples, write_examples
from ccds.data.pool import build_pool
from ccds.data.sources import load_target
from ccds.evaluate import EvalConfig, evaluate
from ccds.flops import Ledger
from ccds.io import read_json, write_json, write_text
from ccds.models import cache_dir, load_causal_lm, pick_runtime
from ccds.score import Context, get_method, run
from ccds.select import select
from ccds.tokenize import encode
from ccds.train import TrainConfig, train

SOURCES = [("bigbench", 600), ("gsm8k", 450), ("alpaca", 450)]
TARGETS = {"mmlu": 2, "bbh": 3, "gsm8k": 30}  # spec -> T cap (per subject/task for mmlu, bbh)
METHODS = {  # name -> (method, params); LESS with one warmup epoch = one checkpoint, for time
    "bm25": ("bm25", {}),
    "embed": ("embed", {}),
    "ppl": ("ppl", {}),
    "less": ("less", {"warmup_epochs": 1}),
    "cascade": ("cascade", {"cheap": "bm25", "expensive": "ppl", "keep": 0.2}),
}
TRAIN = TrainConfig(epochs=1, lr=2e-4, batch_tokens=2048, max_len=512)
EVAL = EvalConfig(max_new_tokens=48)
EVAL_GSM8K = EvalConfig(max_new_tokens=160)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=cache_dir() / "bench" / "quality")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    targets = {name: load_target(name, n_test=TARGETS[name]) for name in args.targets.split(",")}
    pool_path = args.work / "pool.jsonl"
    if not pool_path.exists():
        pool, report = build_pool(SOURCES, list(targets.values()), seed=args.seed)
        write_json(args.work / "pool-report.json", report)
        write_examples(pool, pool_path)
    pool = load_examples(pool_path)
    rt = pick_runtime()
    model, tok, _ = load_causal_lm(TRAIN.model)
    model.to(rt.device)
    lengths = np.array(encode(pool, tok, TRAIN.max_len).lengths)
    print(f"pool {len(pool)} examples, {lengths.sum()} tokens; targets "
          f"{', '.join(f'{k} (T={len(t.test)})' for k, t in targets.items())}", flush=True)

    def evaluate_on(m, names, ledger, label):
        return {n: evaluate(m, tok, targets[n], EVAL_GSM8K if n == "gsm8k" else EVAL,
                            runtime=rt, ledger=ledger, label=label, progress=None)
                for n in names}

    def train_run(key: str, idx: np.ndarray, names: list[str], sel_ledger: Ledger) -> dict:
        """Train on pool[idx], evaluate on `names`; cached as work/runs/<key>.json."""
        nonlocal model
        path = args.work / "runs" / f"{key}.json"
        if path.exists():
            return read_json(path)
        subset = [pool[i] for i in idx]
        ledger = Ledger()
        for s in sel_ledger.stages:
            ledger.add(s)
        res = train(subset, TRAIN.model_copy(update={"seed": args.seed}), model=model,
                    tokenizer=tok, runtime=rt, ledger=ledger, progress=None)
        ev = evaluate_on(res.model, names, ledger, key)
        model = res.model.unload()
        out = {"key": key, "n": len(idx), "tokens": int(lengths[idx].sum()),
               "sources": _count(e.source.split(":")[0] for e in subset),
               "ids": [pool[i].id for i in idx], "ledger": ledger.to_dict(), "eval": ev}
        write_json(path, out)
        print(f"  {key}: n={len(idx)} tokens={out['tokens']} "
              + " ".join(f"{n} nll={r['nll']:.3f} {r['metric']}={r['primary']:.3f}"
                         for n, r in ev.items())
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        return out

    base_path = args.work / "runs" / "base.json"
    if not base_path.exists():
        ledger = Ledger()
        write_json(base_path, {"eval": evaluate_on(model, list(targets), ledger, "base"),
                               "ledger": ledger.to_dict()})
    results = {"base": read_json(base_path), "runs": []}
    random_order = get_method("random", seed=args.seed + 1).score(pool, None, None, None)
    for label in args.methods.split(","):
        name, params = METHODS[label]
        method = get_method(name, seed=args.seed, **params)
        per_target = list(targets) if method.needs_target else [None]
        for tname in per_target:
            target = targets[tname] if tname else None
            sel = Ledger()
            scores = run(method, pool, target, ctx=Context(runtime=rt), ledger=sel,
                         cache=args.work / "scores")
            cost = method.cost(pool, target)
            idx = select(scores.values, fraction=args.fraction)
            names = [tname] if tname else list(targets)
            key = f"{label}-{tname or 'all'}"
            top = train_run(key, idx, names, sel)
            ridx = select(random_order, tokens=top["tokens"], lengths=lengths)
            rnd = train_run(f"{key}-random", ridx, names, Ledger())
            results["runs"].append({"method": label, "target": tname, "cost_estimate": cost,
                                    "selection": scores.stage.to_dict(), "top": top,
                                    "random": rnd})
    results.update(_meta(args, pool, lengths, targets, time.perf_counter() - t0))
    write_json(args.out / "quality.json", results)
    write_text(args.out / "quality.md", markdown(results))
    print(f"wrote {args.out / 'quality.md'} ({results['wall_s'] / 60:.1f} min)")
    return 0


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def _meta(args, pool, lengths, targets, wall) -> dict:
    import torch

    return {"command": "python benchmarks/quality.py " + " ".join(sys.argv[1:]),
            "date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}"
            f", {torch.get_num_threads()} threads, torch {torch.__version__}",
            "pool": {"size": len(pool), "tokens": int(lengths.sum()),
                     "sources": _count(e.source.split(":")[0] for e in pool)},
            "targets": {k: {"test": len(t.test), "val": len(t.val), "metric": t.metric}
                        for k, t in targets.items()},
            "fraction": args.fraction, "train": TRAIN.model_dump(), "wall_s": wall}


def markdown(r: dict) -> str:
    lines = ["# Selection quality on real data", "",
             f"Command: `{r['command']}` — {r['date']}, {r['machine']}, "
             f"{r['wall_s'] / 60:.0f} min.", "",
             f"Pool: {r['pool']['size']} examples ({r['pool']['tokens']} tokens) from "
             + ", ".join(f"{k} {v}" for k, v in r["pool"]["sources"].items())
             + f". Each method's top {r['fraction']:.0%} vs a seeded random subset with the "
             "same number of tokens; SmolLM2-135M, LoRA r=16, 1 epoch. T sizes: "
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
            measured = sel.get("measured_flops")
            m = f"{measured:.2e}" if measured is not None else "—"
            lines.append(
                f"| {t} | {row['method']} | {row['top']['n']} | {row['top']['tokens']} | "
                f"{sel['analytic_flops']:.2e} / {m} | {tr['analytic_flops']:.2e} | "
                f"{sel['wall_s']:.0f} | {tr['wall_s']:.0f} | "
                f"{ev['nll']:.3f} | {rv['nll']:.3f} | {ev['nll'] - rv['nll']:+.3f} | "
                f"{ev['primary']:.3f} | {rv['primary']:.3f} | "
                f"{ev['primary'] - rv['primary']:+.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
