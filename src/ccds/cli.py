"""The `ccds` command line. Every command is a thin layer over the Python API.

Bad input raises CcdsError anywhere below; `main` prints it as one line and exits 2.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from .data.formats import SubsetFormat
from .errors import CcdsError
from .io import load_config as _config
from .io import parse_params as _params
from .price import Unit

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compute-constrained data selection: score a pool against a target, "
                       "select, LoRA-train, evaluate — with every FLOP accounted for.")
sweep_app = typer.Typer(no_args_is_help=True, help="Run a grid of selection + training runs.")
app.add_typer(sweep_app, name="sweep")
data_app = typer.Typer(no_args_is_help=True, help="Build and inspect pools and targets.")
app.add_typer(data_app, name="data")

Opt = typer.Option
Dtype = Literal["auto", "fp32", "bf16", "fp16"]


def _load_pool(pool: str):
    from .data.formats import load_examples

    return load_examples(pool)


def _load_target(spec: str, n_test: int | None = None):
    from .data.sources import load_target

    return load_target(spec, n_test=n_test)


# -- data ----------------------------------------------------------------------------------

@data_app.command("synth")
def data_synth(out: Annotated[Path, Opt(help="output folder")] = Path("synth-data"),
               seed: Annotated[int, Opt()] = 0,
               n_pool: Annotated[int, Opt(min=1)] = 2000,
               n_val: Annotated[int, Opt(min=1)] = 8,
               n_test: Annotated[int, Opt(min=1)] = 100):
    """Generate the procedural multi-task pool and targets (no network needed)."""
    from .data.formats import write_examples
    from .data.sources import save_target
    from .data.synth import generate

    pool, targets = generate(seed=seed, n_pool=n_pool, n_val=n_val, n_test=n_test)
    write_examples(pool, out / "pool.jsonl")
    for t in targets:
        save_target(t, out / "targets" / t.name)
    typer.echo(f"wrote {len(pool)} pool examples to {out / 'pool.jsonl'} and "
               f"{len(targets)} targets to {out / 'targets'}: {', '.join(t.name for t in targets)}")


@data_app.command("build-pool")
def data_build_pool(
        source: Annotated[list[str], Opt(help="SPEC[@CAP], e.g. bigbench@3000, gsm8k@1000, "
                                             "alpaca, or a file/folder/hub id")],
        out: Annotated[Path, Opt(help="pool file (.jsonl/.parquet) or HF dataset folder")],
        target: Annotated[list[str] | None, Opt(help="targets to check contamination "
                                                     "against, e.g. mmlu, bbh, gsm8k")] = None,
        seed: Annotated[int, Opt()] = 0,
        ngram: Annotated[int, Opt(min=1, help="n-gram length for near duplicates")] = 8,
        threshold: Annotated[float, Opt(min=0.0, max=1.0, help="near-duplicate overlap")] = 0.5,
        report: Annotated[Path | None, Opt(help="JSON report path")] = None):
    """Assemble a pool from sources with per-source caps; drop target contamination."""
    from .data.formats import write_examples
    from .data.pool import build_pool
    from .io import write_json

    specs = []
    for s in source:
        spec, at, cap = s.rpartition("@") if "@" in s else (s, "", "")
        if at and not cap.isdigit():
            raise CcdsError(f"bad cap in --source {s!r}", None, "use SPEC@N with N a count")
        specs.append((spec, int(cap) if at else None))
    targets = [_load_target(t) for t in target or []]
    exclude = [e.id for t in targets for e in t.val]  # V held out of the pool (GSM8K)
    pool, rep = build_pool(specs, targets, seed=seed, ngram=ngram,
                           near_dup_threshold=threshold, exclude_ids=exclude)
    write_examples(pool, out)
    write_json(report or out.with_suffix(".report.json"), rep)
    typer.echo(f"pool: {len(pool)} examples -> {out}")
    for spec, st in rep["sources"].items():
        typer.echo(f"  {spec}: loaded {st['loaded']}, kept {st['kept']} (duplicate "
                   f"{st['duplicate']}, contaminated {st['contaminated']}, capped {st['capped']})")
    for name, splits in rep["contamination"].items():
        for split, c in splits.items():
            if c["exact"] or c["near"]:
                typer.echo(f"  dropped vs {name} {split}: {c['exact']} exact, {c['near']} near")


@data_app.command("stats")
def data_stats(pool: Annotated[str, typer.Argument(help="pool file, folder or hub id")]):
    """Size and source mix of a pool."""
    from collections import Counter

    examples = _load_pool(pool)
    counts = Counter(e.source for e in examples)
    words = sum(len(e.prompt.split()) + len(e.response.split()) for e in examples)
    typer.echo(f"{len(examples)} examples, {words:,} words, {len(counts)} sources")
    for src, n in counts.most_common(20):
        typer.echo(f"  {n:7d}  {src}")


# -- score / select / cost ----------------------------------------------------------------

# The registered selection methods (ccds.score.REGISTRY), named here because importing the
# methods imports torch, which would make every --help slow; a test keeps them equal.
METHODS = ("random", "bm25", "dsir", "embed", "ppl", "less", "cascade", "s2l",
           "least_confidence", "mid_ppl", "learnability", "facility_location", "curriculum")
MethodOpt = Annotated[str, Opt(help=f"selection method: {', '.join(METHODS)}")]
FORMAT_HELP = ("layout of the subset: ccds (the --out suffix picks .jsonl, .parquet or a "
               "HF folder), messages (chat JSONL: TRL, open-instruct), prompt-completion "
               "(TRL), alpaca or sharegpt (.json, with a LLaMA-Factory dataset_info.json "
               "entry beside it)")
ParamOpt = Annotated[list[str] | None, Opt(help="method parameter name=value (repeatable)")]


@data_app.command("compare")
def data_compare(
        pool: Annotated[str, Opt(help="the pool the subsets came from")],
        subset: Annotated[list[str], Opt(help="NAME=PATH of a selected subset (repeatable)")],
        out: Annotated[Path, Opt(help="figure (.png/.svg); a .json with the numbers beside it")],
        depth: Annotated[int, Opt(min=1, help="source levels: 1 = dataset, 2 = task")] = 1,
        top: Annotated[int, Opt(min=1, help="groups shown; the rest are 'other'")] = 12):
    """Source composition of selected subsets against the pool (a table and a plot)."""
    from .data.composition import composition, plot_composition
    from .io import write_json

    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise CcdsError(f"cannot draw a {out.suffix or 'suffix-less'} figure", str(out),
                        "name it .png, .svg or .pdf")
    subsets = {}
    for item in subset:
        name, eq, path = item.partition("=")
        if not eq:
            name, path = Path(item).stem, item
        subsets[name] = _load_pool(path)
    comp = composition(_load_pool(pool), subsets, depth, top)
    plot_composition(comp, out)
    write_json(out.with_suffix(".json"), comp)
    names = ["pool", *subsets]
    typer.echo("group".ljust(40) + "".join(n[:12].rjust(13) for n in names))
    for g in comp["groups"]:
        row = [comp["pool"][g], *(comp["subsets"][n][g] for n in subsets)]
        typer.echo(g[:39].ljust(40) + "".join(f"{100 * v:12.1f}%" for v in row))
    typer.echo(f"plot -> {out}")


def _score(pool: str, method: str, target: str | None, param: list[str] | None, seed: int,
           backend=None):
    from .score import Context, get_method, run

    examples = _load_pool(pool)
    m = get_method(method, **{"seed": seed, **_params(param)})
    tgt = _load_target(target) if target else None
    ctx = Context(backend=backend) if backend is not None else None
    return examples, run(m, examples, tgt, ctx=ctx), m


BackendOpt = Annotated[Literal["local", "ray"], Opt(help="where per-example passes run")]
AddressOpt = Annotated[str | None, Opt(help="Ray cluster address (default: start Ray here)")]
ShardOpt = Annotated[int, Opt(help="rows per Ray shard (the unit of resume)")]
ActorsOpt = Annotated[int, Opt(help="Ray actors, each with its own model")]


def _backend(kind: str, address: str | None, shard_size: int, concurrency: int,
             work: Path | None):
    from .score.base import Backend

    return _config(Backend, None, dict(kind=kind, address=address, shard_size=shard_size,
                                       concurrency=concurrency, work=work))


@app.command("score")
def score_cmd(pool: Annotated[str, Opt(help="pool: .jsonl/.json/.parquet/HF folder or hub id")],
              out: Annotated[Path, Opt(help="scores file (.parquet)")],
              method: MethodOpt = "random",
              target: Annotated[str | None, Opt(help="target spec or folder")] = None,
              param: ParamOpt = None, seed: Annotated[int, Opt()] = 0,
              backend: BackendOpt = "local", address: AddressOpt = None,
              shard_size: ShardOpt = 1024, concurrency: ActorsOpt = 1,
              work: Annotated[Path | None, Opt(help="Ray shard folder, on storage every "
                                                    "node reads (default: the ccds cache)")]
              = None):
    """Score every pool example (higher = select first); write id, score to Parquet."""
    from .score.base import write_scores

    examples, scores, _ = _score(pool, method, target, param, seed,
                                 _backend(backend, address, shard_size, concurrency, work))
    write_scores(out, scores)
    st = scores.stage
    typer.echo(f"{method}: scored {len(examples)} examples -> {out} ({st.analytic_flops:.3e} "
               f"FLOPs analytic, {st.measured_flops or 0:.3e} measured, {st.wall_s:.1f} s"
               f"{', cached' if scores.cached else ''})")


@app.command("select")
def select_cmd(
        pool: Annotated[str, Opt(help="pool: .jsonl/.json/.parquet/HF folder or hub id")],
        out: Annotated[Path, Opt(help="subset: .jsonl, .parquet or a HF dataset folder "
                                      "(--format ccds), else .jsonl or .json")],
        method: Annotated[str | None, Opt(help=f"selection method: {', '.join(METHODS)} "
                                               "(default: random, or the --scores' method)")]
        = None,
        target: Annotated[str | None, Opt(help="target spec or folder")] = None,
        scores: Annotated[Path | None, Opt(help="use a scores file from `ccds score` (with "
                                                "the same --param and --seed)")] = None,
        fraction: Annotated[float | None, Opt(help="fraction of the pool, in (0, 1]")] = None,
        count: Annotated[int | None, Opt(help="number of examples")] = None,
        tokens: Annotated[int | None, Opt(help="training-token budget")] = None,
        flops: Annotated[float | None, Opt(help="FLOPs budget for selection + LoRA training "
                                                "of --model (one epoch)")] = None,
        param: ParamOpt = None,
        seed: Annotated[int, Opt()] = 0,
        model: Annotated[str, Opt(help="tokenizer for --tokens")] = "smollm2-135m",
        fmt: Annotated[SubsetFormat, Opt("--format", help=FORMAT_HELP)] = "ccds"):
    """Score the pool with a method (or read scores) and write the selected subset, with a
    <stem>.selection.json beside it: ids, scores, method, parameters and the pool's hash."""
    from .data.formats import check_subset_path, write_subset
    from .score import REGISTRY, Context, get_method
    from .score.base import scores_for, selection_record
    from .select import select
    from .train import TrainConfig, training_cost

    if sum(x is not None for x in (fraction, count, tokens, flops)) != 1:
        raise CcdsError("give exactly one of --fraction, --count, --tokens or --flops")
    if fraction is not None and not 0 < fraction <= 1:
        raise CcdsError(f"--fraction {fraction} is outside (0, 1]", None, "e.g. --fraction 0.05")
    check_subset_path(out, fmt)
    if scores is not None:
        examples = _load_pool(pool)
        sc = scores_for(scores, examples, method)
        # the method itself, for its training order (a curriculum's); none for scores that
        # another program wrote under its own name
        m = (get_method(sc.method, **{"seed": seed, **_params(param)})
             if sc.method in REGISTRY else None)
    else:
        examples, sc, m = _score(pool, method or "random", target, param, seed)
    cost = (training_cost(examples, TrainConfig(model=model))
            if tokens is not None or flops is not None else None)
    idx = select(sc.values, fraction=fraction, count=count, tokens=tokens,
                 lengths=cost.lengths if cost else None, flops=flops,
                 flops_per_token=cost.per_token if cost else None,
                 selection_flops=sc.stage.analytic_flops)
    if m is not None and m.order == "given":
        idx = m.train_order(examples, idx, Context())
    budget = dict(fraction=fraction, count=count, tokens=tokens, flops=flops,
                  model=model if cost is not None else None)
    side = write_subset([examples[i] for i in idx], out, fmt, sidecar=selection_record(
        sc, examples, idx, m, pool=pool, target=target, budget=budget,
        scores_file=None if scores is None else str(scores)))
    typer.echo(f"{sc.method}: selected {len(idx)} of {len(examples)} -> {out} "
               f"(selection {sc.stage.analytic_flops:.3e} FLOPs, "
               f"{sc.stage.wall_s:.1f} s{', cached' if sc.cached else ''}; ids and scores in "
               f"{side.name})")
    if m is not None and m.order == "given":
        typer.echo("the subset is written in curriculum order: train with --order given")


