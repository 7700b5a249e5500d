"""`ccds run`: spend one compute budget B on deciding, selecting and training, and report it.

Every FLOP of the decision is charged to B: the zero-shot and pilot evaluations on V, each
method's scoring (once: a pool scored for the pilot is not scored again), the pilot trainings,
the final training. The final evaluation on T is recorded beside, not charged (the paper
charges selection + training). Each pilot arm and the final run train on the best-scored
examples whose training FLOPs fit what they may spend (per-example costs add up exactly in
the analytic count), under `TrainConfig.max_flops` as a hard cap, so the charged total never
passes B.

Resumable: every finished piece (scores, an arm, the zero-shot, the final run's checkpoints)
is saved atomically under OUT; the decision is a function of those pieces, so a rerun of
the same command after a kill replays them (charging their recorded stages again) and goes
on where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .data.formats import SubsetFormat
from .decide import Arm, Decision, adaptive, planned
from .errors import CcdsError
from .evaluate import EvalConfig
from .flops import Device, Ledger, Stage
from .price import Rate, Unit
from .tokenize import Encoded
from .train import TrainConfig

DEFAULT_METHODS = ["random", "bm25", "dsir", "embed", "ppl"]


class RunConfig(BaseModel):
    """One budget, spent: what to train, on what, against which target, for how much."""

    model_config = ConfigDict(extra="forbid")
    pool: str
    target: str
    budget: float = Field(gt=0)
    unit: Unit = "flops"
    device: Device | None = None
    mfu: float | None = Field(None, gt=0, le=1)
    selection_model: str | None = Field(None, description="model that scores (ppl, LESS); "
                                        "default: the trained one")
    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS), min_length=1)
    strategy: Literal["adaptive", "plan"] = "adaptive"
    fits: Path | None = Field(None, description="`ccds analyze` fits.json: the prior")
    pilot_share: float = Field(0.15, gt=0, le=0.5)
    z: float = Field(1.0, ge=0, description="standard errors of V a pilot must win by")
    train: TrainConfig = Field(TrainConfig(), description="LoRA only: pilots train "
                               "adapters on one shared base model")
    eval: EvalConfig = EvalConfig(generate=False)
    n_test: int | None = Field(None, ge=1, description="cap on T (per subject/task for MMLU "
                               "and BBH, as in a sweep)")
    format: SubsetFormat = Field("ccds", description="the selected subset's file, for the stack "
                                 "that will train on it (a .selection.json sidecar beside it)")
    seed: int = 0
    out: Path = Path("run-out")

    @field_validator("train")
    @classmethod
    def _lora(cls, v: TrainConfig) -> TrainConfig:
        if not v.lora:
            raise ValueError("ccds run trains LoRA adapters (pilots share one base model); "
                             "set train.lora: true")
        return v


@dataclass
class LiveWorld:
    """The pool, the target and the model, as `ccds.decide` asks for them; every charged
    stage goes into `ledger`, T's evaluation into `reported`."""

    cfg: RunConfig
    pool: list
    target: object
    model: object
    tok: object
    rt: object
    c_full: float
    prices: TrainingPrices  # what training on each pool example costs
    v_flops: float
    pool_tokens: int
    fractions: None = None
    ledger: Ledger = field(default_factory=Ledger)
    reported: Ledger = field(default_factory=Ledger)
    scores: dict = field(default_factory=dict)
    log: object = print
    p0: tuple[float, float | None] | None = None  # zero-shot on V, once charged
    prices_of: dict[str, float] = field(default_factory=dict)  # selection estimates

    @property
    def spent(self) -> float:
        """The charge so far, in the larger of the analytic and the measured count (which
        also sees padding): the budget holds in both."""
        return max(self.ledger.total(), self.ledger.total(field_="measured_flops"))

    def method(self, name: str):
        from .score import get_method
        from .score.base import REGISTRY

        params = {"seed": self.cfg.seed}
        fields = REGISTRY[name].Params.model_fields
        sel = self.cfg.selection_model or self.cfg.train.model
        if "model" in fields and name != "embed":
            params["model"] = sel
        return get_method(name, **{k: v for k, v in params.items() if k in fields})

    def selection_cost(self, name: str) -> float:
        if name in self.scores:
            return 0.0
        if name not in self.prices_of:  # a method's estimate reads the whole pool: once
            self.prices_of[name] = float(self.method(name).cost(self.pool, self.target))
        return self.prices_of[name]

    def training_cost(self, name: str, fraction: float) -> float:
        return fraction * self.c_full

    def eval_cost(self) -> float:
        return self.v_flops

    def _scores(self, name: str):
        from .score import Context, run

        if name not in self.scores:
            s = run(self.method(name), self.pool, self.target, ctx=Context(runtime=self.rt),
                    cache=self.cfg.out / "scores")
            self.ledger.add(s.stage)
            self.scores[name] = s
        return self.scores[name]

    def subset(self, name: str, flops: float) -> np.ndarray:
        """The best-scored examples of `name` whose training fits `flops`."""
        return self.prices.subset(self._scores(name).values, flops)

    def _v(self, model, label: str) -> tuple[float, float | None, Stage]:
        from .evaluate import evaluate

        v = _v_target(self.target)
        led = Ledger()
        ev = evaluate(model, self.tok, v, self.cfg.eval.model_copy(update={"shots": 0, "max_examples": None}),
                      runtime=self.rt, ledger=led, label=label, progress=None)
        st = led.stages[0]
        st.detail["on"] = "V"
        return -ev["nll"], ev.get("nll_se"), st

    def zero_shot(self) -> tuple[float, float | None]:
        from .io import read_json, write_json

        if self.p0 is not None:  # measured for the calibration: charged once
            return self.p0
        path = self.cfg.out / "pieces" / "zero-shot.json"
        if path.exists():
            d = read_json(path)
        else:
            p, se, st = self._v(self.model, "zero-shot")
            d = {"p": p, "se": se, "stage": st.to_dict()}
            write_json(path, d)
        st = Stage(**d["stage"])
        self.ledger.add(st)
        # what an evaluation on V really costs (every option of a multiple-choice item,
        # padding): the pilot's later rounds are priced by it
        self.v_flops = max(self.v_flops, st.analytic_flops, st.measured_flops or 0.0)
        self.log(f"zero-shot on V: P0 = {d['p']:.4f}")
        self.p0 = d["p"], d["se"]
        return self.p0

    def calibrate(self) -> tuple[Rate, float]:
        """FLOP/s of this machine's passes, for a budget in hours: the zero-shot evaluation
        on V (forward passes) and two short trainings on random examples (0.25% and 0.5% of
        C_full, a step at least), all charged. Training's rate is the slope between the two,
        so what any run pays once (building the optimizer, the first step's kernels) does
        not count as throughput. Returns the rate and the wall seconds it took."""
        from .io import read_json, write_json

        self.zero_shot()
        fwd = self.ledger.stages[-1]
        path = self.cfg.out / "pieces" / "calibration.json"
        if path.exists():
            d = read_json(path)
        else:
            small = max(0.0025 * self.c_full, 2 * float(self.prices.costs.max()))
            d = {"runs": []}
            for flops in (small, 2 * small):
                res, stages = self._train("random", flops, None, "calibrate")
                self.model = res.model.unload()
                d["runs"].append(stages)
            write_json(path, d)
        runs = [[Stage(**s) for s in stages] for stages in d["runs"]]
        for s in (s for stages in runs for s in stages):
            self.ledger.add(s)
        (f1, t1), (f2, t2) = [(sum(s.analytic_flops for s in r), sum(s.wall_s for s in r))
                              for r in runs]
        train_s = (f2 - f1) / (t2 - t1) if t2 > t1 and f2 > f1 else f2 / max(t2, 1e-9)
        fwd_s = fwd.analytic_flops / max(fwd.wall_s, 1e-9)
        rate = Rate.measured({"train": train_s, "score": fwd_s},
                             f"measured on this machine ({train_s / 1e9:.3g} GFLOP/s training, "
                             f"{fwd_s / 1e9:.3g} forward)")
        return rate, fwd.wall_s + t1 + t2

    def trial(self, name: str, fraction: float) -> Arm:
        """A pilot arm: its method's scores (charged once), training on the best-scored
        examples that `fraction`·C_full pays for, and an evaluation on V."""
        from .io import read_json, write_json

        path = self.cfg.out / "pieces" / f"arm-{name}-{fraction:.6f}.json"
        self._scores(name)
        before = self.spent
        if path.exists():
            d = read_json(path)
            for s in d["stages"]:
                self.ledger.add(Stage(**s))
        else:
            res, stages = self._train(name, fraction * self.c_full, None, f"pilot {name}")
            p, se, st = self._v(res.model, f"pilot {name}")
            self.model = res.model.unload()
            d = {"p": p, "se": se, "n": res.stage.detail["examples"],
                 "stages": [*stages, st.to_dict()]}
            for s in d["stages"]:
                self.ledger.add(Stage(**s))
            write_json(path, d)
        self.log(f"pilot {name} at {fraction:.2%}: P_V = {d['p']:.4f} on {d['n']} examples")
        return Arm(name, fraction, self.spent - before, d["p"], d["se"])

    def _train(self, name: str, flops: float, out: Path | None, label: str):
        from .train import train

        idx = self.subset(name, flops)
        cfg = self.cfg.train.model_copy(update={
            "max_flops": flops, "seed": self.cfg.seed,
            "checkpoints": max(4, self.cfg.train.checkpoints) if out is not None else 0})
        led = Ledger()
        res = train([self.pool[i] for i in idx], cfg, model=self.model, tokenizer=self.tok,
                    runtime=self.rt, ledger=led, out=out, progress=label)
        res.stage.detail["ids"] = [self.pool[i].id for i in idx]
        res.stage.detail["index"] = [int(i) for i in idx]
        return res, [s.to_dict() for s in led.stages]


