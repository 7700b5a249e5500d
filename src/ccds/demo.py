"""`ccds demo`: the whole loop on the embedded defaults, on a laptop CPU.

generate data -> evaluate the base model -> give every selection method the same total
budget (selection + training): score, train on the best-scored examples what is left pays
for, evaluate -> print the table with the FLOPs ledger -> spend the same budget once more
with `ccds run` (pilot on V, decide, train) -> write a report folder (JSON, Markdown, plot).
A cheap method trains on more data than an expensive one; a method whose scoring alone
costs the budget is ruled out. Everything runs offline.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pydantic import BaseModel, Field

from .analyse.render import markdown_table, pyplot, save_png
from .errors import CcdsError
from .evaluate import EvalConfig, evaluate
from .flops import Ledger
from .io import write_json, write_text
from .models import load_causal_lm, pick_runtime
from .train import TrainConfig, train


class DemoConfig(BaseModel):
    out: Path = Path("demo-out")
    fraction: float = Field(0.1, gt=0, le=1, description="sizes the budget: the budget is "
                            "budget_x times what training on this fraction costs")
    budget_x: float = Field(2.0, gt=0, description="the budget, in trainings on `fraction`")
    spend: bool = Field(True, description="end with `ccds run` on the same budget")
    n_pool: int = Field(1000, ge=50)
    n_val: int = Field(8, ge=1)
    n_test: int = Field(60, ge=5)
    seed: int = 0
    model: str = "smollm2-135m"
    target: str | None = Field(None, description="synthetic target to select for")
    methods: list[str] | None = Field(None, description="default: every registered method "
                                                        "cheap enough for a demo")
    train: TrainConfig = TrainConfig(epochs=1, lr=3e-4)
    eval: EvalConfig = EvalConfig(max_new_tokens=32)
    n_test_others: int = Field(30, ge=0, description="test examples (NLL only) on the "
                                                      "targets not selected for")


# LESS and S2L train a model before scoring: minutes per method on a CPU, so not by default
DEMO_METHODS = ["random", "bm25", "embed", "ppl", "cascade"]


def run_demo(cfg: DemoConfig) -> dict:
    from rich.console import Console

    from .data.formats import write_examples
    from .data.sources import save_target
    from .data.synth import generate
    from .score import REGISTRY, Context, get_method, run
    from .spend import TrainingPrices

    console = Console(width=None if sys.stdout.isatty() else 160)  # logs keep whole rows
    t_start = time.perf_counter()
    methods = cfg.methods or [m for m in DEMO_METHODS if m in REGISTRY]
    for m in methods:
        if m not in REGISTRY:
            raise CcdsError(f"unknown selection method '{m}'", None,
                            f"choose from {', '.join(sorted(REGISTRY))}")
    pool, targets = generate(seed=cfg.seed, n_pool=cfg.n_pool, n_val=cfg.n_val,
                             n_test=cfg.n_test)
    by_name = {t.name: t for t in targets}
    if cfg.target is not None and cfg.target not in by_name:
        raise CcdsError(f"unknown demo target '{cfg.target}'", None,
                        f"choose from {', '.join(by_name)}")
    target = by_name[cfg.target] if cfg.target else targets[0]
    data_dir = cfg.out / "data"
    write_examples(pool, data_dir / "pool.jsonl")
    for t in targets:
        save_target(t, data_dir / "targets" / t.name)
    rt = pick_runtime(cfg.train.device, cfg.train.dtype)
    model, tok, ref = load_causal_lm(cfg.model, runtime=rt)
    rt.place(model)
    tcfg = cfg.train.model_copy(update={"seed": cfg.seed, "model": cfg.model})
    prices = TrainingPrices.of(pool, tcfg, tok)
    budget = cfg.budget_x * cfg.fraction * float(prices.costs.sum())
    console.print(f"[bold]ccds demo[/]: pool of {len(pool)} synthetic examples, "
                  f"{len(targets)} targets; every method gets {budget:.3g} FLOPs "
                  f"(selection + training; {cfg.budget_x:g}x training on {cfg.fraction:.0%}) "
                  f"for [bold]{target.name}[/]: {', '.join(methods)}")
    console.print(f"model {cfg.model} ({ref.fingerprint[:12]}), {rt.device.type} {rt.dtype_name}")

    others = cfg.eval.model_copy(update={"generate": False, "max_examples": cfg.n_test_others})
    evaluated = [t for t in targets if t is target or cfg.n_test_others]

    def evaluate_all(m, ledger: Ledger, label: str) -> dict:
        return {t.name: evaluate(m, tok, t, cfg.eval if t is target else others, runtime=rt,
                                 ledger=ledger, label=label) for t in evaluated}

    base_ledger = Ledger()
    baseline = evaluate_all(model, base_ledger, "base")
    console.print(f"base model evaluated in {base_ledger.total(None, 'wall_s'):.0f} s")

    runs, ruled_out = [], []
    for name in methods:
        ledger = Ledger()
        method = get_method(name, seed=cfg.seed)
        price = method.cost(pool, target)
        if price >= budget - prices.costs.min():
            ruled_out.append({"method": name, "selection_cost_estimate": price})
            console.print(f"  {name}: its selection alone costs {price:.3g} FLOPs, "
                          f"{price / budget:.1f}x the budget: ruled out")
            continue
        scores = run(method, pool, target, ctx=Context(runtime=rt), ledger=ledger, cache=None)
        left = budget - scores.stage.analytic_flops
        idx = prices.subset(scores.values, left)
        if method.order == "given":
            idx = method.train_order(pool, idx, Context(runtime=rt))
        subset = [pool[i] for i in idx]
        write_examples(subset, cfg.out / "runs" / name / "subset.jsonl")
        result = train(subset, tcfg.model_copy(update={"max_flops": left,
                                                       "order": method.order}), model=model,
                       tokenizer=tok, runtime=rt, ledger=ledger,
                       out=cfg.out / "runs" / name, progress=f"train {name}")
        evals = evaluate_all(result.model, ledger, name)
        model = result.model.unload()  # drop the adapter: the next method starts from base
        write_json(cfg.out / "runs" / name / "ledger.json", ledger.to_dict())
        on_target = sum(e.source in target.subtasks for e in subset)
        runs.append({"method": name, "selected": len(idx), "on_target": on_target,
                     "selection_cost_estimate": method.cost(pool, target),
                     "train_tokens": result.tokens, "losses": result.losses,
                     "ledger": ledger.to_dict(), "eval": evals})
        r = evals[target.name]
        console.print(f"  {name}: {on_target}/{len(idx)} selected from the target's "
                      f"families; {target.name} nll {baseline[target.name]['nll']:.3f} -> "
                      f"{r['nll']:.3f}")
    spent = None
    if cfg.spend:  # the same budget, spent by ccds run's own decision
        from .spend import RunConfig, run_budget

        console.print(f"[bold]ccds run[/] on the same {budget:.3g} FLOPs:")
        rep = run_budget(RunConfig(
            pool=str(data_dir / "pool.jsonl"), target=str(data_dir / "targets" / target.name),
            budget=budget, methods=[m for m in methods if m not in
                                    {r["method"] for r in ruled_out}],
            train=tcfg, eval=cfg.eval.model_copy(update={"generate": False}), seed=cfg.seed,
            out=cfg.out / "run"), log=lambda line: console.print(f"  {line}"))
        spent = {"method": rep["decision"]["method"], "examples": rep["final"]["examples"],
                 "reason": rep["decision"]["reason"], "arms": len(rep["decision"]["arms"]),
                 "charged": rep["charged_flops"], "nll": rep["final"]["T"]["nll"],
                 "spent_by_kind": rep["spent_by_kind"]}
    report = {"config": cfg.model_dump(mode="json"), "model": ref.fingerprint,
              "runtime": {"device": rt.device.type, "dtype": rt.dtype_name},
              "target": target.name, "targets": [t.name for t in evaluated],
              "pool_size": len(pool), "budget": budget, "baseline": baseline,
              "baseline_ledger": base_ledger.to_dict(), "runs": runs,
              "ruled_out": ruled_out, "run": spent,
              "wall_s": time.perf_counter() - t_start}
    console.print(demo_table(report))
    write_demo_report(report, cfg.out)
    console.print(f"report: {cfg.out / 'report.md'}, {cfg.out / 'report.json'}, "
                  f"{cfg.out / 'demo.png'}  ({report['wall_s'] / 60:.1f} min)")
    return report


# The report run_demo prints and writes: a terminal table, report.md and demo.png.


def _fmt_flops(x: float | None) -> str:
    return "—" if x is None else ("0" if x == 0 else f"{x:.2e}")


def _metric(r: dict) -> str:
    v = r.get("primary")
    if v is None or r["metric"] == "nll":
        return "—"
    return f"{v:.2f}"


def demo_rows(report: dict) -> list[dict]:
    """One row per method (plus the base model) with the numbers the table shows."""
    target = report["target"]
    others = [t for t in report["targets"] if t != target]
    base = report["baseline"]
    rows = [{"method": "base model", "selected": "—", "sel": None, "train": None, "total": None,
             "eval": report["baseline_ledger"]["totals"]["evaluation"]["analytic_flops"],
             "sel_s": None, "train_s": None, "nll": base[target]["nll"],
             "metric": _metric(base[target]),
             "others": sum(base[t]["nll"] for t in others) / max(len(others), 1)}]
    for run in report["runs"]:
        tot = run["ledger"]["totals"]
        ev = run["eval"]
        sel, tr = tot["selection"]["analytic_flops"], tot["training"]["analytic_flops"]
        rows.append({"method": run["method"], "selected": f"{run['selected']} "
                     f"({run['on_target']} on-task)", "sel": sel, "train": tr,
                     "total": sel + tr, "eval": tot["evaluation"]["analytic_flops"],
                     "sel_s": tot["selection"]["wall_s"], "train_s": tot["training"]["wall_s"],
                     "nll": ev[target]["nll"], "metric": _metric(ev[target]),
                     "others": sum(ev[t]["nll"] for t in others) / max(len(others), 1)})
    if report.get("run"):
        r = report["run"]
        k = r["spent_by_kind"]
        rows.append({"method": f"ccds run: {r['method']}", "selected": f"{r['examples']} "
                     f"({r['arms']} pilot arms)", "sel": k["selection"], "train": k["training"],
                     "total": k["selection"] + k["training"], "eval": k["evaluation"],
                     "sel_s": None, "train_s": None, "nll": r["nll"], "metric": "—",
                     "others": None})
    return rows


HEADERS = ["method", "selected", "selection FLOPs", "training FLOPs", "sel+train FLOPs",
           "eval FLOPs", "sel s", "train s", "target NLL", "target metric", "other NLL"]


def _cells(r: dict) -> list[str]:
    def sec(x):
        return ("—" if x is None else f"{x:.0f}")
    return [r["method"], r["selected"], _fmt_flops(r["sel"]), _fmt_flops(r["train"]),
            _fmt_flops(r["total"]), _fmt_flops(r["eval"]), sec(r["sel_s"]), sec(r["train_s"]),
            f"{r['nll']:.3f}", r["metric"],
            "—" if r["others"] is None else f"{r['others']:.3f}"]


def demo_table(report: dict):
    from rich.table import Table

    t = Table(title=f"ccds demo — selecting for {report['target']} "
                    f"(FLOPs: ccds analytic convention)")
    for h in HEADERS:
        t.add_column(h, justify="left" if h in ("method", "selected") else "right")
    for r in demo_rows(report):
        t.add_row(*_cells(r))
    return t


def write_demo_report(report: dict, out: Path) -> None:
    write_json(out / "report.json", report)
    rows = demo_rows(report)
    cfg = report["config"]
    md = ["# ccds demo\n",
          f"Pool: {report['pool_size']} synthetic examples; every method gets the same "
          f"{report['budget']:.3g} FLOPs for selection + training on **{report['target']}** "
          f"({cfg['budget_x']:g}x training on {cfg['fraction']:.0%}); model {cfg['model']} with "
          f"LoRA on {report['runtime']['device']} ({report['runtime']['dtype']}); "
          f"whole run {report['wall_s'] / 60:.1f} min.\n",
          markdown_table(HEADERS, [_cells(r) for r in rows]), "",
          *[f"{r['method']}: ruled out, its selection alone costs "
            f"{r['selection_cost_estimate']:.3g} FLOPs.\n" for r in report["ruled_out"]],
          *([f"**ccds run** on the same budget chose {report['run']['method']} "
             f"({report['run']['arms']} pilot arms; {report['run']['reason']}) and trained on "
             f"{report['run']['examples']} examples, charging {report['run']['charged']:.3g} "
             f"FLOPs in all: target NLL {report['run']['nll']:.3f}. Its report: run/report.md."
             "\n"] if report.get("run") else []),
          "target NLL: mean response NLL on the target's test set (lower is better); "
          "target metric: its accuracy or exact match; other NLL: mean NLL over the other "
          "targets. FLOPs use the ccds analytic convention (see `ccds.flops`); every ledger "
          "also holds the measured count and the paper's 6·N·T convention.\n",
          "![demo](demo.png)\n"]
    write_text(out / "report.md", "\n".join(md))
    plot_demo(rows, report, out / "demo.png")


def plot_demo(rows: list[dict], report: dict, path: Path) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["method"] for r in rows]
    a.bar(names, [r["nll"] for r in rows], color=["#999"] + ["#3b7dd8"] * (len(rows) - 1))
    a.set_ylabel(f"NLL on {report['target']} test (lower is better)")
    a.set_title("target loss after LoRA on the selected subset")
    runs = [r for r in rows[1:] if r["others"] is not None]  # the methods, not ccds run
    sel = [r["sel"] or 0 for r in runs]
    tr = [r["train"] or 0 for r in runs]
    xs = [r["method"] for r in runs]
    b.bar(xs, tr, label="training", color="#3b7dd8")
    b.bar(xs, sel, bottom=tr, label="selection", color="#e8833a")
    b.set_ylabel("FLOPs")
    b.axhline(report["budget"], color="#444", ls="--", lw=1, label="budget")
    b.set_title("compute spent: selection + training")
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    save_png(fig, path, dpi=120)