@app.command("cost")
def cost_cmd(pool: Annotated[str, Opt(help="pool: .jsonl/.json/.parquet/HF folder or hub id")],
             target: Annotated[str | None, Opt(help="target spec or folder")] = None,
             method: Annotated[list[str] | None, Opt(help="methods to price (default: all "
                                                          "with default parameters)")] = None,
             train_model: Annotated[str, Opt(help="model to be fine-tuned")] = "smollm2-135m",
             fractions: Annotated[str, Opt(help="comma-separated")] = "0.025,0.05,0.1,0.25,0.5,1",
             epochs: Annotated[float, Opt()] = 1.0,
             device: Annotated[Literal["h100", "h200", "a100"] | None,
                               Opt(help="also price each stage in hours of this GPU at its "
                                        "dense bf16 peak")] = None,
             mfu: Annotated[float | None, Opt(help="model FLOPs utilisation in (0, 1] for "
                                                   "--device (default: what benchmarks/gpu.py "
                                                   "measured for the stage, else 0.40)")] = None,
             gpu_results: Annotated[Path | None, Opt(help="benchmarks/gpu.py results with the "
                                                          "measured MFU (default: this "
                                                          "checkout's benchmarks/results/"
                                                          "gpu.json, if there)")] = None):
    """Price selection and training in FLOPs (and GPU-hours with --device) without running
    anything."""
    from rich.console import Console
    from rich.table import Table

    from .price import cost_rows, gpu_rate

    try:
        fr = [float(x) for x in fractions.split(",") if x.strip()]
    except ValueError:
        raise CcdsError(f"--fractions {fractions!r} is not a comma-separated list of numbers",
                        None, "e.g. --fractions 0.05,0.1,1") from None
    rate = gpu_rate(device, mfu, gpu_results, n_params=train_model)
    tgt = _load_target(target) if target else None
    priced = cost_rows(_load_pool(pool), tgt, method, train_model, fr, epochs, rate)
    table = Table(title=priced.title)
    table.add_column("stage")
    table.add_column("FLOPs (ccds)", justify="right")
    table.add_column("FLOPs (paper 6·N·T)", justify="right")
    if priced.hours_column:
        table.add_column(priced.hours_column, justify="right")
    for row in priced.rows:
        cells = [row.stage, "needs --target" if row.flops is None else f"{row.flops:.3e}",
                 "" if row.paper is None else f"{row.paper:.3e}"]
        if priced.hours_column:
            cells.append("" if row.hours is None else f"{row.hours:.3g}")
        table.add_row(*cells)
    Console(width=None if sys.stdout.isatty() else 120).print(table)