def _v_target(target):
    from .data.types import Target

    return Target(f"{target.name}-V", target.val, target.val, "nll", target.extract)


def run_budget(cfg: RunConfig, log=print) -> dict:
    """Spend `cfg.budget`; returns the report (also written to cfg.out)."""
    from .price import budget_flops, check_budget, gpu_rate
    from .score.base import REGISTRY

    unknown = [m for m in cfg.methods if m not in REGISTRY]
    if unknown:
        raise CcdsError(f"unknown method(s) {', '.join(unknown)}", None,
                        f"choose from {', '.join(sorted(REGISTRY))}")
    check_budget(cfg.budget, cfg.unit, cfg.device, cfg.mfu, measured=True)
    world = _open(cfg, log)
    t0 = time.perf_counter()
    rate = gpu_rate(cfg.device, cfg.mfu, n_params=world.cfg.train.model)
    calibration_s = None
    if cfg.unit == "hours" and rate is None:  # wall-clock hours here: measure, then price
        rate, calibration_s = world.calibrate()
    budget = budget_flops(cfg.budget, cfg.unit, rate)
    cheapest = float(world.prices.costs.min())
    if budget < cheapest:
        raise CcdsError(f"a budget of {budget:.3g} FLOPs trains on nothing", None,
                        f"the smallest budget that trains on one example is {cheapest:.3g} "
                        "FLOPs")
    decision = _decide(world, budget, cfg)
    if decision.method is None:
        raise CcdsError(f"a budget of {budget:.3g} FLOPs trains on nothing after the "
                        f"decision: {decision.reason}", None, "raise the budget")
    res, planned_vs_spent = _final(world, decision, budget)
    wall = {"rate": None if rate is None else rate.source, "calibration_s": calibration_s,
            "actual_s": time.perf_counter() - t0}
    if rate is not None:  # each charged stage at its pass's rate
        per = rate.per_stage
        wall["predicted_s"] = budget / per["train"]
        wall["charged_predicted_s"] = sum(
            s.analytic_flops / per["train" if s.kind == "training" or "score" not in per
                                   else "score"] for s in world.ledger.stages)
    return _finish(world, decision, res, budget, log, wall, planned_vs_spent)


