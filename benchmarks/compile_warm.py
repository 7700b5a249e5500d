"""What compiling ccds's elementwise kernels costs into an empty inductor cache and in a
later process that finds them there: the numbers behind `decoder.COMPILE_SECONDS` and
`decoder.WARM_COMPILE_SECONDS`.

Two fresh processes share one new inductor cache; each scores the same real examples with
SmolLM2-135M three times with the kernels compiled (`CCDS_COMPILE=on`). A pass's compile
cost is its first pass's time beyond the later ones'.

    .venv/bin/python benchmarks/compile_warm.py       # ~2 min on the 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).parent


def worker(examples: int) -> dict:
    """In a fresh process: three compiled scoring passes, and what ccds prices the build at
    before the first (`decoder.compile_seconds`)."""
    import torch
    from speed_lm import placed, real_pool

    from ccds import decoder
    from ccds.lm import score_sequences
    from ccds.models import load_causal_lm, pick_runtime
    from ccds.tokenize import encode

    rt = pick_runtime()
    model, tok, _ = load_causal_lm("smollm2-135m")
    model = placed(model, rt)
    enc = encode(real_pool(300)[:examples], tok, 512)
    priced = decoder.compile_seconds(rt.autocast or torch.float32)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        score_sequences(model, enc, tok.pad_token_id, rt)
        times.append(time.perf_counter() - t)
    return {"priced_s": priced, "times_s": times, "compile_s": times[0] - min(times[1:]),
            "dtype": str(rt.autocast or torch.float32).removeprefix("torch.")}


def markdown(r: dict) -> str:
    cold, warm = r["cold"], r["warm"]
    return "\n".join([
        "# Compiling the elementwise kernels: empty inductor cache vs a cached build", "",
        f"Command: `{r['command']}` — {r['date']}, {r['machine']}, torch {r['torch']}, "
        f"{cold['dtype']}; {r['examples']} real examples scored three times per process, "
        "two fresh processes sharing one new inductor cache.", "",
        "| process | priced by ccds before the first pass | first pass beyond the later ones "
        "| later passes |", "|---|---|---|---|",
        *(f"| {name} | {x['priced_s']:.1f} s | {x['compile_s']:.1f} s | "
          + ", ".join(f"{t:.2f}" for t in x["times_s"][1:]) + " s |"
          for name, x in (("first (empty cache)", cold), ("second (cached build)", warm))),
        ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.examples)))
        return 0
    import torch
    from peak import cpu

    from ccds.io import write_json, write_text

    env = {**os.environ, "CCDS_COMPILE": "on",
           "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="ccds-inductor-")}
    runs = []
    for _ in range(2):
        p = subprocess.run([sys.executable, __file__, "--worker", "--examples",
                            str(args.examples)], env=env, capture_output=True, text=True,
                           check=True, cwd=HERE)
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    res = {"command": "python benchmarks/compile_warm.py " + " ".join(sys.argv[1:]),
           "date": str(date.today()), "machine": cpu(), "torch": torch.__version__,
           "examples": args.examples, "cold": runs[0], "warm": runs[1]}
    write_json(args.out / "compile_warm.json", res)
    write_text(args.out / "compile_warm.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