@sweep_app.command("run")
def sweep_run(config: Annotated[Path, typer.Argument(help="sweep YAML (see ccds.sweep)")],
              out: Annotated[Path | None, Opt(help="output folder (overrides the config)")] = None):
    """Run every (model × target × method × seed × fraction); resumable, safe to kill."""
    from .sweep import SweepConfig, run_sweep

    cfg = _config(SweepConfig, config, {"out": out})
    path = run_sweep(cfg, log=typer.echo)
    typer.echo(f"run store: {path}; next: ccds analyze {cfg.out}")


@app.command("analyze")
def analyze_cmd(runs: Annotated[Path, typer.Argument(help="sweep output folder, a "
                                                     ".csv/.jsonl of runs made anywhere "
                                                     "(see ccds.analyse.points), or a "
                                                     "manifest (.yaml/.json, or a folder "
                                                     "holding ccds-runs.yaml) of Trainer runs "
                                                     "and lm-eval results (see "
                                                     "ccds.analyse.stacks)")],
                out: Annotated[Path | None, Opt(help="report folder (default RUNS/report; "
                                                     "for a file, NAME-report here)")]
                = None,
                where: Annotated[list[str] | None, Opt(help="COLUMN=VALUE: only the points "
                                                           "file's (or manifest's) runs with "
                                                           "it (repeatable)")]
                = None,
                share: Annotated[Literal["none", "pbar", "pbar_p0"],
                                 Opt(help="fit parameters shared by the methods")] = "pbar",
                convention: Annotated[Literal["ccds", "paper"], Opt(help="FLOPs convention")]
                = "ccds",
                bootstrap: Annotated[int, Opt(min=0, help="bootstrap resamples")] = 200,
                p0: Annotated[Literal["measured", "fit"],
                              Opt(help="measured: P0 = the sweep's zero-shot run")]
                = "measured"):
    """Fit P(C) per method, draw frontiers, find break-even ratios, write the report."""
    from .analyse.render import run_label
    from .analyse.runs import analyze

    if out is None:
        out = runs / "report" if runs.is_dir() else Path(f"{runs.stem}-report")
    filters = {}
    for item in where or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise CcdsError(f"bad --where {item!r}", None, "use --where COLUMN=VALUE")
        filters[key.strip()] = value
    report = analyze(runs, out, share=share, convention=convention, bootstrap=bootstrap, p0=p0,
                     where=filters)
    for g in report["groups"]:
        fr = ", ".join(map(run_label, g["frontier"]))
        typer.echo(f"{g['target']} / {g['model']}: {g['runs']} runs; frontier: {fr}")
        if g["fit_error"]:
            typer.echo(f"  fit: {g['fit_error']}")
    for c in report.get("trainer_total_flos", []):
        ratio = c["total_flos_ratio"]
        typer.echo(f"  {c['run']} ({c['trainer_dir']}): {c['tokens']:,} tokens, training "
                   f"{c['training_flops']:.3e} FLOPs ccds ({c['training']}; 6·N·T "
                   f"{c['training_paper_flops']:.3e}), Trainer total_flos "
                   f"{c['trainer_total_flos'] or 0:.3e}"
                   + (f" ({ratio:.3g}x ccds's; not used)" if ratio is not None else
                      " (not used)"))
    typer.echo(f"report: {out / 'report.html'}, {out / 'report.md'}, {out / 'fits.json'}")