def _open(cfg: RunConfig, log) -> LiveWorld:
    """Load the pool, the target and the model, and price training on every example."""
    from .data.formats import load_examples
    from .data.sources import cap_test, load_target
    from .flops import encoded_work, forward_flops
    from .models import load_causal_lm, param_counts, pick_runtime
    from .tokenize import encode

    pool = load_examples(cfg.pool)
    target = cap_test(load_target(cfg.target, n_test=cfg.n_test), cfg.n_test)
    if not target.val:
        raise CcdsError(f"target {cfg.target!r} has no validation examples (V)", None,
                        "ccds run decides on V: give a target with a validation split")
    rt = pick_runtime(cfg.train.device, cfg.train.dtype)
    tcfg = cfg.train.model_copy(update={"dtype": rt.dtype_name})
    model, tok, _ = load_causal_lm(tcfg.model, runtime=rt)
    rt.place(model)
    counts = param_counts(model)  # the frozen model: what its V evaluations run
    prices = TrainingPrices.of(pool, tcfg.model_copy(update={"seed": cfg.seed}), tok)
    v_enc = encode(target.val, tok, cfg.eval.max_len)
    return LiveWorld(cfg.model_copy(update={"train": tcfg}), pool, target, model, tok, rt,
                     c_full=float(prices.costs.sum()), prices=prices,
                     v_flops=forward_flops(counts, encoded_work(v_enc)),
                     pool_tokens=prices.enc.n_tokens, log=log)


