"""`ccds sweep run CONFIG`: every (training model × target × method × seed × fraction) run,
resumable.

Scores are computed once per (method, target, selection model) and reused for every
fraction (the score cache is keyed by content and written atomically, so a partial file is
never trusted). Each run trains, evaluates, and is inserted into the run store in one
transaction only when it is finished, under a key that hashes everything that determines it:
a sweep killed at any moment and started again skips finished runs, redoes the interrupted
one from scratch, and ends with the same rows as an uninterrupted sweep.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import CcdsError
from .evaluate import EvalConfig
from .score.backend import Backend
from .train import TrainConfig


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    label: str | None = Field(None, description="name in tables (default: the method name)")
    params: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0])

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
        bad = [f for f in v if not 0 < f <= 1]
        if bad:
            raise ValueError(f"fractions must be in (0, 1], got {bad}")
        return sorted(set(v))


def load_config(path: Path | str) -> SweepConfig:
    from .config import load_config

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
    for t in chosen:  # a cap on T as a whole, except MMLU's and BBH's (per subject/task)
        if cfg.test_cap(t.name) and not t.name.startswith(("mmlu", "bbh")):
            t.test = t.test[: cfg.test_cap(t.name)]
    return pool, chosen


def perf_of(ev: dict, metric: str) -> float:
    return -ev["nll"] if metric == "nll" or ev.get("primary") is None else float(ev["primary"])


def run_sweep(cfg: SweepConfig, log=print) -> Path:
    """Run every missing run; returns the store's path."""
    from .evaluate import evaluate
    from .flops import Ledger, encoded_work, lora_step_flops, paper_flops
    from .io import stable_hash
    from .models import load_causal_lm, param_counts, pick_runtime
    from .score import Context, get_method, run
    from .score.base import examples_hash, target_hash
    from .select import select
    from .store import Store
    from .tokenize import encode

    pool, targets = _data(cfg)
    store = Store(cfg.out / "runs.sqlite")
    config_hash = stable_hash(cfg.model_dump(mode="json", exclude={"out"}))
    store.set_meta("config", cfg.model_dump(mode="json"))
    pool_hash = examples_hash(pool)
    n_runs = len(cfg.models) * len(targets) * sum(len(m.seeds) for m in cfg.methods) \
        * len(cfg.fractions)
    done = 0
    t0 = time.perf_counter()
    for model_name in cfg.models:
        rt = pick_runtime(cfg.train.device, cfg.train.dtype)
        # the dtype `auto` resolved to on this machine goes into every key: a sweep resumed
        # on a machine where `auto` means another dtype must not mix the two in one study
        tcfg = cfg.train.model_copy(update={"model": model_name, "dtype": rt.dtype_name})
        model, tok, ref = load_causal_lm(model_name)
        rt.place(model)
        enc = encode(pool, tok, tcfg.max_len)
        work = encoded_work(enc, suffix=True)
        counts = param_counts(model)
        from .models import counts_without_weights

        lora = counts_without_weights(model_name, tcfg) if tcfg.lora else counts
        store.set_meta(f"c_full/{model_name}", {
            "analytic": lora_step_flops(lora, work) * tcfg.epochs,
            "paper": paper_flops(counts, work.tokens, training=True) * tcfg.epochs,
            "pool_tokens": work.tokens, "params": counts})
        for target in targets:
            _zero_shot(store, model, tok, target, cfg, rt, model_name, ref.fingerprint)
        # targets innermost: a target-agnostic method's subset trains once and is evaluated
        # on every target right away, so a restart (even on a fresh machine) redoes at most
        # the subset in flight
        for spec in cfg.methods:
            for seed in spec.seeds:
                method = get_method(spec.name, **{"seed": seed, **spec.params})
                keys = {(t.name, f): stable_hash(
                            pool_hash, target_hash(t), examples_hash(t.test), ref.fingerprint,
                            spec.name, spec.params, seed, f,
                            tcfg.model_dump(exclude={"device"}), cfg.eval.model_dump(),
                            cfg.metric)
                        for t in targets for f in cfg.fractions}
                todo = {k for k, v in keys.items() if not store.has(v)}
                done += len(keys) - len(todo)
                scores = {}  # per target, computed when first needed
                for f in cfg.fractions:
                    for target in targets:
                        if (target.name, f) not in todo:
                            continue
                        if target.name not in scores:
                            scores[target.name] = run(
                                method, pool, target, ctx=Context(runtime=rt, backend=cfg.backend),
                                ledger=Ledger(), cache=cfg.out / "scores")
                        sc = scores[target.name]
                        idx = select(sc.values, fraction=f)
                        if method.order == "given":
                            idx = method.train_order(pool, idx, Context(runtime=rt))
                        else:  # a set, not a sequence: equal sets train alike
                            idx = np.sort(idx)
                        ledger = Ledger()
                        ledger.add(sc.stage)
                        trained, tokens = _train_once(
                            [pool[i] for i in idx], tcfg.model_copy(
                                update={"seed": seed, "order": method.order}),
                            model, tok, rt, ledger, cfg.out / "trained" / ref.fingerprint)
                        ev = evaluate(trained, tok, target, cfg.eval, runtime=rt,
                                      ledger=ledger, label=spec.tag, progress=None)
                        model = trained.unload()
                        tr = ledger.stages[1]
                        row = {"target": target.name, "model": model_name, "dtype": rt.dtype_name,
                               "method": spec.tag, "method_name": spec.name,
                               "params": spec.params, "fraction": f, "seed": seed,
                               "selection_flops": sc.stage.analytic_flops,
                               "selection_paper_flops": sc.stage.paper_flops,
                               "training_flops": tr.analytic_flops,
                               "training_paper_flops": tr.paper_flops,
                               "perf": perf_of(ev, cfg.metric), "metric": cfg.metric,
                               "eval": {k: v for k, v in ev.items() if k != "samples"},
                               "ledger": ledger.to_dict(), "n": len(idx),
                               "tokens": tokens, "ids": [pool[i].id for i in idx]}
                        store.add(keys[target.name, f], config_hash, row)
                        done += 1
                        log(f"[{done}/{n_runs}] {target.name} {model_name} {spec.tag} "
                            f"seed {seed} {f:.1%}: P={row['perf']:.4f} "
                            f"({time.perf_counter() - t0:.0f} s)")
    return store.path


