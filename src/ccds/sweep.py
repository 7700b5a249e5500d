"""`ccds sweep run CONFIG`: every (training model × target × method × seed × fraction) run,
resumable.

Scores are computed once per (method, target, selection model) and reused for every
fraction (the score cache is keyed by content and written atomically, so a partial file is
never trusted). Each run trains, evaluates, and is inserted into the run store in one
transaction only when it is finished, under a key that hashes everything that determines it:
a sweep killed at any moment and started again skips finished runs, redoes the interrupted
one from scratch, and ends with the same rows as an uninterrupted sweep.

`run_pilot` (`ccds plan --pilot CONFIG`) runs a sweep's two smallest fractions and fits them,
so a plan can start from measured curves rather than the paper's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import CcdsError
from .evaluate import EvalConfig
from .score.base import Backend
from .train import TrainConfig

if TYPE_CHECKING:
    from .models import Runtime


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    label: str | None = Field(None, description="name in tables (default: the method name)")
    params: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0])
    fractions: list[float] | None = Field(
        None, description="this method's fractions (default: the sweep's); a method added to "
        "a stored sweep at a few fractions resumes without recomputing the rest")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from .score import REGISTRY

        if v not in REGISTRY:
            raise ValueError(f"unknown method '{v}' (choose from {', '.join(sorted(REGISTRY))})")
        return v

    @property
    def tag(self) -> str:
        return self.label or self.name

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float] | None) -> list[float] | None:
        return None if v is None else _check_fractions(v)


def _check_fractions(v: list[float]) -> list[float]:
    bad = [f for f in v if not 0 < f <= 1]
    if bad:
        raise ValueError(f"fractions must be in (0, 1], got {bad}")
    if not v:
        raise ValueError("fractions must not be empty")
    return sorted(set(v))


class SynthSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    n_pool: int = Field(1000, ge=10)
    n_val: int = Field(8, ge=1)
    n_test: int = Field(60, ge=1)


class SweepConfig(BaseModel):
    """A sweep: which pool, targets, methods, fractions and models; how to train and score."""

    model_config = ConfigDict(extra="forbid")
    out: Path = Path("sweep-out")
    pool: str = Field("synth", description="pool file/folder/hub id, 'synth' (generated), "
                      "or 'build' (from ../shared/data sources, minus copies of the targets)")
    synth: SynthSpec = SynthSpec()
    build: dict[str, int] = Field(
        default_factory=lambda: {"bigbench": 700, "gsm8k": 650, "alpaca": 650},
        description="pool: build — examples per source (as `ccds data build-pool`)")
    build_seed: int = 0
    targets: list[str] = Field(default_factory=lambda: ["synth-arithmetic"], min_length=1)
    n_test: int | dict[str, int] | None = Field(
        None, description="cap on T: one for all targets or per target; per subject/task "
        "for MMLU and BBH (as in `ccds eval`)")
    methods: list[MethodSpec] = Field(min_length=1)
    fractions: list[float] = Field(min_length=1)
    models: list[str] = Field(default_factory=lambda: ["smollm2-135m"], min_length=1)
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig(generate=False)
    backend: Backend = Field(Backend(), description="where scoring passes run (local or ray)")
    metric: Literal["nll", "primary"] = Field(
        "nll", description="P: −(test NLL), or the target's own metric (accuracy, exact match)")

    def test_cap(self, target: str) -> int | None:
        if isinstance(self.n_test, dict):
            return self.n_test.get(target)
        return self.n_test

    @field_validator("n_test")
    @classmethod
    def _caps(cls, v):
        bad = [x for x in (v.values() if isinstance(v, dict) else [v]) if x is not None and x < 1]
        if bad:
            raise ValueError(f"n_test must be at least 1, got {bad[0]}")
        return v

    @field_validator("methods", mode="before")
    @classmethod
    def _names(cls, v):
        return [{"name": m} if isinstance(m, str) else m for m in v or []]

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        return _check_fractions(v)

    def fractions_for(self, spec: MethodSpec) -> list[float]:
        return spec.fractions or self.fractions


def load_config(path: Path | str) -> SweepConfig:
    from .io import load_config

    return load_config(SweepConfig, Path(path))


def _data(cfg: SweepConfig):
    from .data.formats import load_examples
    from .data.sources import load_target

    if cfg.pool == "synth":
        from .data.synth import generate

        s = cfg.synth
        pool, targets = generate(seed=s.seed, n_pool=s.n_pool, n_val=s.n_val, n_test=s.n_test)
        by_name = {t.name: t for t in targets}
        unknown = [t for t in cfg.targets if t not in by_name]
        if unknown:
            raise CcdsError(f"unknown synthetic target(s) {', '.join(unknown)}", None,
                            f"choose from {', '.join(by_name)}")
        chosen = [by_name[t] for t in cfg.targets]
    elif cfg.pool == "build":  # built once, kept beside the runs for anyone to inspect
        from .data.formats import write_examples
        from .data.pool import build_pool
        from .io import stable_hash, write_json

        chosen = [load_target(t, n_test=cfg.test_cap(t)) for t in cfg.targets]
        path = cfg.out / f"pool-{stable_hash(cfg.build, cfg.build_seed, cfg.targets)}.jsonl"
        if path.exists():
            pool = load_examples(path)
        else:
            pool, report = build_pool(list(cfg.build.items()), chosen, seed=cfg.build_seed)
            write_examples(pool, path)
            write_json(path.with_suffix(".report.json"), report)
    else:
        pool = load_examples(cfg.pool)
        chosen = [load_target(t, n_test=cfg.test_cap(t)) for t in cfg.targets]
    from .data.sources import cap_test

    return pool, [cap_test(t, cfg.test_cap(t.name)) for t in chosen]


def perf_of(ev: dict, metric: str) -> float:
    return -ev["nll"] if metric == "nll" or ev.get("primary") is None else float(ev["primary"])


@dataclass(frozen=True)
class _Model:
    """A training model, loaded once, and what every run on it shares."""

    name: str  # as the config names it: rows and meta entries are filed under it
    model: Any  # the base model, no adapter attached
    tok: Any
    rt: Runtime
    fingerprint: str  # the weights' identity, part of every key
    train: TrainConfig  # the sweep's, for this model, at the dtype `auto` resolved to


def run_sweep(cfg: SweepConfig, log=print) -> Path:
    """Run every missing run; returns the store's path."""
    from .flops import Ledger
    from .io import stable_hash
    from .score import Context, get_method, run
    from .score.base import examples_hash
    from .store import Store

    pool, targets = _data(cfg)
    store = Store(cfg.out / "runs.sqlite")
    config_hash = stable_hash(cfg.model_dump(mode="json", exclude={"out"}))
    store.set_meta("config", cfg.model_dump(mode="json"))
    pool_hash = examples_hash(pool)
    n_runs = len(cfg.models) * len(targets) * sum(len(m.seeds) * len(cfg.fractions_for(m))
                                                   for m in cfg.methods)
    done = 0
    t0 = time.perf_counter()
    for model_name in cfg.models:
        m = _load(cfg, model_name)
        _record_c_full(store, m, pool=pool)
        for target in targets:
            _zero_shot(store, m, target=target, cfg=cfg)
        # targets innermost: a target-agnostic method's subset trains once and is evaluated
        # on every target right away, so a restart (even on a fresh machine) redoes at most
        # the subset in flight
        for spec, seed in [(s, seed) for s in cfg.methods for seed in s.seeds]:
            method = get_method(spec.name, **{"seed": seed, **spec.params})
            keys = {(t.name, f): _run_key(m, cfg=cfg, pool_hash=pool_hash, target=t,
                                          spec=spec, seed=seed, fraction=f)
                    for t in targets for f in cfg.fractions_for(spec)}
            todo = {k for k, v in keys.items() if not store.has(v)}
            done += len(keys) - len(todo)
            scores = {}  # per target, computed when first needed
            for f, target in [(f, t) for f in cfg.fractions_for(spec) for t in targets
                              if (t.name, f) in todo]:
                if target.name not in scores:
                    scores[target.name] = run(
                        method, pool, target, ctx=Context(runtime=m.rt, backend=cfg.backend),
                        ledger=Ledger(), cache=cfg.out / "scores")
                m, perf = _run_one(store, m, cfg=cfg, pool=pool, target=target, spec=spec,
                                   method=method, seed=seed, fraction=f,
                                   scores=scores[target.name], key=keys[target.name, f],
                                   config_hash=config_hash)
                done += 1
                log(f"[{done}/{n_runs}] {target.name} {m.name} {spec.tag} "
                    f"seed {seed} {f:.1%}: P={perf:.4f} "
                    f"({time.perf_counter() - t0:.0f} s)")
    return store.path