def _final(world: LiveWorld, decision: Decision, budget: float):
    """The final run: the winner's scores (paid once), training on all that is left, the
    subset written beside the adapter. Returns the training and planned against spent."""
    chosen = next((o for o in decision.options if o.method == decision.method), None)
    before = world.ledger.total("selection")
    world._scores(decision.method)
    res, stages = world._train(decision.method, budget - world.spent, world.cfg.out / "final",
                               "train")
    for s in stages:
        world.ledger.add(Stage(**s))
    _write_subset(world, decision.method, res.stage.detail.pop("index"), budget)
    return res, {  # (planned at the decision, spent)
        "pilot": (decision.pilot_budget, decision.pilot_flops),
        "final selection": (chosen.selection_flops if chosen else None,
                            world.ledger.total("selection") - before),
        "final training": (chosen.training_flops if chosen else None,
                           res.stage.analytic_flops)}


@dataclass
class TrainingPrices:
    """What training on each pool example costs (analytic, `cfg.epochs`, adapters included)
    and the subsets a FLOPs budget buys. The count is linear in tokens, squared tokens and
    loss positions, so a subset's cost is the sum of its examples'; padded batches cost a
    little more as they run, and a subset is taken so that its planned padded run fits too
    (the cap then trims nothing, and the measured count fits as well)."""

    enc: Encoded
    counts: dict[str, int]
    cfg: TrainConfig  # the training that will run (its seed orders the batches)
    costs: np.ndarray

    @classmethod
    def of(cls, examples, cfg: TrainConfig, tokenizer) -> TrainingPrices:
        from .flops import Work, full_step_flops, lora_step_flops
        from .models import counts_without_weights
        from .tokenize import encode

        enc = encode(examples, tokenizer, cfg.max_len)
        counts = counts_without_weights(cfg.model, cfg if cfg.lora else None)
        step = full_step_flops if not cfg.lora else lora_step_flops
        resp = enc.response_lengths
        costs = np.empty(len(enc))
        for i, n in enumerate(enc.lengths):
            w = Work()
            w.add([n], int(resp[i]), int(n))
            costs[i] = step(counts, w) * cfg.epochs
        return cls(enc, counts, cfg, costs)

    def subset(self, scores: np.ndarray, flops: float) -> np.ndarray:
        """Pool indices (sorted) of the best-scored examples whose training fits `flops`: in
        rank order, then later cheaper ones that still fit; fewer while the padded run
        would not."""
        from .select import select
        from .tokenize import Encoded
        from .train import plan_steps, step_flops

        if flops < self.costs.min():
            raise CcdsError(f"{flops:.3g} FLOPs train on no example of this pool (the "
                            f"cheapest costs {self.costs.min():.3g})")
        goal, e = flops, self.enc
        while True:  # ends: the goal shrinks each time, down to no example at all
            if goal < self.costs.min():
                raise CcdsError(f"{flops:.3g} FLOPs train on no example of this pool once "
                                "padded batches are priced")
            idx = np.sort(select(scores, tokens=int(goal), lengths=self.costs))
            sub = Encoded([e.ids[i] for i in idx], e.n_prompt[idx], e.n_suffix[idx])
            padded = sum(step_flops(sub, g, self.counts, full=not self.cfg.lora, padded=True)
                         for g in plan_steps(sub, self.cfg, self.counts))
            if padded <= flops:
                return idx
            goal *= 0.999 * flops / padded


