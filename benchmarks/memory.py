"""Does scoring stream the pool? Peak memory of scoring 10k vs 100k real examples (issue 6).

Each (method, pool size) runs in a fresh process, on the path `ccds score` takes: the pool is
loaded with the CLI's loader, then the peak resident set is reset (/proc/self/clear_refs) and
the method scores it. "Scoring peak" is the peak during scoring minus the resident set before
it, so the pool's own footprint (held as Example objects) is reported apart. Streaming holds
when the 100k scoring peak exceeds the 10k one by less than the extra scores themselves
(90k float64 = 0.7 MB) plus the allocator's noise, which the repeats show. Both pools are
prefixes of one shuffled pool, so they hold the same mix of lengths (a batch's memory follows
its longest sequences and responses, not the pool's size).

The workers import ccds, so oneDNN's kernel caches are capped as ccds caps them (see
ccds/__init__.py); without the cap the perplexity pass's peak climbed with every new batch
shape (+1.85 GB from 10k to 100k at commit 14cf173). Wall times are only indicative: the
other rows' processes may share the CPU with other work.

Methods: BM25 (both passes), and perplexity scoring through the model pass with a 2-layer
model (SmolLM2's tokenizer, random weights): the memory of the pass is the code's, not the
model's; SmolLM2 itself would take hours at 100k on this CPU.

    .venv/bin/python benchmarks/memory.py            # ~10 min on the 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
from peak import cpu

HERE = Path(__file__).parent


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(method: str, pool: str, target: str, model: str) -> dict:
    """In a fresh process: load like the CLI, reset the peak, score, report MiB."""
    import gc

    from ccds.cli import _load_pool, _load_target
    from ccds.score import get_method, run

    start = _kib("VmRSS")
    examples = _load_pool(pool)
    tgt = _load_target(target)
    params = {"model": model} if method == "ppl" else {}
    m = get_method(method, **params)
    gc.collect()
    before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    scores = run(m, examples, tgt, cache=None)
    peak = _kib("VmHWM")
    vocab = None
    if method == "bm25":  # BM25's idf floor needs the whole pool's document frequencies
        from ccds.score.bm25 import CorpusStats

        vocab = len(CorpusStats.of(examples).df)
    return {"n": len(examples), "vocab": vocab, "pool_mib": (before - start) / 1024,
            "scoring_peak_mib": (peak - before) / 1024, "peak_mib": peak / 1024,
            "scores_mib": scores.values.nbytes / 2 ** 20, "wall_s": scores.stage.wall_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--methods", nargs="+", default=["bm25", "ppl"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", nargs=4, metavar=("METHOD", "POOL", "TARGET", "MODEL"))
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return 0

    sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
    from conftest import build_tiny_llama
    from speed_select import real_documents

    from ccds.data.formats import write_examples
    from ccds.io import write_json, write_text

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny_llama(Path(tmp) / "tiny"))
        docs = real_documents(max(args.sizes))  # shuffled: every size has the same mix
        docs = [docs[i] for i in np.random.default_rng(0).permutation(len(docs))]
        for n in args.sizes:
            pool = Path(tmp) / f"pool-{n}.jsonl"
            write_examples(docs[:n], pool)
            for method in args.methods:
                for rep in range(args.repeats):
                    cmd = [sys.executable, __file__, "--worker", method, str(pool), "mmlu", model]
                    env = {**os.environ, "CCDS_CACHE": str(Path(tmp) / "cache")}
                    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, env=env,
                                                  text=True).stdout.splitlines()[-1])
                    rows.append({"method": method, "repeat": rep, **r})
                    print(rows[-1], flush=True)
    small, big = min(args.sizes), max(args.sizes)
    verdict = {}
    for method in args.methods:
        def peaks(n, method=method):
            return [r["scoring_peak_mib"] for r in rows if r["method"] == method and r["n"] == n]
        extra_scores = (big - small) * 8 / 2 ** 20
        growth = float(np.median(peaks(big)) - np.median(peaks(small)))
        noise = float(max(np.ptp(peaks(big)), np.ptp(peaks(small))))
        verdict[method] = {"growth_mib": growth, "extra_scores_mib": extra_scores,
                           "bytes_per_extra_example": growth * 2 ** 20 / (big - small),
                           "repeat_spread_mib": noise, "streams": growth <= extra_scores + noise}
    r = {"command": "python benchmarks/memory.py " + " ".join(sys.argv[1:]),
         "date": str(date.today()), "machine": cpu(),
         "rows": rows, "verdict": verdict}
    write_json(args.out / "memory.json", r)
    lines = ["# Memory: does scoring stream the pool?", "",
             f"Command: `{r['command']}` — {r['date']}, {r['machine']}. Each row a fresh "
             "process; scoring peak = peak resident set during scoring − resident set before "
             "it (pool loaded). Pool = real text from ../shared/data, topped up with joined "
             "pairs; target MMLU (validation queries).", "",
             "| method | pool | pool in memory MiB | scoring peak MiB | scores MiB | wall s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {x['method']} | {x['n']:,} | {x['pool_mib']:.0f} | {x['scoring_peak_mib']:.1f} "
              f"| {x['scores_mib']:.2f} | {x['wall_s']:.1f} |" for x in rows]
    lines += ["", f"| method | scoring peak growth {small:,} → {big:,} MiB | per extra example "
              "| the extra scores MiB | spread over repeats MiB | streams |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {v['growth_mib']:+.1f} | {v['bytes_per_extra_example']:.0f} B | "
              f"{v['extra_scores_mib']:.2f} | {v['repeat_spread_mib']:.1f} | "
              f"{'yes' if v['streams'] else 'NO'} |" for m, v in verdict.items()]
    vocab = {x["n"]: x["vocab"] for x in rows if x.get("vocab")}
    if vocab:
        lines += ["", "BM25's pass 1 keeps the document frequency of every term in the pool "
                  "(Okapi's idf floor is a mean over the whole vocabulary), so its memory "
                  "follows the vocabulary, not the pool: "
                  + ", ".join(f"{v:,} terms at {n:,} examples" for n, v in sorted(vocab.items()))
                  + "."]
    write_text(args.out / "memory.md", "\n".join(lines + [""]))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
