"""Runs trained and evaluated with the stacks users already have, read without a CSV: Hugging
Face Trainer (and TRL) output folders with lm-evaluation-harness results files (spec §8), as
the rows `points.points_from_rows` reads, so they get the fits, frontiers and report a sweep
gets.

A manifest (YAML or JSON: the file itself, or `ccds-runs.yaml` in a folder) ties each run to
the selection it trained on; keys beside `runs` are defaults for every run, and paths are
relative to the manifest:

    model: meta-llama/Llama-2-7b-hf  # a name, hub id or folder with config.json (default: the
                                     # adapter's base_model_name_or_path)
    target: mmlu                     # the task in the results (default: the only one there)
    metric: acc,none                 # default: the first of acc, acc_norm, exact_match there
    zero_shot: results/base.json     # the untrained model's results, or a number: the fits' P0
    runs:
      - trainer_dir: runs/bm25-5     # the Trainer's output_dir
        results: results/bm25-5.json # lm_eval's results_*.json for the trained model
        subset: subsets/bm25-5.jsonl # from `ccds select`: its .selection.json gives the
                                     # method, fraction and selection FLOPs
      - trainer_dir: runs/random-10
        results: results/random-10.json
        method: random               # or named here (selection_flops too, for a costly one)
        fraction: 0.1

Also per run: `tokenizer` (default: the model's), `seed`, `max_length` (the trainer's, for
counting the subset; TRL's default 1024). Given a folder, every Trainer run in it must be
named: one left out would move the frontier silently.

Training FLOPs are ccds's (spec §2), never the Trainer's. T is the Trainer's
`num_input_tokens_seen`: every input position it ran, padding and prompt included (unless it
counted `non_padding`); N comes from the model's config with the run's own LoRA
(adapter_config.json; without one, full fine-tuning); the LM head runs on every position; the
attention term takes the subset's length profile (Σ L² / Σ L) when the run names its subset
and a tokenizer loads, and is left out, and said so, otherwise. A Trainer counts tokens only
with `include_num_input_tokens_seen`; without the count, T is the subset's tokens (as ccds
tokenizes them, no padding) times the epochs, and with no subset either it is an error. The
Trainer's `total_flos` (6 × every non-embedding weight, frozen ones and LoRA included, × the
padded T: about 1.5x the real cost of LoRA) stays beside each run with its ratio to ccds's
count, as a cross-check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..data.formats import SIDECAR_SUFFIX, check_sidecar, load_examples, sidecar_path
from ..errors import CcdsError
from ..flops import Work, attention_flops, full_step_flops, lora_step_flops, paper_flops
from ..io import read_json, read_text
from ..models import counts_without_weights, load_tokenizer, read_lora
from ..tokenize import encode
from .points import points_from_rows

MANIFEST_NAMES = ("ccds-runs.yaml", "ccds-runs.yml", "ccds-runs.json")
STATE = "trainer_state.json"
METRICS = ("acc", "acc_norm", "exact_match")  # the default metric: the first the task has


class RunSpec(BaseModel):
    """One run of a manifest (the module's docstring says what each key means)."""

    model_config = ConfigDict(extra="forbid")

    trainer_dir: str
    results: str
    subset: str | None = None
    method: str | None = None
    fraction: float | None = Field(None, gt=0)
    model: str | None = None
    tokenizer: str | None = None
    target: str | None = None
    metric: str | None = None
    zero_shot: float | str | None = None
    selection_flops: float | None = Field(None, ge=0)
    seed: int = 0
    max_length: int = Field(1024, gt=0)


def find_manifest(folder: Path) -> Path | None:
    return next((folder / n for n in MANIFEST_NAMES if (folder / n).is_file()), None)


def points_from_runs(source: Path | str, where: dict[str, str] | None = None
                     ) -> tuple[list[dict], dict[str, Any]]:
    """(runs, meta) as `points.read_points` gives them, from a manifest or a folder holding
    one; `where` keeps the runs whose columns have these values. Each run also carries its
    tokens, metric, stderr and the Trainer's `total_flos` beside ccds's count."""
    source = Path(source)
    manifest = find_manifest(source) if source.is_dir() else source
    if manifest is None:
        raise CcdsError(f"no run store (runs.sqlite) nor manifest ({MANIFEST_NAMES[0]}) here",
                        str(source), "pass a sweep's output folder, or name the Trainer runs "
                                     "in a manifest (see ccds.analyse.stacks)")
    if not manifest.is_file():
        raise CcdsError("no such manifest", str(manifest),
                        f"give a manifest of runs, or a folder holding {MANIFEST_NAMES[0]}")
    specs = read_manifest(manifest)
    base = manifest.parent
    if source.is_dir():
        _check_named(source, {(base / s.trainer_dir).resolve() for _, s in specs}, manifest)
    reader = _Reader()
    made = [reader.row(at, s, base) for at, s in specs]
    made = [(at, row, extra) for (at, _), (row, extra) in zip(specs, made, strict=True)
            if all(str(row.get(k, "")) == v for k, v in (where or {}).items())]
    if not made:
        raise CcdsError(f"no runs where {where}", str(manifest), "check the --where values")
    runs, meta = points_from_rows([(at, row) for at, row, _ in made], str(manifest))
    for r, (_, _, extra) in zip(runs, made, strict=True):
        r.update(extra)
    return runs, meta


def cross_check(runs: list[dict]) -> list[dict]:
    """Each Trainer run's `total_flos` beside ccds's counts, and the N it implies (its
    total_flos / 6T), so a reader sees where the two conventions part."""
    out = []
    for r in runs:
        if "trainer_total_flos" not in r:
            continue
        flos, t = r["trainer_total_flos"], r["tokens"]
        out.append({"run": f"{r['method']} {r['fraction']:.1%}", "trainer_dir": r["trainer_dir"],
                    "training": r["training"], "tokens": t,
                    "training_flops": r["training_flops"],
                    "training_paper_flops": r["training_paper_flops"],
                    "attention_flops": r["attention_flops"], "trainer_total_flos": flos,
                    "total_flos_ratio": r["total_flos_ratio"],
                    "trainer_params": flos / (6 * t) if flos is not None and t else None})
    return out


# -- the manifest -------------------------------------------------------------------------

def read_manifest(path: Path) -> list[tuple[str, RunSpec]]:
    """(file:line, run) for each run of a manifest, its defaults applied."""
    import yaml

    text = read_text(path)
    try:  # YAML reads JSON too, and keeps the lines to name in errors
        data, root = yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise CcdsError(f"malformed manifest ({getattr(e, 'problem', e)})",
                        f"{path}:{mark.line + 1}" if mark else str(path)) from None
    fix = "a list of runs (trainer_dir, results, subset or method and fraction), or a " \
          "mapping with defaults and `runs`"
    defaults: dict[str, Any] = {}
    if isinstance(data, dict) and isinstance(data.get("runs"), list):
        defaults = {k: v for k, v in data.items() if k != "runs"}
        for key, value in root.value:
            if key.value not in ("runs", *RunSpec.model_fields):
                raise CcdsError(f"unknown key '{key.value}'",
                                f"{path}:{key.start_mark.line + 1}", fix)
            if key.value == "runs":
                items = value.value
        runs = data["runs"]
    elif isinstance(data, list):
        runs, items = data, root.value
    else:
        raise CcdsError("not a manifest of runs", str(path), fix)
    if not runs:
        raise CcdsError("the manifest names no runs", str(path), fix)
    out, seen = [], {}
    for entry, item in zip(runs, items, strict=True):
        at = f"{path}:{item.start_mark.line + 1}"
        if not isinstance(entry, dict):
            raise CcdsError("a run is a mapping", at, fix)
        try:
            spec = RunSpec(**{**defaults, **entry})
        except ValidationError as e:
            err = e.errors()[0]
            raise CcdsError(f"bad run key '{'.'.join(map(str, err['loc']))}': {err['msg']}", at,
                            "see the manifest's keys in ccds.analyse.stacks") from None
        if spec.trainer_dir in seen:
            raise CcdsError(f"{spec.trainer_dir} is named twice (first at "
                            f"{seen[spec.trainer_dir]})", at, "name each run once")
        seen[spec.trainer_dir] = at
        out.append((at, spec))
    return out


def _check_named(folder: Path, named: set[Path], manifest: Path) -> None:
    """Every Trainer run in `folder` is one the manifest names (or inside one)."""
    for state in sorted(folder.rglob(STATE)):
        if not any(p.resolve() in named for p in state.parents):
            run = state.parent.parent if state.parent.name.startswith("checkpoint-") else \
                state.parent
            raise CcdsError(f"a Trainer run that {manifest.name} does not name", str(run),
                            f"add its folder to {manifest} (with its subset, or method and "
                            f"fraction), or move it out of {folder}")


# -- one run ------------------------------------------------------------------------------

class _Reader:
    """Reads runs, loading each model's counts, tokenizer and subset once."""

    def __init__(self):
        self.counts: dict[tuple[str, str], dict[str, int]] = {}
        self.tokenizers: dict[str, Any] = {}
        self.lengths: dict[tuple[Path, str, int], np.ndarray] = {}

    def row(self, at: str, spec: RunSpec, base: Path) -> tuple[dict, dict]:
        """(the points row, what rides beside it) of one run."""
        run_dir = base / spec.trainer_dir
        state_path, state = trainer_state(run_dir)
        side, side_at = _sidecar(spec, base)
        method, fraction = _method_fraction(at, spec, side)
        lora = read_lora(state_path.parent) or read_lora(run_dir)
        model = spec.model or (lora.base_model_name_or_path if lora else None)
        if not model:
            raise CcdsError("no model named, and no adapter naming its base", at,
                            "give the run's model (a name, hub id or folder with config.json)")
        p = self._counts(_local(model, base), lora)
        seen = int(state.get("num_input_tokens_seen") or 0)  # 0: the Trainer did not count
        lengths = self._subset_lengths(side, side_at, spec, model, base, needed=seen <= 0)
        epochs = float(state.get("epoch") or 0.0)
        if seen > 0:
            t = seen
            t_sq = t * float((lengths ** 2).sum() / lengths.sum()) if lengths is not None else 0
        elif lengths is not None:
            t, t_sq = round(epochs * int(lengths.sum())), epochs * float((lengths ** 2).sum())
        else:
            raise CcdsError("no num_input_tokens_seen (a Trainer counts tokens only when asked)",
                            str(state_path), "train with include_num_input_tokens_seen=True, "
                            "or name the run's subset in the manifest so ccds counts them")
        w = Work(tokens=t, tokens_sq=round(t_sq), head_tokens=t, padded_tokens=t)
        training = (lora_step_flops if lora else full_step_flops)(p, w)
        perf, stderr, metric, task = lm_eval_metric(base / spec.results, spec.target,
                                                    spec.metric)
        sel, sel_paper = _selection_flops(at, spec, side, method)
        flos = state.get("total_flos")
        flos = float(flos) if isinstance(flos, (int, float)) else None
        row = {"method": method, "fraction": fraction, "perf": perf, "model": model,
               "target": task, "seed": spec.seed, "selection_flops": sel,
               "training_flops": training, "selection_paper_flops": sel_paper,
               "training_paper_flops": paper_flops(p, t, True),
               "zero_shot": _zero_shot(spec.zero_shot, base, task, metric),
               "params": p["active"],
               "pool_tokens": t / (fraction * epochs) if epochs > 0 else None}
        extra = {"n": side["n"] if side else None, "tokens": t, "metric": metric,
                 "perf_stderr": stderr, "trainer_dir": str(run_dir),
                 "training": "lora" if lora else "full", "trainer_total_flos": flos,
                 "total_flos_ratio": flos / training if flos is not None and training else None,
                 "attention_flops": 3 * attention_flops(p, w) if lengths is not None else None}
        return row, extra

    def _counts(self, model: str, lora) -> dict[str, int]:
        key = (model, json.dumps(lora.to_dict() if lora else None, sort_keys=True, default=str))
        if key not in self.counts:
            self.counts[key] = counts_without_weights(model, lora)
        return self.counts[key]

    def _subset_lengths(self, side: dict | None, side_at: Path | None, spec: RunSpec,
                        model: str, base: Path, needed: bool) -> np.ndarray | None:
        """Token lengths of the run's subset as ccds tokenizes it, or None without a subset,
        or without a tokenizer when none was named and the Trainer counted the tokens."""
        if side is None or side_at is None:
            return None
        name = _local(spec.tokenizer or model, base)
        key = (side_at, name, spec.max_length)
        if key not in self.lengths:
            if name not in self.tokenizers:
                try:
                    self.tokenizers[name] = load_tokenizer(name)
                except CcdsError:
                    if spec.tokenizer or needed:
                        raise
                    self.tokenizers[name] = None
            tok = self.tokenizers[name]
            if tok is None:
                return None
            data = side_at.parent / str(side.get("file", ""))
            self.lengths[key] = encode(load_examples(data), tok, spec.max_length).lengths
        return self.lengths[key]


def trainer_state(run_dir: Path) -> tuple[Path, dict]:
    """The latest trainer_state.json of a Trainer output folder: its own (save_state) or its
    last checkpoint's, whichever is furthest on."""
    if not run_dir.is_dir():
        raise CcdsError("no such Trainer output folder", str(run_dir),
                        "give the Trainer's output_dir as trainer_dir")
    found = [p for p in (run_dir / STATE, *run_dir.glob(f"checkpoint-*/{STATE}")) if p.is_file()]
    if not found:
        raise CcdsError(f"a Trainer folder without {STATE} (nor checkpoint-*/{STATE})",
                        str(run_dir), "train with a save_strategy, or call trainer.save_state() "
                                      "after training")
    states = []
    for i, p in enumerate(found):
        d = read_json(p)
        if not (isinstance(d, dict) and isinstance(d.get("global_step"), int)
                and isinstance(d.get("log_history"), list)):
            raise CcdsError("not a Trainer state (no global_step and log_history)", str(p),
                            "give the folder a transformers Trainer wrote")
        states.append((d["global_step"], -i, p, d))
    _, _, path, state = max(states, key=lambda s: s[:2])
    return path, state


def lm_eval_metric(path: Path, task: str | None, metric: str | None
                   ) -> tuple[float, float | None, str, str]:
    """(value, stderr or None (lm-eval writes "N/A" where it has none), metric key, task) of
    one task of an lm-evaluation-harness results file."""
    if not path.is_file():
        raise CcdsError("no such results file", str(path),
                        "give the results_*.json that lm_eval --output_path wrote")
    d = read_json(path)
    res = d.get("results") if isinstance(d, dict) else None
    if not (isinstance(res, dict) and res and all(isinstance(v, dict) for v in res.values())
            and any("," in k for v in res.values() for k in v)):
        raise CcdsError("not an lm-evaluation-harness results file (no results of task → "
                        "'metric,filter' values)", str(path),
                        "give the results_*.json that lm_eval --output_path wrote")
    if task is None:
        if len(res) != 1:
            raise CcdsError(f"{len(res)} tasks here ({', '.join(res)})", str(path),
                            "name the one to analyse as the manifest's target")
        task = next(iter(res))
    if task not in res:
        raise CcdsError(f"no task '{task}' (it has {', '.join(res)})", str(path),
                        "name a task of the results file as target")
    row = res[task]
    key = _metric_key(row, metric, f"{path}", task)
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise CcdsError(f"{task} {key} is {value!r}, not a number", str(path),
                        "choose a metric lm-eval computed")
    name, _, filt = key.partition(",")
    se = row.get(f"{name}_stderr,{filt}")
    stderr = float(se) if isinstance(se, (int, float)) and not isinstance(se, bool) else None
    return float(value), stderr, key, task


def _metric_key(row: dict, metric: str | None, where: str, task: str) -> str:
    """`metric` as a key of the task's results ('acc' finds 'acc,none'), or by default the
    first of METRICS it has."""
    if metric in row:
        return str(metric)
    keys = [k for k in row if "," in k and "_stderr," not in k]
    names = [metric] if metric else METRICS
    hits = next(([k for k in keys if k.split(",")[0] == n] for n in names
                 if any(k.split(",")[0] == n for k in keys)), [])
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise CcdsError(f"{task} has {', '.join(hits)}", where,
                        f"name one as the manifest's metric, e.g. {hits[0]}")
    raise CcdsError(f"{task} has no {metric or ', '.join(METRICS)} (it has {', '.join(keys)})",
                    where, "name one of its metrics as the manifest's metric")


def _local(name: str, base: Path) -> str:
    """A model or tokenizer named by a path relative to the manifest, else as given (an
    alias or hub id); a config.json file stands for its folder."""
    p = base / name
    if p.is_file() and p.name == "config.json":
        p = p.parent
    return str(p) if p.is_dir() else name


def _sidecar(spec: RunSpec, base: Path) -> tuple[dict | None, Path | None]:
    """The run's subset sidecar (the subset named, or its sidecar), checked against the file."""
    if spec.subset is None:
        return None, None
    path = base / spec.subset
    side_at = path if path.name.endswith(SIDECAR_SUFFIX) else sidecar_path(path)
    return check_sidecar(side_at, None), side_at


def _method_fraction(at: str, spec: RunSpec, side: dict | None) -> tuple[str, float]:
    """From the sidecar (its budget's fraction, else n / pool size) or the manifest; both
    given, they must agree."""
    found: dict[str, Any] = {"method": None, "fraction": None}
    if side:
        budget = side.get("budget") or {}
        found["method"] = side.get("method")
        found["fraction"] = budget.get("fraction") or (
            side["n"] / side["pool_size"] if side.get("pool_size") else None)
    for key, given in (("method", spec.method), ("fraction", spec.fraction)):
        if given is not None and found[key] is not None and (
                given != found[key] if key == "method" else not np.isclose(given, found[key])):
            raise CcdsError(f"{key} {given} differs from the subset's {found[key]}", at,
                            f"drop {key} from the run, or name the subset it trained on")
        found[key] = given if given is not None else found[key]
    if found["method"] is None or found["fraction"] is None:
        raise CcdsError("the run has no method and fraction", at,
                        "name its subset (the .selection.json `ccds select` wrote says both), or "
                        "give method and fraction")
    return str(found["method"]), float(found["fraction"])


def _selection_flops(at: str, spec: RunSpec, side: dict | None, method: str
                     ) -> tuple[float, float]:
    """(ccds, paper) selection FLOPs: the manifest's (both conventions), else the sidecar's,
    else 0 for random; a costly method without them is an error, never a free selection."""
    if spec.selection_flops is not None:
        return spec.selection_flops, spec.selection_flops
    if side and side.get("selection_flops") is not None:
        sel = float(side["selection_flops"])
        return sel, float(side.get("selection_paper_flops", sel))
    if method == "random":
        return 0.0, 0.0
    raise CcdsError(f"no selection FLOPs for {method}", at,
                    "give selection_flops (what scoring the pool cost), or select with ccds, "
                    "whose sidecar records it")


def _zero_shot(value: float | str | None, base: Path, task: str, metric: str) -> float | None:
    if value is None or isinstance(value, float):
        return value
    return lm_eval_metric(base / value, task, metric)[0]
