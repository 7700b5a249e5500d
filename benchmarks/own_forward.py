"""ccds's own decoder forward (`ccds.decoder.states`, eager) against the model's own
(transformers') forward, side by side in one process: the same loss-scoring pass over a real
pool, interleaved repeats, in fp32 (what `auto` picks on CPUs without AMX) and in bf16 (with
AMX). The ratio is what this measures; absolute times depend on the machine.

    .venv/bin/python benchmarks/own_forward.py --pool 150 --repeats 2   # ~4 min, 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from peak import cpu
from speed_lm import placed, real_pool

from ccds import decoder
from ccds.io import write_json, write_text
from ccds.lm import score_sequences
from ccds.models import load_causal_lm, pick_runtime
from ccds.tokenize import encode


def compare(model, tok, enc, dtype: str, repeats: int) -> dict:
    """Median seconds of each forward over `enc` (transformers': similar-length batches of
    8,192 padded tokens, as ccds ran before; ccds's: its defaults), and the NLL agreement."""
    rt = pick_runtime(dtype=dtype)
    m = placed(model, rt)
    served, times, nll = decoder.supports, {"transformers": [], "ccds": []}, {}
    try:
        for _ in range(repeats):
            for name in times:
                decoder.supports = served if name == "ccds" else (lambda base: False)
                t = time.perf_counter()
                s = score_sequences(m, enc, tok.pad_token_id, rt,
                                    max_tokens=None if name == "ccds" else 8192)
                times[name].append(time.perf_counter() - t)
                nll[name] = s["nll_sum"] / np.maximum(s["n_tokens"], 1)
    finally:
        decoder.supports = served
    rel = np.abs(nll["ccds"] - nll["transformers"]) / np.abs(nll["transformers"])
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"dtype": rt.dtype_name, "seconds": med, "all_seconds": times,
            "speedup": med["transformers"] / med["ccds"], "median_rel_diff": float(np.median(rel))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--pool", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ["CCDS_COMPILE"] = "off"  # eager against eager
    model, tok, _ = load_causal_lm("smollm2-135m")
    enc = encode(real_pool(args.pool), tok, 512)
    rows = [compare(model, tok, enc, dt, args.repeats) for dt in ("fp32", "bf16")]
    r = {"command": "python benchmarks/own_forward.py " + " ".join(sys.argv[1:]),
         "date": str(date.today()), "machine": f"{cpu()}, {torch.get_num_threads()} threads",
         "examples": len(enc), "tokens": int(enc.lengths.sum()), "rows": rows}
    md = ["# ccds's own decoder forward against transformers' (loss scoring, SmolLM2-135M)", "",
          f"Command: `{r['command']}` — {r['date']}, {r['machine']}; {r['examples']} real "
          f"examples, {r['tokens']:,} tokens, medians of {args.repeats} interleaved repeats.", "",
          "| dtype | transformers' forward | ccds's forward | speedup | median NLL rel. diff |",
          "|---|---|---|---|---|"]
    md += [f"| {x['dtype']} | {x['seconds']['transformers']:.1f} s | {x['seconds']['ccds']:.1f} s "
           f"| {x['speedup']:.2f}x | {x['median_rel_diff']:.1e} |" for x in rows]
    write_json(args.out / "own_forward.json", r)
    write_text(args.out / "own_forward.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
