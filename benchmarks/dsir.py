"""DSIR beside its reference implementation, p-lambda's `data-selection` (issue 23), on a
real pool, in one run: the log importance weights of both (Spearman), the top 5% each
selects (overlap), and examples per second.

The pool is built from ../shared/data with ccds's own pool builder (BIG-bench, GSM8K train
and Alpaca, copies of the targets dropped); the targets are GSM8K and MMLU (their V). Both
implementations see the same text per example (prompt, a newline, response) and run in one
process: ccds's `run` with the local backend (two streamed passes, cold n-gram memo), the
package's `HashedNgramDSIR` with num_proc=1 (`fit_importance_estimator` +
`compute_importance_weights`, reading its JSONL as it is designed to). Two top-5% overlaps:
by log w over the whole pool, and the two selections as shipped (top-k among examples of at
least 100 tokens: ccds's `select` on `resample=topk` scores, the package's
`resample(top_k=True)`).

    pip install data-selection nltk          # the dev extra: the package imports nltk
    .venv/bin/python benchmarks/dsir.py      # ~2 min on the 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from ccds.data.pool import build_pool
from ccds.data.sources import load_target
from ccds.data.types import Example, Target
from ccds.io import write_json, write_text
from ccds.score import Context, get_method, run
from ccds.score import dsir as ccds_dsir
from ccds.select import select

SOURCES = [("bigbench", 3000), ("gsm8k", 2000), ("alpaca", 5000)]
TARGETS = ["gsm8k", "mmlu"]
FRACTION = 0.05


def real_pool(data_dir=None, sources=SOURCES, targets=TARGETS) -> list[Example]:
    """A pool built the way `ccds data build-pool` builds one, with the targets' copies out."""
    pool, _ = build_pool(list(sources), [load_target(t, data_dir) for t in targets],
                         data_dir=data_dir)
    return pool


def reference(pool: list[Example], target: Target, work: Path, *, count: int,
              min_length: int = 100, num_proc: int = 1) -> dict:
    """The package's log weights of `pool` for `target`, its top-k selection of `count`
    examples of at least `min_length` tokens (pool indices), and its scoring time."""
    from data_selection import HashedNgramDSIR

    if num_proc != 1:  # it deals the lines of one file out to its processes in turn
        raise ValueError("compare with num_proc=1: the package interleaves a file's shards")
    text = ccds_dsir.Featuriser().text_of
    work.mkdir(parents=True, exist_ok=True)
    for name, rows in (("raw", pool), ("target", target.val)):
        with open(work / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": text(e), "i": i}) + "\n"
                         for i, e in enumerate(rows))
    d = HashedNgramDSIR([str(work / "raw.jsonl")], [str(work / "target.jsonl")],
                        str(work / "cache"), num_proc=num_proc, min_example_length=min_length)
    t = time.perf_counter()
    d.fit_importance_estimator(num_tokens_to_fit="all")
    d.compute_importance_weights()
    seconds = time.perf_counter() - t
    shards = sorted((work / "cache" / "log_importance_weights").glob("*.npy"),
                    key=lambda p: int(p.stem))
    logw = np.concatenate([np.load(p) for p in shards])
    d.resample(str(work / "selected"), num_to_sample=count, cache_dir=str(work / "tmp"),
               top_k=True)
    chosen = {json.loads(line)["i"] for p in (work / "selected").glob("*.jsonl")
              for line in p.read_text(encoding="utf-8").splitlines() if line.strip()}
    return {"log_weights": logw, "selected": chosen, "seconds": seconds}


def ccds_scores(pool, target, **params) -> tuple[np.ndarray, float]:
    """ccds's `resample=topk` scores (cold: no n-gram remembered from an earlier run) and
    the wall time of scoring."""
    ccds_dsir._MEMO.clear()
    t = time.perf_counter()
    s = run(get_method("dsir", resample="topk", **params), pool, target, cache=None,
            ctx=Context(progress=False, measure_flops=False))
    return s.values, time.perf_counter() - t