@dataclass(frozen=True)
class Pilot:
    """A pilot sweep's fits and the sizes it ran at: `ccds plan --pilot` plans from them."""

    fits: Path
    train_params: float
    selection_params: float
    pool_tokens: float


def run_pilot(cfg: SweepConfig, log=print) -> Pilot:
    """Run the sweep's two smallest fractions into OUT/pilot and fit them with shared P̄
    and P0 (one rate per method): two fractions are too few to fit anything more per
    method. The sizes are the sweep's own (its first model selects and trains)."""
    from .analyse.runs import analyze
    from .store import Store

    cfg = cfg.model_copy(update={
        "fractions": sorted(cfg.fractions)[:2], "out": cfg.out / "pilot",
        "methods": [m.model_copy(update={"fractions": None}) for m in cfg.methods]})
    run_sweep(cfg, log=log)
    analyze(cfg.out, cfg.out / "report", share="pbar_p0", bootstrap=100)
    meta = Store(cfg.out / "runs.sqlite").meta()[f"c_full/{cfg.models[0]}"]
    n = float(meta["params"]["non_embedding"])
    return Pilot(fits=cfg.out / "report" / "fits.json", train_params=n, selection_params=n,
                 pool_tokens=float(meta["pool_tokens"]))


def _load(cfg: SweepConfig, model_name: str) -> _Model:
    from .models import load_causal_lm, pick_runtime

    rt = pick_runtime(cfg.train.device, cfg.train.dtype)
    # the dtype `auto` resolved to on this machine goes into every key: a sweep resumed
    # on a machine where `auto` means another dtype must not mix the two in one study
    tcfg = cfg.train.model_copy(update={"model": model_name, "dtype": rt.dtype_name})
    model, tok, ref = load_causal_lm(model_name, runtime=rt)
    rt.place(model)
    return _Model(name=model_name, model=model, tok=tok, rt=rt, fingerprint=ref.fingerprint,
                  train=tcfg)