@app.command("plan")
def plan_cmd(budget: Annotated[float, Opt(help="total compute for selection + training, in "
                                              "--unit")],
             unit: Annotated[Unit, Opt(help="of --budget; gpu-hours and hours need --device "
                                             "(a plan measures nothing: its hours are hours "
                                             "of that GPU, as gpu-hours)")] = "flops",
             device: Annotated[Literal["h100", "h200", "a100"] | None,
                               Opt(help="GPU that hours are counted on (as `ccds cost`)")]
             = None,
             mfu: Annotated[float | None, Opt(help="model FLOPs utilisation in (0, 1] (default: "
                                                   "benchmarks/gpu.py's, else 0.40)")] = None,
             train_model: Annotated[str | None, Opt(help="model to fine-tune: name or size "
                                                         "(7B, 1.5B, 135M, 7e9)")] = None,
             selection_model: Annotated[str | None, Opt(help="model that scores: name or "
                                                             "size")] = None,
             pool_tokens: Annotated[str | None, Opt(help="tokens in the pool (1e8, 100M)")]
             = None,
             tasks: Annotated[int, Opt(min=1, help="target tasks sharing one selection")] = 1,
             fits: Annotated[Path | None, Opt(help="fits.json from `ccds analyze`")] = None,
             pilot: Annotated[Path | None, Opt(help="sweep YAML: run its two smallest "
                                                    "fractions, fit, and plan from that")] = None,
             prior: Annotated[Literal["paper"], Opt(help="curves when no --fits/--pilot")]
             = "paper"):
    """Recommend a method and fraction for a compute budget, with the predicted result."""
    from .plan import PAPER_PRIOR, explain, from_fits, model_size, paper_prior, parse_count, plan
    from .price import budget_flops, check_budget, describe_budget, gpu_rate, hours_of

    c_full_k = 6.0
    defaults: dict = {}
    check_budget(budget, unit, device, mfu)  # before a pilot spends anything
    if pilot is not None:
        from .sweep import SweepConfig, run_pilot

        p = run_pilot(_config(SweepConfig, pilot), log=typer.echo)
        fits, defaults = p.fits, {"--train-model": p.train_params,
                                  "--selection-model": p.selection_params,
                                  "--pool-tokens": p.pool_tokens}
    missing = [n for n, v in (("--train-model", train_model), ("--selection-model",
               selection_model), ("--pool-tokens", pool_tokens)) if v is None
               and n not in defaults]
    if missing:
        raise CcdsError(f"missing {', '.join(missing)}", None, "give them (or use --pilot)")
    n_train = model_size(train_model) if train_model else defaults["--train-model"]
    n_sel = model_size(selection_model) if selection_model else defaults["--selection-model"]
    n_tokens = (parse_count(pool_tokens, "--pool-tokens") if pool_tokens
                else defaults["--pool-tokens"])
    rate = gpu_rate(device, mfu, n_params=n_train)  # a plan measures nothing: hours are a GPU's
    flops = budget_flops(budget, unit, rate)
    if fits is not None:
        models, c_full_k = from_fits(fits)
        source = f"fits from {fits}"
    else:
        models, source = paper_prior(n_train), PAPER_PRIOR["source"]
    options, out = plan(flops, n_train, n_sel, n_tokens, models, tasks, c_full_k)
    typer.echo(f"budget {describe_budget(budget, unit, rate)}; training {n_train:.3g} params, "
               f"selection {n_sel:.3g}, pool {n_tokens:.3g} tokens, {tasks} task(s)")
    typer.echo(f"{'method':<18}{'fraction':>9}{'selection':>12}{'training':>12}{'total':>12}"
               + (f"{'GPU-h':>9}" if rate else "")
               + (f"{'gain share':>11}" if options and options[0].relative else f"{'predicted':>11}"))
    for o in options:
        iv = f" [{o.interval[0]:.2f}, {o.interval[1]:.2f}]" if o.interval else ""
        gpu_h = f"{hours_of(o.total, rate):>9.3g}" if rate else ""
        typer.echo(f"{o.method:<18}{o.fraction:>9.1%}{o.selection_flops:>12.3g}"
                   f"{o.training_flops:>12.3g}{o.total:>12.3g}{gpu_h}{o.predicted:>11.2f}{iv}")
    for m, why in out:
        typer.echo(f"{m:<18}ruled out: {why}")
    typer.echo("")
    typer.echo(explain(options, out, flops, c_full_k * n_train * n_tokens, tasks, source))