def _write_subset(world: LiveWorld, method: str, idx: list[int], budget: float) -> None:
    """The final training's examples, in the configured format, with their sidecar."""
    from .data.formats import SUBSET_SUFFIX, write_subset
    from .score.base import selection_record

    cfg = world.cfg
    write_subset([world.pool[i] for i in idx], cfg.out / f"subset{SUBSET_SUFFIX[cfg.format]}",
                 cfg.format, sidecar=selection_record(
                     world.scores[method], world.pool, idx, world.method(method),
                     pool=cfg.pool, target=cfg.target, budget_flops=budget))


def _decide(world: LiveWorld, budget: float, cfg: RunConfig) -> Decision:
    from .models import param_counts
    from .plan import from_fits, paper_prior, plan

    n = float(param_counts(world.model)["active"])
    models = from_fits(cfg.fits, cfg.target)[0] if cfg.fits else paper_prior(n)
    if cfg.strategy == "plan":  # priced in this run's convention: C_full as measured here
        t = float(world.pool_tokens)
        options, _ = plan(budget, n, n, t, [m for m in models if m.name in cfg.methods],
                          1, world.c_full / (n * t))
        return planned(world, budget, [(o.method, o.fraction) for o in options])
    prior = {m.name: m.lam for m in models}
    return adaptive(world, budget, cfg.methods, prior, pilot_share=cfg.pilot_share, z=cfg.z)


