"""Causal attention's backward on a CPU: SDPA's flash kernel against `decoder._MathBackward`
(the same fused forward, a backward of batched matmuls over the [L, L] scores), by row width.

Shapes are SmolLM2-135M's (9 query heads over 3 K/V heads, head dim 64) in the dtype ccds
runs in here; each width runs as one call of about 2,048 tokens (training's groups) and as
one row (the kernel's cost per call). Then what decides `decoder.MATH_BACKWARD_WIDTH`: LoRA
training of SmolLM2 on real examples with the math backward up to each width, in one
process, alternating.

    .venv/bin/python benchmarks/attention_backward.py      # ~6 min on the 2-core CPU
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peak import cpu

from ccds import decoder
from ccds.io import write_json, write_text
from ccds.models import load_causal_lm, pick_runtime

WIDTHS = (32, 64, 128, 192, 256, 384, 512)


def _median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def one_width(width: int, rows: int, dtype: torch.dtype) -> dict:
    """Forward + backward of `rows` × `width` tokens, both ways; gradients against fp32 SDPA."""
    gen = torch.Generator().manual_seed(width)
    base = [torch.randn(rows, h, width, 64, generator=gen) for h in (9, 3, 3)]
    grad_out = torch.randn(rows, 9, width, 64, generator=gen)

    def grads(attend, dt):
        qkv = [t.to(dt, copy=True).requires_grad_() for t in base]
        attend(*qkv).backward(grad_out.to(dt))
        return [t.grad.float() for t in qkv]

    def flash(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125,
                                              enable_gqa=True)

    def math(q, k, v):
        return decoder._MathBackward.apply(q, k, v, 0.125)

    ref = grads(flash, torch.float32)
    err = {name: max(float(((a - b).abs().max() / b.abs().max()).item())
                     for a, b in zip(grads(fn, dtype), ref, strict=True))
           for name, fn in (("flash", flash), ("math", math))}
    out = {"width": width, "rows": rows,
           "flash_ms": _median_ms(lambda: grads(flash, dtype)),
           "math_ms": _median_ms(lambda: grads(math, dtype)),
           "flash_rel_err": err["flash"], "math_rel_err": err["math"]}
    out["speedup"] = out["flash_ms"] / out["math_ms"]
    return out


def training(widths: list[int], examples: int, repeats: int) -> list[dict]:
    """LoRA training wall time with the math backward up to each width (0: flash only)."""
    from speed_lm import real_pool

    from ccds.train import TrainConfig, train

    rt = pick_runtime()
    model, tok, _ = load_causal_lm("smollm2-135m")
    pool = real_pool(examples)
    cfg = TrainConfig(epochs=1, lr=2e-4, batch_tokens=2048, max_len=512)
    times: dict[int, list[float]] = {w: [] for w in widths}
    kept = decoder.MATH_BACKWARD_WIDTH
    try:
        for _ in range(repeats):
            for w in widths:
                decoder.MATH_BACKWARD_WIDTH = w
                t = time.perf_counter()
                train(pool, cfg, model=copy.deepcopy(model), tokenizer=tok, runtime=rt,
                      progress=None).model.unload()
                times[w].append(time.perf_counter() - t)
    finally:
        decoder.MATH_BACKWARD_WIDTH = kept
    return [{"math_up_to": w, "wall_s": float(np.median(ts)), "times_s": ts}
            for w, ts in times.items()]


def markdown(r: dict) -> str:
    lines = [
        "# Causal attention's backward on a CPU: SDPA's flash kernel vs ccds's math backward",
        "",
        f"Command: `{r['command']}` — {r['date']}, {r['machine']}, {r['threads']} threads, "
        f"torch {r['torch']}, {r['dtype']}. SmolLM2-135M's heads (9 query over 3 K/V, "
        "dim 64), forward + backward, median of 5; error: largest gradient difference "
        "from fp32 SDPA relative to its largest gradient.",
        "",
        "| width | rows | flash ms | math ms | math speedup | flash error | math error |",
        "|---|---|---|---|---|---|---|"]
    for w in r["widths"]:
        lines.append(f"| {w['width']} | {w['rows']} | {w['flash_ms']:.1f} | {w['math_ms']:.1f} "
                     f"| {w['speedup']:.2f}x | {w['flash_rel_err']:.1e} "
                     f"| {w['math_rel_err']:.1e} |")
    flash_only = next(t for t in r["training"] if t["math_up_to"] == 0)["wall_s"]
    lines += ["", f"LoRA training, {r['examples']} real examples (speed_lm's pool and "
              f"config), median of {r['repeats']} alternating runs in one process:", "",
              "| math backward up to width | wall s | vs flash only |", "|---|---|---|"]
    for t in r["training"]:
        lines.append(f"| {t['math_up_to'] or 'none (flash only)'} | {t['wall_s']:.1f} "
                     f"| {flash_only / t['wall_s']:.2f}x |")
    lines += ["", f"ccds uses the math backward up to width {r['chosen']} "
              "(`decoder.MATH_BACKWARD_WIDTH`).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    rt = pick_runtime()
    dtype = rt.autocast or torch.float32
    t0 = time.perf_counter()
    widths = []
    for w in WIDTHS:
        for rows in (max(1, 2048 // w), 1):
            widths.append(one_width(w, rows, dtype))
            print(widths[-1], flush=True)
    train_widths = sorted({0, 128, decoder.MATH_BACKWARD_WIDTH, 512})
    res = {"command": "python benchmarks/attention_backward.py " + " ".join(sys.argv[1:]),
           "date": str(date.today()), "machine": cpu(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
           "widths": widths, "examples": args.examples, "repeats": args.repeats,
           "training": training(train_widths, args.examples, args.repeats),
           "chosen": decoder.MATH_BACKWARD_WIDTH}
    res["minutes"] = (time.perf_counter() - t0) / 60
    write_json(args.out / "attention_backward.json", res)
    write_text(args.out / "attention_backward.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