@app.command("run")
def run_cmd(pool: Annotated[str, Opt(help="pool: .jsonl/.json/.parquet/HF folder or hub id")],
            target: Annotated[str, Opt(help="target spec or folder (needs V to decide on)")],
            budget: Annotated[float, Opt(help="everything selection and training may spend, "
                                              "in --unit")],
            out: Annotated[Path, Opt(help="run folder: pieces, final adapter, report")],
            model: Annotated[str | None, Opt(help="model to fine-tune (default: the config's, "
                                                  "else smollm2-135m)")] = None,
            unit: Annotated[Unit | None, Opt(help="of --budget (default flops); gpu-hours "
                                                  "needs --device")] = None,
            device: Annotated[Literal["h100", "h200", "a100"] | None,
                              Opt(help="GPU that hours are counted on")] = None,
            mfu: Annotated[float | None, Opt(help="MFU for --device (default: measured, "
                                                  "else 0.40)")] = None,
            selection_model: Annotated[str | None, Opt(help="model that scores (ppl, LESS); "
                                                            "default --model")] = None,
            method: Annotated[list[str] | None, Opt(help="methods to consider (repeatable; "
                                                         "default random, bm25, dsir, embed, "
                                                         "ppl)")] = None,
            strategy: Annotated[Literal["adaptive", "plan"] | None,
                                Opt(help="adaptive (default): pilot on V, then decide; plan: "
                                         "execute `ccds plan`'s pick")] = None,
            fits: Annotated[Path | None, Opt(help="fits.json from `ccds analyze` as the "
                                                  "prior (default: the paper's)")] = None,
            pilot_share: Annotated[float | None, Opt(help="most of the budget the pilot may "
                                                          "spend (default 0.15)")] = None,
            config: Annotated[Path | None, Opt(help="YAML with train/eval settings "
                                                    "(ccds.spend.RunConfig)")] = None,
            fmt: Annotated[SubsetFormat | None, Opt(
                "--format", help="the selected subset's file in OUT: ccds, messages, prompt-completion, "
                     "alpaca or sharegpt (default ccds)")] = None,
            seed: Annotated[int | None, Opt(help="default 0")] = None):
    """Spend one budget end to end: pilot on V, decide, select and train, with every FLOP
    charged (never over the budget); resumable."""
    from .spend import RunConfig, run_budget

    given = dict(pool=pool, target=target, budget=budget, unit=unit, device=device, mfu=mfu,
                 selection_model=selection_model, strategy=strategy, fits=fits,
                 pilot_share=pilot_share, seed=seed, out=out, format=fmt)
    if method:
        given["methods"] = method
    cfg = _config(RunConfig, config, given)
    if model is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"model": model})})
    run_budget(cfg, log=typer.echo)


