"""What the elementwise-bound scoring pass gains from each cheap remedy, side by side in one
run (issue 31): the same pool scored by `score_sequences` in a fresh process per variant, so
that a monkeypatch, an allocator setting or a compiled graph cannot leak into the next.

Variants: `plain` (ccds as shipped); `ftz` (denormals flushed to zero); `malloc` (glibc told
by environment to keep freed memory; its mmap threshold of 2^34 is past the 32 MiB glibc
accepts, so only the trim threshold took: benchmarks/malloc.py measures the setting ccds
now makes itself, which these variables switch off, in results made after 2026-12-03); `rms_norm` (torch's `F.rms_norm` in place of transformers' five-op RMSNorm);
`sdpa_math` (attention through matmul + softmax instead of the CPU flash kernel);
`compile` (the decoder under `torch.compile`, weights frozen and prepacked by inductor).
Each reports GFLOP/s (ccds's model FLOPs, real tokens) on its second pass, the first pass's
extra time (compilation), and the scores' agreement with `plain`.

    .venv/bin/python benchmarks/elementwise.py [--pool 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("plain", "ftz", "malloc", "rms_norm", "sdpa_math", "compile")
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}


def one(variant: str, n: int) -> dict:
    """Score the pool twice under `variant`, in this process."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers.models.llama.modeling_llama as llama
    from speed_lm import real_pool

    from ccds.flops import encoded_work, forward_flops
    from ccds.lm import score_sequences
    from ccds.models import load_causal_lm, param_counts, pick_runtime
    from ccds.tokenize import encode

    if variant == "ftz":
        torch.set_flush_denormal(True)
    if variant == "rms_norm":
        llama.LlamaRMSNorm.forward = lambda self, x: F.rms_norm(
            x, (x.shape[-1],), self.weight.to(x.dtype), self.variance_epsilon)
    if variant == "sdpa_math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_kernel(SDPBackend.MATH).__enter__()
    rt = pick_runtime()
    model, tok, _ = load_causal_lm("smollm2-135m")
    rt.place(model)
    if variant == "compile":
        import torch._inductor.config as inductor

        inductor.freezing = True
        dec = model.get_decoder()
        dec.forward = torch.compile(dec.forward, dynamic=True)
    enc = encode(real_pool(n), tok, 512)
    flops = forward_flops(param_counts(model), encoded_work(enc))
    walls = []
    for _ in range(2):
        t = time.perf_counter()
        with torch.no_grad():
            s = score_sequences(model, enc, tok.pad_token_id, rt, max_tokens=8192)
        walls.append(time.perf_counter() - t)
    return {"variant": variant, "dtype": rt.dtype_name, "wall_s": walls[1],
            "first_extra_s": walls[0] - walls[1], "gflops": flops / walls[1] / 1e9,
            "nll": (s["nll_sum"] / np.maximum(s["n_tokens"], 1)).tolist()}


def markdown(r: dict) -> str:
    rows = r["variants"]
    base = rows[0]
    lines = ["# Scoring pass: what each elementwise remedy gains", "",
             f"Command: `{r['command']}` — {r['date']}, {r['machine']}, {r['wall_s'] / 60:.1f} min. "
             f"{r['examples']} real examples, ccds's `score_sequences` at 8,192 tokens per batch, "
             f"{base['dtype']}; bf16 peak {r['peak_bf16']:.0f} GFLOP/s measured in this run; each "
             "variant in its own process, second pass timed.", "",
             "| variant | GFLOP/s | MFU | vs plain | first pass extra | NLL rel. diff median "
             "| Spearman vs plain |", "|---|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['variant']} | {x['gflops']:.0f} | {x['gflops'] / r['peak_bf16']:.0%} "
                     f"| {x['gflops'] / base['gflops']:.2f}x | {x['first_extra_s']:.0f} s | "
                     f"{x['median_rel_diff']:.1e} | {x['spearman']:.4f} |")
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=int, default=200)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(one(args.variant, args.pool)))
        return 0
    import numpy as np
    import torch
    from peak import cpu, peak
    from scipy.stats import spearmanr

    from ccds.io import write_json, write_text

    t0 = time.perf_counter()
    rows = []
    for v in VARIANTS:
        env = {**os.environ, **(MALLOC if v == "malloc" else {})}
        out = subprocess.run([sys.executable, __file__, "--variant", v, "--pool",
                              str(args.pool)], env=env, capture_output=True, text=True,
                             check=True, cwd=HERE)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(v, f"{rows[-1]['gflops']:.0f} GFLOP/s", flush=True)
    ref = np.array(rows[0]["nll"])
    for x in rows:
        nll = np.array(x.pop("nll"))
        x["median_rel_diff"] = float(np.median(np.abs(nll - ref) / np.abs(ref)))
        x["spearman"] = float(spearmanr(nll, ref).statistic)
    r = {"command": "python benchmarks/elementwise.py " + " ".join(sys.argv[1:]),
         "date": str(date.today()), "machine": f"{cpu()}, {torch.get_num_threads()} threads, "
         f"torch {torch.__version__}", "peak_bf16": peak(torch.bfloat16),
         "examples": args.pool, "variants": rows, "wall_s": time.perf_counter() - t0}
    write_json(args.out / "elementwise.json", r)
    write_text(args.out / "elementwise.md", markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