def _train_once(examples, tcfg, model, tok, rt, ledger, root: Path):
    """(LoRA model, tokens trained) for these examples and settings, trained once per sweep:
    a target-agnostic method under every target, or every method at 100%, selects the same
    set, so later rows load the saved adapter. Each row's ledger still charges the training
    as recorded: the FLOPs are the experiment's, the reuse only saves this machine's time."""
    from .flops import Stage
    from .io import read_json, stable_hash, write_json
    from .train import load_adapter, train

    out = root / stable_hash([(e.id, e.prompt, e.response) for e in examples],
                             tcfg.model_dump(exclude={"device"}))
    done = out / "result.json"
    if done.exists():
        info = read_json(done)
        ledger.add(Stage(**{**info["stage"], "detail": {**info["stage"]["detail"],
                                                       "reused": str(out)}}))
        return load_adapter(model, out / "adapter"), info["tokens"]
    res = train(examples, tcfg, model=model, tokenizer=tok, runtime=rt, ledger=ledger,
                out=out, progress=None)
    write_json(done, {"tokens": res.tokens, "stage": res.stage.to_dict()})
    return res.model, res.tokens


def _zero_shot(store, model, tok, target, cfg: SweepConfig, rt, model_name: str,
               fingerprint: str) -> None:
    """Evaluate the untrained model once per (target, model): the fit's P0 is this zero-shot
    performance (spec §4), measured rather than extrapolated from the smallest fractions."""
    from .evaluate import evaluate
    from .flops import Ledger
    from .io import stable_hash
    from .score.base import examples_hash

    key = stable_hash(examples_hash(target.test), fingerprint, cfg.eval.model_dump(),
                      cfg.metric, cfg.train.max_len, rt.dtype_name)
    name = f"zero_shot/{target.name}/{model_name}"
    if store.meta().get(name, {}).get("key") == key:
        return
    ledger = Ledger()
    ev = evaluate(model, tok, target, cfg.eval, runtime=rt, ledger=ledger, label="zero-shot",
                  progress=None)
    store.set_meta(name, {"key": key, "perf": perf_of(ev, cfg.metric), "metric": cfg.metric,
                          "eval": {k: v for k, v in ev.items() if k != "samples"},
                          "flops": ledger.stages[0].analytic_flops,
                          "wall_s": ledger.stages[0].wall_s})