# -- train / eval --------------------------------------------------------------------------

@app.command("train")
def train_cmd(
        data: Annotated[str, Opt(help="training subset (.jsonl/.json/.parquet/HF folder)")],
        out: Annotated[Path, Opt(help="run folder: adapter, checkpoints, ledger")],
        config: Annotated[Path | None, Opt(help="YAML with TrainConfig settings")] = None,
        model: Annotated[str | None, Opt(help="alias, local folder or hub id")] = None,
        epochs: Annotated[float | None, Opt()] = None,
        max_tokens: Annotated[int | None, Opt(help="token budget")] = None,
        lr: Annotated[float | None, Opt()] = None,
        lora_r: Annotated[int | None, Opt()] = None,
        grad_accum: Annotated[int | None, Opt()] = None,
        checkpoints: Annotated[int | None, Opt(help="evenly spaced checkpoints to keep")] = None,
        order: Annotated[Literal["shuffle", "given"] | None,
                         Opt(help="given: a curriculum's order")] = None,
        seed: Annotated[int | None, Opt()] = None,
        dtype: Annotated[Dtype | None, Opt()] = None):
    """LoRA-fine-tune a model on a subset; writes the adapter and a FLOPs ledger."""
    from .flops import Ledger
    from .io import write_json
    from .train import TrainConfig, train

    cfg = _config(TrainConfig, config, dict(model=model, epochs=epochs, max_tokens=max_tokens,
                                            lr=lr, lora_r=lora_r, grad_accum=grad_accum,
                                            checkpoints=checkpoints, order=order, seed=seed,
                                            dtype=dtype))
    examples = _load_pool(data)
    ledger = Ledger()
    r = train(examples, cfg, out=out, ledger=ledger)
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate/torchrun: rank 0 reports
        return
    write_json(out / "ledger.json", ledger.to_dict())
    st = ledger.stages[-1]
    typer.echo(f"trained {r.steps} steps on {r.tokens:,} tokens in {st.wall_s:.1f} s; "
               f"loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f}; "
               f"{st.analytic_flops:.3e} FLOPs (measured {st.measured_flops or 0:.3e}); "
               f"adapter -> {out / 'adapter'}")