def _record_c_full(store, m: _Model, *, pool) -> None:
    """The FLOPs of training on the whole pool (analytic and as the paper counts them), with
    the sizes behind them: the analysis prices every run as a share of it."""
    from .models import param_counts
    from .train import training_cost

    cost = training_cost(pool, m.train, tokenizer=m.tok)
    store.set_meta(f"c_full/{m.name}", {"analytic": cost.analytic, "paper": cost.paper,
                                        "pool_tokens": cost.tokens,
                                        "params": param_counts(m.model)})


def _run_key(m: _Model, *, cfg: SweepConfig, pool_hash: str, target, spec: MethodSpec,
             seed: int, fraction: float) -> str:
    """The store's key for one run: everything that determines its row. Any change here
    (even the order) makes every stored sweep recompute."""
    from .io import stable_hash
    from .score.base import examples_hash, target_hash

    return stable_hash(pool_hash, target_hash(target), examples_hash(target.test),
                       m.fingerprint, spec.name, spec.params, seed, fraction,
                       m.train.identity(),
                       cfg.eval.model_dump(), cfg.metric)


def _run_one(store, m: _Model, *, cfg: SweepConfig, pool, target, spec: MethodSpec, method,
             seed: int, fraction: float, scores, key: str, config_hash: str
             ) -> tuple[_Model, float]:
    """Select `fraction` of the pool by `scores`, train on it, evaluate on `target`, then
    store the row: one insert once all is done, so a killed run leaves nothing behind.
    Returns `m` with the adapter taken off again, and the run's P."""
    from .evaluate import evaluate
    from .flops import Ledger
    from .score import Context
    from .select import select

    idx = select(scores.values, fraction=fraction)
    if method.order == "given":
        idx = method.train_order(pool, idx, Context(runtime=m.rt))
    else:  # a set, not a sequence: equal sets train alike
        idx = np.sort(idx)
    ledger = Ledger()
    ledger.add(scores.stage)
    trained, tokens = _train_once(
        m, [pool[i] for i in idx], tcfg=m.train.model_copy(
            update={"seed": seed, "order": method.order}),
        ledger=ledger, root=cfg.out / "trained" / m.fingerprint)
    ev = evaluate(trained, m.tok, target, cfg.eval, runtime=m.rt, ledger=ledger,
                  label=spec.tag, progress=None)
    m = replace(m, model=trained.unload())  # peft's unload is not in place
    tr = ledger.stages[1]
    row = {"target": target.name, "model": m.name, "dtype": m.rt.dtype_name,
           "method": spec.tag, "method_name": spec.name,
           "params": spec.params, "fraction": fraction, "seed": seed,
           "selection_flops": scores.stage.analytic_flops,
           "selection_paper_flops": scores.stage.paper_flops,
           "training_flops": tr.analytic_flops,
           "training_paper_flops": tr.paper_flops,
           "perf": perf_of(ev, cfg.metric), "metric": cfg.metric,
           "eval": {k: v for k, v in ev.items() if k != "samples"},
           "ledger": ledger.to_dict(), "n": len(idx),
           "tokens": tokens, "ids": [pool[i].id for i in idx]}
    store.add(key, config_hash, row)
    return m, row["perf"]