def _finish(world: LiveWorld, decision: Decision, res, budget: float, log, wall: dict,
            planned_vs_spent: dict) -> dict:
    from .evaluate import evaluate
    from .io import write_json, write_text

    cfg = world.cfg
    ev = evaluate(res.model, world.tok, world.target, cfg.eval, runtime=world.rt,
                  ledger=world.reported, label="final", progress=None)
    charged = world.ledger.to_dict()
    total = world.ledger.total()
    measured = world.ledger.total(field_="measured_flops")
    report = {
        "config": cfg.model_dump(mode="json"), "budget_flops": budget,
        "charged_flops": total, "charged_measured_flops": measured,
        "within_budget": total <= budget and measured <= budget,
        "decision": decision.to_dict(), "final": {
            "method": decision.method, "examples": res.stage.detail["examples"],
            "ids": res.stage.detail.get("ids"), "training_flops": res.stage.analytic_flops,
            "T": {k: v for k, v in ev.items() if k != "samples"}},
        "ledger": charged, "reported": world.reported.to_dict(),
        "spent_by_kind": {k: world.ledger.total(k) for k in ("selection", "training",
                                                              "evaluation")},
        "planned_vs_spent": planned_vs_spent,
        "wall": wall | {"charged_s": world.ledger.total(field_="wall_s")},
    }
    _plot(report, cfg.out / "report.png")
    write_json(cfg.out / "report.json", report)
    write_text(cfg.out / "report.md", _markdown(report))
    log(f"{decision.method} on {res.stage.detail['examples']} examples: T NLL "
        f"{ev['nll']:.4f}; charged {total:.4g} of {budget:.4g} FLOPs "
        f"(measured {measured:.4g}); report: {cfg.out / 'report.md'}")
    return report


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def _markdown(r: dict) -> str:
    d = r["decision"]
    lines = [f"# ccds run: {r['config']['target']} on {r['config']['pool']}", "",
             f"Budget {r['budget_flops']:.4g} FLOPs; charged {r['charged_flops']:.4g} "
             f"(analytic), {r['charged_measured_flops']:.4g} (measured); within budget: "
             f"{r['within_budget']}.", "",
             f"**Decision** ({d['strategy']}): {d['method']} at {d['fraction']:.2%}. "
             f"{d['reason']}." + (f" Certainty on V: {d['certainty']:.2f}."
                                  if d.get("certainty") is not None else ""), "",
             f"Pilot: {d['pilot_flops']:.4g} FLOPs of {d['pilot_budget']:.4g} allowed"
             + (f"; P0 on V {d['p0']:.4f}" if d.get("p0") is not None else "") + ".", ""]
    if d["arms"]:
        lines += ["| arm | fraction | FLOPs | P on V | se |", "|---|---|---|---|---|"]
        lines += [f"| {a['method']} | {a['fraction']:.2%} | {a['flops']:.3g} | {a['p']:.4f} | "
                  f"{_num(a['se'])} |" for a in d["arms"]]
        lines.append("")
    if d["options"]:
        lines += ["| option | fraction | selection to pay | training | predicted gain | basis |",
                  "|---|---|---|---|---|---|"]
        for o in d["options"]:
            g = "withheld" if o["gain"] is None else f"{o['gain']:+.4f}"
            lines.append(f"| {o['method']} | {o['fraction']:.2%} | {o['selection_flops']:.3g} "
                         f"| {o['training_flops']:.3g} | {g} | {o['basis']} |")
        lines.append("")
    w = r["wall"]
    if w.get("predicted_s") is not None:
        lines += [f"Wall clock: the budget is {w['predicted_s']:.0f} s at the rate {w['rate']}; "
                  f"the charged work was predicted at {w['charged_predicted_s']:.0f} s and took "
                  f"{w['actual_s']:.0f} s (the command, the final T evaluation aside).", ""]
    lines += ["| stage | planned at the decision | spent |", "|---|---|---|"]
    lines += [f"| {k} | {'' if a is None else f'{a:.4g}'} | {b:.4g} |"
              for k, (a, b) in r["planned_vs_spent"].items()]
    lines += ["", "| spent on | FLOPs |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in r["spent_by_kind"].items()]
    lines += [f"| **total charged** | **{r['charged_flops']:.4g}** of {r['budget_flops']:.4g} |",
              "", "![pilot, fits and spend](report.png)"]
    t = r["final"]["T"]
    lines += ["", f"Final ({r['final']['examples']} examples): T NLL {t['nll']:.4f}"
              + (f", accuracy {t['accuracy']:.3f}" if t.get("accuracy") is not None else "")
              + " (recorded, not charged).", ""]
    return "\n".join(lines)


def _plot(r: dict, path: Path) -> None:
    """Left: the pilot's arms on V and each option's predicted curve, the choice marked.
    Right: the budget beside what was charged, by kind."""
    from .analyse.render import pyplot, save_png

    plt = pyplot()
    d = r["decision"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    colors = plt.get_cmap("tab10")
    methods = sorted({o["method"] for o in d["options"]} | {x["method"] for x in d["arms"]})
    lo = min([x["fraction"] for x in d["arms"]] + [o["fraction"] for o in d["options"]] + [0.01])
    f = np.geomspace(lo / 2, 1, 101)  # pilots sit at small fractions: a log axis
    for i, m in enumerate(methods):
        pts = [x for x in d["arms"] if x["method"] == m]
        if pts:
            a.errorbar([x["fraction"] for x in pts], [x["p"] for x in pts],
                       yerr=[x["se"] or 0 for x in pts], fmt="o", color=colors(i), label=m)
        o = next((o for o in d["options"] if o["method"] == m), None)
        if o is not None and d["headroom"] is not None and d["p0"] is not None:
            a.plot(f, d["p0"] + d["headroom"] * (1 - np.exp(-o["lam"] * f)), color=colors(i),
                   ls="-" if o["basis"] == "pilot" else ":",
                   label=None if pts else f"{m} (prior)")
            if m == d["method"]:
                a.plot([o["fraction"]], [d["p0"] + o["gain"]], marker="*", ms=14,
                       color=colors(i), ls="none", label=f"choice: {m} {o['fraction']:.1%}")
    if d["p0"] is not None:
        a.axhline(d["p0"], color="grey", lw=0.8, ls="--", label="zero-shot P0")
    a.set(xscale="log", xlabel="training fraction of the pool", ylabel="P = −NLL on V",
          title="pilot on V and predicted gains" if d["arms"] else "no pilot (prior only)")
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=7)
    kinds = list(r["spent_by_kind"])
    bottom = 0.0
    for i, k in enumerate(kinds):
        v = r["spent_by_kind"][k]
        b.bar(["charged"], [v], bottom=bottom, color=colors(i + 5), label=k)
        bottom += v
    b.bar(["budget"], [r["budget_flops"]], color="lightgrey")
    b.set(ylabel="FLOPs", title="budget and charge")
    b.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