def compare(pool, target, work: Path, repeats: int = 1) -> dict:
    """The figures for one target: agreement, and each side's median examples/s."""
    k = max(1, round(FRACTION * len(pool)))
    logw, ours_s = zip(*(ccds_scores(pool, target, min_length=0) for _ in range(repeats)),
                       strict=True)
    filtered, _ = ccds_scores(pool, target)  # min_length 100, as the package's default
    refs = [reference(pool, target, work / f"ref{i}", count=k) for i in range(repeats)]
    ref = refs[0]
    top = [set(np.argsort(-w, kind="stable")[:k].tolist()) for w in (logw[0],
                                                                      ref["log_weights"])]
    ours_selected = set(select(filtered, count=k).tolist())
    ccds_t, ref_t = float(np.median(ours_s)), float(np.median([r["seconds"] for r in refs]))
    return {"target": target.name, "val": len(target.val), "pool": len(pool), "k": k,
            "spearman": float(spearmanr(logw[0], ref["log_weights"]).statistic),
            "max_abs_diff": float(np.max(np.abs(logw[0] - ref["log_weights"]))),
            "overlap_logw": len(top[0] & top[1]) / k,
            "overlap_selected": len(ours_selected & ref["selected"]) / k,
            "ccds_s": ccds_t, "reference_s": ref_t,
            "ccds_examples_per_s": len(pool) / ccds_t,
            "reference_examples_per_s": len(pool) / ref_t,
            "speedup": ref_t / ccds_t, "repeats": repeats}


def markdown(r: dict) -> str:
    lines = ["# DSIR beside data-selection (p-lambda's reference)", "",
             f"Command: `{r['command']}` — {r['date']}, {r['machine']}, "
             f"{r['wall_s'] / 60:.1f} min. Pool: {r['pool']:,} examples ({r['sources']}); "
             f"data-selection {r['reference_version']}, nltk {r['nltk_version']}; one "
             f"process each, median of {r['rows'][0]['repeats']} runs.", "",
             "| target | V | Spearman of log w | max abs diff | top-5% overlap, log w | "
             "top-5% overlap, selections (≥ 100 tokens) | ccds ex/s | data-selection ex/s "
             "| speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['target']} | {x['val']} | {x['spearman']:.6f} | "
                     f"{x['max_abs_diff']:.3g} | {x['overlap_logw']:.3f} | "
                     f"{x['overlap_selected']:.3f} | {x['ccds_examples_per_s']:,.0f} | "
                     f"{x['reference_examples_per_s']:,.0f} | {x['speedup']:.1f}x |")
    lines += ["", "Targets of issue 23: Spearman ≥ 0.99 and top-5% overlap ≥ 95%. Both hash "
              "the same tokens (nltk's `\\w+|[^\\w\\s]+` in the `regex` engine) the same "
              "way, so the log weights differ only by summation order. Short examples: the "
              "package drops those under 100 tokens when it resamples, ccds ranks them "
              "after the rest; top-k selections compared at that default.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import data_selection
    import nltk
    from peak import cpu

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    pool = real_pool()
    r = {"command": " ".join(["python benchmarks/dsir.py",
                              *(sys.argv[1:] if argv is None else argv)]),
         "date": str(date.today()), "machine": cpu(), "pool": len(pool),
         "sources": ", ".join(f"{s}@{n}" for s, n in SOURCES),
         "reference_version": data_selection.__version__, "nltk_version": nltk.__version__,
         "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in TARGETS:
            row = compare(pool, load_target(name), Path(tmp) / name, args.repeats)
            print(row, flush=True)
            r["rows"].append(row)
    r["wall_s"] = time.perf_counter() - t0
    write_json(args.out / "dsir.json", r)
    write_text(args.out / "dsir.md", markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
