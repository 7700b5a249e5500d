"""What glibc's malloc costs a CPU pass, as it comes and as ccds sets it
(`models.keep_freed_memory`).

Each run is a fresh process (the allocator's state is per process), the two settings
alternating: one scores the same real examples with SmolLM2-135M three times (the first pass
builds what later ones reuse), the other fine-tunes on them once with LoRA, as a `ccds train`
process does. Each reports wall time, minor page faults and peak resident memory.

    .venv/bin/python benchmarks/malloc.py       # ~6 min on the 2-core CPU
    .venv/bin/python benchmarks/malloc.py --dtype fp32    # results/malloc-fp32.*
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
SETTINGS = ("glibc default", "kept (ccds)")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def worker(pass_: str, keep: bool, examples: int, dtype: str) -> dict:
    """In this fresh process: the pass on `examples` real examples, under one setting."""
    from speed_lm import placed, real_pool

    from ccds import models
    from ccds.flops import Ledger
    from ccds.lm import score_sequences
    from ccds.tokenize import encode
    from ccds.train import TrainConfig, train

    if not keep:
        models.keep_freed_memory = lambda: False  # read by pick_runtime below
    rt = models.pick_runtime(dtype=dtype)
    model, tok, _ = models.load_causal_lm("smollm2-135m")
    pool = real_pool(300)[:examples]
    times, faults = [], []
    if pass_ == "score":
        model, enc = placed(model, rt), encode(pool, tok, 512)
        for _ in range(3):
            f, t = _faults(), time.perf_counter()
            score_sequences(model, enc, tok.pad_token_id, rt)
            times.append(time.perf_counter() - t)
            faults.append(_faults() - f)
    else:  # speed_lm's training config
        cfg = TrainConfig(epochs=1, lr=2e-4, batch_tokens=2048, max_len=512)
        f, t = _faults(), time.perf_counter()
        train(pool, cfg, model=copy.deepcopy(model), tokenizer=tok, runtime=rt,
              ledger=Ledger(), progress=None)
        times.append(time.perf_counter() - t)
        faults.append(_faults() - f)
    return {"times_s": times, "faults": faults,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def summarise(runs: list[dict]) -> dict:
    """Per setting: the median of each pass's time over the processes, and the faults."""
    times = np.array([r["times_s"] for r in runs])
    return {"median_s": np.median(times, axis=0).tolist(), "min_s": times.min(0).tolist(),
            "max_s": times.max(0).tolist(),
            "faults": np.median([r["faults"] for r in runs], axis=0).tolist(),
            "peak_rss_mb": float(max(r["peak_rss_mb"] for r in runs))}


def markdown(r: dict) -> str:
    def row(pass_: str, label: str, i: int) -> str:
        plain, kept = (r[pass_][s] for s in SETTINGS)
        cells = [f"{x['median_s'][i]:.2f} s ({x['min_s'][i]:.2f}–{x['max_s'][i]:.2f}), "
                 f"{x['faults'][i]:,.0f} faults" for x in (plain, kept)]
        return (f"| {label} | {' | '.join(cells)} | "
                f"{plain['median_s'][i] / kept['median_s'][i]:.2f}x |")

    score, train = r["score"], r["train"]
    return "\n".join([
        "# glibc's malloc on a CPU pass: as it comes, and keeping freed memory", "",
        f"Command: `{r['command']}` — {r['date']}, {r['machine']}, torch {r['torch']}; "
        f"{r['examples']['score']} real examples scored, {r['examples']['train']} trained on "
        f"(speed_lm's pool and training config), SmolLM2-135M in {r['dtype']} "
        f"({'ccds default here' if r.get('requested', 'auto') == 'auto' else 'forced'}); {r['repeats']} fresh processes per setting and pass, "
        "alternating; median time (min–max) and median minor page faults.", "",
        "| pass | glibc default | kept (ccds) | speedup |", "|---|---|---|---|",
        row("score", "scoring, first pass of the process", 0),
        row("score", "scoring, second pass", 1),
        row("score", "scoring, third pass", 2),
        row("train", "LoRA training (the process's only pass)", 0), "",
        "Peak resident memory: scoring "
        + " vs ".join(f"{score[s]['peak_rss_mb']:,.0f}" for s in SETTINGS)
        + " MB, training " + " vs ".join(f"{train[s]['peak_rss_mb']:,.0f}" for s in SETTINGS)
        + " MB (default vs kept).", "",
        "`models.keep_freed_memory` (called by `pick_runtime` on a CPU) sets glibc's mmap "
        "threshold to 32 MiB, its trim threshold to 1 GiB and its top pad to 64 MiB: the "
        "temporaries a batch frees come back from the heap for the next batch instead of "
        "being unmapped or trimmed and page-faulted in again, zero-filled. As glibc comes, "
        "its thresholds move with what was freed last, so a later pass may fault little or "
        "millions of pages, from process to process. The first training run of a process "
        "still faults its whole peak in once: kept memory helps the passes after it.", ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--score", type=int, default=300, help="examples scored")
    ap.add_argument("--train", type=int, default=100, help="examples trained on")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="auto", help="auto (ccds's choice here), fp32 or bf16")
    ap.add_argument("--examples", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=("score", "train"), help=argparse.SUPPRESS)
    ap.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.keep, args.examples, args.dtype)))
        return 0
    import torch
    from peak import cpu

    from ccds.io import write_json, write_text
    from ccds.models import pick_runtime

    t0 = time.perf_counter()
    runs: dict[str, dict[str, list]] = {p: {s: [] for s in SETTINGS} for p in ("score", "train")}
    for pass_ in runs:
        for _ in range(args.repeats):
            for setting in SETTINGS:
                n = args.score if pass_ == "score" else args.train
                cmd = [sys.executable, __file__, "--worker", pass_, "--examples", str(n),
                       "--dtype", args.dtype]
                cmd += ["--keep"] if setting != SETTINGS[0] else []
                p = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=HERE)
                runs[pass_][setting].append(json.loads(p.stdout.strip().splitlines()[-1]))
                print(pass_, setting, runs[pass_][setting][-1], flush=True)
    res = {"command": " ".join(["python benchmarks/malloc.py", *sys.argv[1:]]),
           "date": str(date.today()), "machine": cpu(), "torch": torch.__version__,
           "dtype": pick_runtime(dtype=args.dtype).dtype_name,
           "examples": {"score": args.score, "train": args.train}, "requested": args.dtype,
           "repeats": args.repeats, "wall_s": time.perf_counter() - t0, "runs": runs,
           **{p: {s: summarise(v) for s, v in r.items()} for p, r in runs.items()}}
    name = "malloc" if args.dtype == "auto" else f"malloc-{args.dtype}"
    write_json(args.out / f"{name}.json", res)
    write_text(args.out / f"{name}.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