@app.command("eval")
def eval_cmd(
        target: Annotated[list[str], Opt(help="target spec or folder (repeatable)")],
        out: Annotated[Path | None, Opt(help="JSON results path")] = None,
        model: Annotated[str, Opt()] = "smollm2-135m",
        adapter: Annotated[Path | None, Opt(help="LoRA adapter folder from ccds train")] = None,
        shots: Annotated[int, Opt(min=0)] = 0,
        max_examples: Annotated[int | None, Opt(min=1, help="cap on T")] = None,
        max_new_tokens: Annotated[int, Opt(min=1)] = 128,
        no_generate: Annotated[bool, Opt("--no-generate", help="skip exact match")] = False,
        dtype: Annotated[Dtype, Opt()] = "auto"):
    """Evaluate a model (optionally with an adapter) on targets' test sets."""
    from .evaluate import EvalConfig, evaluate
    from .flops import Ledger
    from .io import write_json
    from .models import load_adapter, load_causal_lm, pick_runtime

    targets = [_load_target(t) for t in target]
    rt = pick_runtime("auto", dtype)
    m, tok, _ = load_causal_lm(model, runtime=rt)
    if adapter is not None:
        m = load_adapter(m, adapter)
    rt.place(m)
    cfg = EvalConfig(shots=shots, max_examples=max_examples, max_new_tokens=max_new_tokens,
                     generate=not no_generate)
    ledger = Ledger()
    results = [evaluate(m, tok, t, cfg, runtime=rt, ledger=ledger) for t in targets]
    for r in results:
        extra = "".join(f", {k} {r[k]:.3f}" for k in ("accuracy", "exact_match") if k in r)
        typer.echo(f"{r['target']}: n {r['n']}, nll {r['nll']:.4f}{extra}")
    if out is not None:
        write_json(out, {"model": model, "adapter": adapter, "results": results,
                         "ledger": ledger.to_dict()})


