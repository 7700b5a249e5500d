"""Runs made anywhere, as a CSV or JSONL of points, in the shape `analyze` reads from a run
store, so a cluster's own results get the same fits, frontiers, break-even and report.

One row per run. Required: `method`, `fraction`, the performance (`perf`, or `accuracy` /
`performance`: higher is better), and either `selection_flops` and `training_flops`, or
`total_flops`. Optional: `model`, `target` (or `task`), `seed`, `zero_shot` (the untrained
model's performance: the fit's P0), `c_full` (FLOPs of training on the whole pool),
`params` and `pool_tokens` (N and T of the trained model and pool, for `ccds plan`), and
`selection_paper_flops` with `training_paper_flops` (the same runs in the paper's 6·N·T
convention; without them the file's numbers serve both conventions).

With only `total_flops`, a run's training is `fraction · C_full` and its selection the rest.
C_full comes from a `c_full` column, else from `random`'s runs (free to select, so their
total is their training: C_full = total / fraction). Without `params` and `pool_tokens`,
N · T is taken as C_full / 6, the paper's 6·N·T convention.

`points_from_rows` is the same reading for rows made in memory (`stacks.py`: Trainer runs and
lm-eval results), so every source of runs ends in one shape.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from ..errors import CcdsError

PERF = ("perf", "accuracy", "performance")
PAPER = ("selection_paper_flops", "training_paper_flops")
NUMBERS = ("fraction", "selection_flops", "training_flops", "total_flops", "zero_shot",
           "c_full", "params", "pool_tokens", *PERF, *PAPER)


def read_points(path: Path | str, where: dict[str, str] | None = None
                ) -> tuple[list[dict], dict[str, Any]]:
    """(runs, meta) as a run store would give them; `where` keeps the rows whose columns
    have these values (e.g. {"view": "compute_constrained"})."""
    path = Path(path)
    rows = [(f"{path}:{line}", r) for line, r in _rows(path)
            if all(str(r.get(k, "")) == v for k, v in (where or {}).items())]
    if not rows:
        raise CcdsError("no points" + (f" where {where}" if where else ""), str(path),
                        "give one row per run: method, fraction, performance and FLOPs")
    return points_from_rows(rows, str(path))


def points_from_rows(rows: list[tuple[str, dict]], source: str
                     ) -> tuple[list[dict], dict[str, Any]]:
    """(runs, meta) from (where, row) pairs with the columns above, runs in row order;
    `where` names a row in errors, `source` the whole set."""
    runs = [_run(at, r) for at, r in rows]
    meta: dict[str, Any] = {}
    for model in sorted({r["model"] for r in runs}):
        mine = [r for r in runs if r["model"] == model]
        c_full = _c_full(source, model, mine)
        own_paper = any(r["training_paper_flops"] is not None for r in mine)
        for r in mine:
            if r["training_flops"] is None:
                r["training_flops"] = r["fraction"] * c_full
                r["selection_flops"] = max(r.pop("total") - r["training_flops"], 0.0)
            r.pop("total", None)
            if r["training_paper_flops"] is None:  # the file's own convention serves both
                r["selection_paper_flops"] = r["selection_flops"]
                r["training_paper_flops"] = r["training_flops"]
        paper = _median([r["training_paper_flops"] / r["fraction"] for r in mine]
                        ) if own_paper else c_full
        nt = [r["_nt"] for r in mine if r["_nt"]]
        n, t = nt[0] if nt else (c_full / 6, 1.0)
        meta[f"c_full/{model}"] = {"analytic": c_full, "paper": paper, "pool_tokens": t,
                                   "params": {"non_embedding": n}}
        for target in sorted({r["target"] for r in mine}):
            zero = [r["_zero"] for r in mine if r["target"] == target and r["_zero"] is not None]
            if zero:
                meta[f"zero_shot/{target}/{model}"] = {"perf": zero[0]}
    for r in runs:
        del r["_nt"], r["_zero"]
    return runs, meta


def _rows(path: Path):
    """(line number, row dict) from a .csv or .jsonl file."""
    if not path.is_file():
        raise CcdsError("no such points file", str(path), "give a .csv or .jsonl of runs")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        for i, r in enumerate(reader, start=2):
            yield i, {k.strip(): (v or "").strip() for k, v in r.items() if k}
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    r = json.loads(line)
                except ValueError:
                    raise CcdsError("not a JSON object", f"{path}:{i}",
                                    "one JSON object per line") from None
                if not isinstance(r, dict):
                    raise CcdsError("not a JSON object", f"{path}:{i}",
                                    "one JSON object per line")
                yield i, r
    else:
        raise CcdsError(f"cannot read points from a {path.suffix or 'suffix-less'} file",
                        str(path), "give a .csv or .jsonl (or a sweep's output folder)")


def _num(at: str, r: dict, key: str) -> float | None:
    v = r.get(key)
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise CcdsError(f"{key} {v!r} is not a number", at, "fix the row") from None
    if not math.isfinite(x):
        raise CcdsError(f"{key} is {v}", at, "give a finite number")
    return x


def _run(at: str, r: dict) -> dict:
    if not str(r.get("method", "")).strip():
        raise CcdsError("missing method", at, "name the selection method of every row")
    nums = {k: _num(at, r, k) for k in NUMBERS}
    perf = next((nums[k] for k in PERF if nums[k] is not None), None)
    if perf is None:
        raise CcdsError("missing performance", at, f"give one of the columns {', '.join(PERF)}")
    f = nums["fraction"]
    if f is None or not f > 0:  # above 1: more training than one pass over the pool
        raise CcdsError(f"fraction {r.get('fraction')!r} is not positive", at,
                        "the share of the pool trained on, e.g. 0.05")
    sel, tr, total = nums["selection_flops"], nums["training_flops"], nums["total_flops"]
    if (sel is None) != (tr is None) or (sel is None and total is None):
        raise CcdsError("missing FLOPs", at, "give selection_flops and training_flops, or "
                                             "total_flops")
    sel_p, tr_p = nums["selection_paper_flops"], nums["training_paper_flops"]
    if (sel_p is None) != (tr_p is None) or (sel_p is not None and sel is None):
        raise CcdsError("paper-convention FLOPs without their pair", at,
                        "give selection_paper_flops and training_paper_flops together, beside "
                        "selection_flops and training_flops")
    if any(x is not None and x < 0 for x in (sel, tr, total, sel_p, tr_p)):
        raise CcdsError("negative FLOPs", at, "FLOPs are counts of work")
    nt = (nums["params"], nums["pool_tokens"])
    return {"method": str(r["method"]).strip(), "fraction": f,
            "model": str(r.get("model") or "model"),
            "target": str(r.get("target") or r.get("task") or "target"),
            "seed": int(_num(at, r, "seed") or 0), "perf": perf, "selection_flops": sel,
            "training_flops": tr, "selection_paper_flops": sel_p, "training_paper_flops": tr_p,
            "total": total, "c_full_row": nums["c_full"],
            "ids": [], "_nt": nt if None not in nt else None, "_zero": nums["zero_shot"]}


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _c_full(source: str, model: str, runs: list[dict]) -> float:
    given = {r.pop("c_full_row") for r in runs} - {None}
    if len(given) > 1:
        raise CcdsError(f"model {model} has {len(given)} different c_full values", source,
                        "give one C_full per model")
    if given:
        return given.pop()
    if all(r["training_flops"] is not None for r in runs):  # training scales with the fraction
        return _median([r["training_flops"] / r["fraction"] for r in runs])
    free = [r["total"] / r["fraction"] for r in runs if r["method"] == "random"
            and r["total"] is not None]
    if not free:
        raise CcdsError(f"cannot tell C_full for model {model}", source,
                        "add a c_full column, or random's runs (free to select)")
    return sum(free) / len(free)
