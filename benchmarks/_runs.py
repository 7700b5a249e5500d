"""Shared by the real-data benchmarks: train SmolLM2 with LoRA on a subset of a pool and
evaluate it on targets, each finished run kept as JSON so a benchmark resumes where it
stopped."""

from __future__ import annotations

import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np
from peak import cpu

from ccds.evaluate import EvalConfig, evaluate
from ccds.flops import Ledger
from ccds.io import read_json, write_json
from ccds.models import load_causal_lm, pick_runtime
from ccds.tokenize import encode
from ccds.train import TrainConfig, train


def count_groups(examples) -> dict[str, int]:
    from ccds.data.composition import group

    return dict(Counter(group(e.source) for e in examples).most_common())


class Runner:
    def __init__(self, work: Path, pool, targets: dict, train_cfg: TrainConfig,
                 evals: dict[str, EvalConfig] | None = None, seed: int = 0):
        self.work, self.pool, self.targets, self.cfg, self.seed = work, pool, targets, \
            train_cfg, seed
        self.evals = evals or {}
        self.rt = pick_runtime()
        self.model, self.tok, _ = load_causal_lm(train_cfg.model)
        self.rt.place(self.model)
        self.lengths = np.array(encode(pool, self.tok, train_cfg.max_len).lengths)
        self.t0 = time.perf_counter()

    def evaluate(self, model, names, ledger: Ledger, label: str) -> dict:
        return {n: evaluate(model, self.tok, self.targets[n], self.evals.get(n, EvalConfig()),
                            runtime=self.rt, ledger=ledger, label=label, progress=None)
                for n in names}

    def base(self) -> dict:
        path = self.work / "runs" / "base.json"
        if not path.exists():
            ledger = Ledger()
            write_json(path, {"eval": self.evaluate(self.model, list(self.targets), ledger,
                                                    "base"), "ledger": ledger.to_dict()})
        return read_json(path)

    def run(self, key: str, idx: np.ndarray, names: list[str], selection: Ledger,
            order: str = "shuffle") -> dict:
        """Train on pool[idx] (in that order if order="given"), evaluate on `names`."""
        path = self.work / "runs" / f"{key}.json"
        if path.exists():
            return read_json(path)
        subset = [self.pool[i] for i in idx]
        ledger = Ledger()
        for s in selection.stages:
            ledger.add(s)
        res = train(subset, self.cfg.model_copy(update={"seed": self.seed, "order": order}),
                    model=self.model, tokenizer=self.tok, runtime=self.rt, ledger=ledger,
                    progress=None)
        ev = self.evaluate(res.model, names, ledger, key)
        self.model = res.model.unload()
        out = {"key": key, "n": len(idx), "tokens": int(self.lengths[idx].sum()),
               "sources": count_groups(subset), "ids": [self.pool[i].id for i in idx],
               "ledger": ledger.to_dict(), "eval": ev}
        write_json(path, out)
        print(f"  {key}: n={len(idx)} tokens={out['tokens']} "
              + " ".join(f"{n} nll={r['nll']:.3f} {r['metric']}={r['primary']:.3f}"
                         for n, r in ev.items())
              + f"  ({time.perf_counter() - self.t0:.0f} s)", flush=True)
        return out

    def meta(self, **extra) -> dict:
        import torch

        return {"command": "python " + " ".join(["benchmarks/" + Path(sys.argv[0]).name,
                                                 *sys.argv[1:]]),
                "date": str(date.today()),
                "machine": f"{cpu()}, "
                           f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
                           f"{self.rt.device.type} {self.rt.dtype_name}",
                "pool": {"size": len(self.pool), "tokens": int(self.lengths.sum()),
                         "sources": count_groups(self.pool)},
                "targets": {k: {"test": len(t.test), "val": len(t.val), "metric": t.metric}
                            for k, t in self.targets.items()},
                "train": self.cfg.model_dump(), "wall_s": time.perf_counter() - self.t0,
                **extra}
