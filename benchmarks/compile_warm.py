"""What compiling ccds's elementwise kernels costs into an empty inductor cache and in a
later process that finds them there (the numbers behind `decoder.COMPILE_SECONDS` and
`decoder.WARM_COMPILE_SECONDS`), and what it saves.

Three fresh processes run the same pass three times on the same real examples with
SmolLM2-135M: one eager (`CCDS_COMPILE=off`), then two with the kernels compiled
(`CCDS_COMPILE=on`) sharing one new inductor cache. A compiled process's compile cost is
its first pass's time beyond its later ones'; the saving is the eager process's later
passes against the compiled ones'. `--pass score` scores (no gradients), `--pass train`
trains LoRA one epoch (the kernels' forward and backward: another graph, another build).
No pass counts FLOPs op by op: a Meter's counted batches run eager.

    .venv/bin/python benchmarks/compile_warm.py [--pass train]
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
from typing import Literal, get_args

HERE = Path(__file__).parent
Pass = Literal["score", "train"]


def worker(kind: Pass, examples: int) -> dict:
    """In a fresh process: three passes of `kind`, and what ccds prices the build at
    before the first (`decoder.compile_seconds`)."""
    import copy

    import torch
    from speed_lm import placed, real_pool

    from ccds import decoder
    from ccds.lm import score_sequences
    from ccds.models import load_causal_lm, pick_runtime
    from ccds.tokenize import encode
    from ccds.train import TrainConfig, train

    rt = pick_runtime()
    model, tok, _ = load_causal_lm("smollm2-135m")
    model = placed(model, rt)
    pool = real_pool(300)[:examples]
    enc = encode(pool, tok, 512)
    # as speed_lm's, but no FLOP counting: its sampled batches would run eager
    cfg = TrainConfig(epochs=1, lr=2e-4, batch_tokens=2048, max_len=512, measure_flops=False)
    dtype = rt.autocast or torch.float32
    priced = decoder.compile_seconds(dtype, grad=kind == "train")
    times = []
    for _ in range(3):
        t = time.perf_counter()
        if kind == "score":
            score_sequences(model, enc, tok.pad_token_id, rt)  # no meter: nothing counted
        else:
            train(pool, cfg, model=copy.deepcopy(model), tokenizer=tok, runtime=rt,
                  progress=None).model.unload()
        times.append(time.perf_counter() - t)
    return {"priced_s": priced, "times_s": times, "compile_s": times[0] - min(times[1:]),
            "dtype": str(dtype).removeprefix("torch.")}


def saving(r: dict) -> float:
    """The eager later passes' median over the compiled ones' (both compiled processes)."""
    import numpy as np
    compiled = r["cold"]["times_s"][1:] + r["warm"]["times_s"][1:]
    return float(np.median(r["eager"]["times_s"][1:]) / np.median(compiled))


def markdown(r: dict) -> str:
    cold, warm = r["cold"], r["warm"]
    what = "scored" if r["pass"] == "score" else "trained on (LoRA, one epoch)"
    lines = [
        "# Compiling the elementwise kernels: empty inductor cache vs a cached build", "",
        f"Command: `{r['command']}` — {r['date']}, {r['machine']}, torch {r['torch']}, "
        f"{cold['dtype']}; {r['examples']} real examples {what} three times per process: "
        "one eager process, then two compiled processes sharing one new inductor cache.", "",
        "| process | priced by ccds before the first pass | first pass beyond the later ones "
        "| later passes |", "|---|---|---|---|"]
    if "eager" in r:
        lines.append("| eager (`CCDS_COMPILE=off`) | — | — | "
                     + ", ".join(f"{t:.2f}" for t in r["eager"]["times_s"][1:]) + " s |")
    lines += [f"| {name} | {x['priced_s']:.1f} s | {x['compile_s']:.1f} s | "
              + ", ".join(f"{t:.2f}" for t in x["times_s"][1:]) + " s |"
              for name, x in (("compiled, first (empty cache)", cold),
                              ("compiled, second (cached build)", warm))]
    if "eager" in r:
        lines += ["", f"Compiled, a later pass runs {saving(r):.2f}x the eager one's speed "
                  "(medians of the later passes)."]
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--pass", dest="kind", choices=get_args(Pass), default="score")
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.kind, args.examples)))
        return 0
    import torch
    from peak import cpu

    from ccds.io import write_json, write_text

    cache = tempfile.mkdtemp(prefix="ccds-inductor-")
    runs = {}
    for name, setting in (("eager", "off"), ("cold", "on"), ("warm", "on")):
        env = {**os.environ, "CCDS_COMPILE": setting, "TORCHINDUCTOR_CACHE_DIR": cache}
        p = subprocess.run([sys.executable, __file__, "--worker", "--pass", args.kind,
                            "--examples", str(args.examples)], env=env, capture_output=True,
                           text=True, check=True, cwd=HERE)
        runs[name] = json.loads(p.stdout.strip().splitlines()[-1])
        print(name, runs[name], flush=True)
    res = {"command": "python benchmarks/compile_warm.py " + " ".join(sys.argv[1:]),
           "date": str(date.today()), "machine": cpu(), "torch": torch.__version__,
           "pass": args.kind, "examples": args.examples, **runs}
    res["saving"] = saving(res)
    name = "compile_warm" if args.kind == "score" else "compile_warm-train"
    write_json(args.out / f"{name}.json", res)
    write_text(args.out / f"{name}.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