def _train_once(m: _Model, examples, *, tcfg: TrainConfig, ledger, root: Path):
    """(LoRA model, tokens trained) for these examples and settings, trained once per sweep:
    a target-agnostic method under every target, or every method at 100%, selects the same
    set, so later rows load the saved adapter. Each row's ledger still charges the training
    as recorded: the FLOPs are the experiment's, the reuse only saves this machine's time."""
    from .flops import Stage
    from .io import read_json, stable_hash, write_json
    from .models import load_adapter
    from .train import train

    out = root / stable_hash([(e.id, e.prompt, e.response) for e in examples],
                             tcfg.identity())
    done = out / "result.json"
    if done.exists():
        info = read_json(done)
        ledger.add(Stage(**{**info["stage"], "detail": {**info["stage"]["detail"],
                                                       "reused": str(out)}}))
        return load_adapter(m.model, out / "adapter"), info["tokens"]
    res = train(examples, tcfg, model=m.model, tokenizer=m.tok, runtime=m.rt, ledger=ledger,
                out=out, progress=None)
    write_json(done, {"tokens": res.tokens, "stage": res.stage.to_dict()})
    return res.model, res.tokens


def _zero_shot(store, m: _Model, *, target, cfg: SweepConfig) -> None:
    """Evaluate the untrained model once per (target, model): the fit's P0 is this zero-shot
    performance (spec §4), measured rather than extrapolated from the smallest fractions."""
    from .evaluate import evaluate
    from .flops import Ledger

    key = _zero_shot_key(m, target=target, cfg=cfg)
    name = f"zero_shot/{target.name}/{m.name}"
    if store.meta().get(name, {}).get("key") == key:
        return
    ledger = Ledger()
    ev = evaluate(m.model, m.tok, target, cfg.eval, runtime=m.rt, ledger=ledger,
                  label="zero-shot", progress=None)
    store.set_meta(name, {"key": key, "perf": perf_of(ev, cfg.metric), "metric": cfg.metric,
                          "eval": {k: v for k, v in ev.items() if k != "samples"},
                          "flops": ledger.stages[0].analytic_flops,
                          "wall_s": ledger.stages[0].wall_s})


def _zero_shot_key(m: _Model, *, target, cfg: SweepConfig) -> str:
    """What a zero-shot evaluation depends on; like `_run_key`, any change re-evaluates."""
    from .io import stable_hash
    from .score.base import examples_hash

    return stable_hash(examples_hash(target.test), m.fingerprint, cfg.eval.model_dump(),
                       cfg.metric, cfg.train.max_len, m.rt.dtype_name)