# -- demo ----------------------------------------------------------------------------------

@app.command("demo")
def demo_cmd(out: Annotated[Path, Opt(help="report folder")] = Path("demo-out"),
             fraction: Annotated[float, Opt(help="sizes the budget: training on this "
                                                 "fraction of the pool")] = 0.1,
             budget_x: Annotated[float, Opt(help="every method's budget (selection + "
                                                 "training), in trainings on --fraction")]
             = 2.0,
             spend: Annotated[bool, Opt(help="end with `ccds run` on the same budget")] = True,
             methods: Annotated[str | None, Opt(help="comma-separated; default: all")] = None,
             target: Annotated[str, Opt(help="synthetic target to select for")] = "",
             n_pool: Annotated[int, Opt(min=50)] = 1000,
             n_test: Annotated[int, Opt(min=5)] = 60,
             seed: Annotated[int, Opt()] = 0,
             model: Annotated[str, Opt()] = "smollm2-135m"):
    """The whole loop on the embedded defaults, every method on the same budget: data,
    select, train, evaluate, then `ccds run` on that budget; report."""
    from .demo import DemoConfig, run_demo

    run_demo(_config(DemoConfig, None, dict(
        out=out, fraction=fraction, budget_x=budget_x, spend=spend, n_pool=n_pool, n_test=n_test, seed=seed, model=model,
        target=target or None,
        methods=[m.strip() for m in methods.split(",")] if methods else None)))


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line on stderr and exit code 2, never a traceback."""
    from typer._click.exceptions import NoArgsIsHelpError  # typer ≥ 0.26 vendors click

    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach logs as they happen
    try:
        app(args=argv, standalone_mode=False)
    except CcdsError as e:
        print(f"ccds: error: {e}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except NoArgsIsHelpError as e:  # `ccds`, `ccds data`: the help is the answer
        e.show()
        sys.exit(2)
    except typer.TyperException as e:  # click's usage errors: a bad value, option or command
        ctx = getattr(e, "ctx", None)
        hint = f" — see `{ctx.command_path} --help`" if ctx is not None else ""
        print(f"ccds: error: {e.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("ccds: aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("ccds: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        if e.errno is None:
            raise
        where = f"{e.filename}: " if e.filename else ""
        fix = "free space or choose another location" if e.errno in (
            errno.ENOSPC, errno.EDQUOT) else "choose another location"
        print(f"ccds: error: {where}{e.strerror} — {fix}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
