"""LoRA training's speed by micro-batch size: why `speed_lm.py`'s training MFU is what it is.

The same real examples (longest first, as many rows per batch as fit in S real tokens:
`tokenize.token_batches`, so rows of a batch are alike, as in training's length groups) run
forward + backward through ccds's training path (LoRA on
q/k/v/o, the dtype `auto` picks, ccds's own forward) in micro-batches of up to S real tokens,
for several S. A least-squares fit of each pass's wall time, a per-batch cost times
the batches plus a per-token cost times the tokens, splits the time into what does not
shrink with the batch (a fixed number of kernel launches per layer: every op's dispatch,
allocation and threading, counted below) and what does. speed_lm's 100 training examples
form micro-batches of a few hundred real tokens (length groups close when a row is 10%
shorter than the longest), where the fixed part dominates.

Second, the frozen-weight matmuls of one layer by rows, as oneDNN runs them, against the
same product as a 2-batch bmm (each thread one half of the rows): measured, not used.

    .venv/bin/python benchmarks/train_batches.py      # ~5 min on the 2-core CPU
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np
import torch
from peak import cpu, peak
from speed_lm import real_pool

from ccds.flops import encoded_work, lora_step_flops
from ccds.io import write_json, write_text
from ccds.lm import own_kernels, response_nll
from ccds.models import add_lora, load_causal_lm, param_counts, pick_runtime
from ccds.tokenize import collate, encode, length_batches, token_batches
from ccds.train import TrainConfig

SIZES = (256, 512, 1024, 2048, 4096)


def ops_per_batch(step) -> Counter:
    """The aten ops one forward + backward dispatches (by name)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: Counter = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return seen


def matmuls(rows: list[int], repeats: int = 8) -> list[dict]:
    """GFLOP/s of SmolLM2's frozen-weight products (forward x·Wᵀ, and the backward's g·W of
    the down projection) by rows: one matmul, and a bmm of two halves (weights copied)."""
    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(repeats):
                fn()
            times.append((time.perf_counter() - t) / repeats)
        return min(times)

    out = []
    gen = torch.Generator().manual_seed(0)
    for k, n, kind in ((576, 960, "q/k/v"), (576, 576, "o"), (576, 1536, "gate, up"),
                       (1536, 576, "down"), (576, 1536, "down, backward g·W")):
        # a weight as stored, [out, in]; the backward's g·W reads the down weight as it is
        w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
        wt = w.t() if "backward" not in kind else torch.randn(k, n, generator=gen).to(w.dtype)
        pair = wt.expand(2, k, n).contiguous() if "backward" in kind else \
            w.expand(2, n, k).contiguous().transpose(1, 2)
        for m in rows:
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            halves = x.view(2, m // 2, k)
            flops = 2 * m * k * n
            one = best(lambda: torch.mm(x, wt))  # noqa: B023
            two = best(lambda: torch.bmm(halves, pair))  # noqa: B023
            out.append({"weights": kind, "in": k, "out": n, "rows": m,
                        "matmul_gflops": flops / one / 1e9, "bmm_halves_gflops": flops / two / 1e9})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--examples", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rt = pick_runtime()
    dtype = rt.autocast or torch.float32
    peak_gflops = peak(dtype)
    model, tok, _ = load_causal_lm("smollm2-135m")
    cfg = TrainConfig()
    peft = rt.place(add_lora(copy.deepcopy(model), cfg))  # as train() builds it
    peft.train()
    kernels = own_kernels(peft, rt)
    counts = param_counts(peft)
    enc = encode(real_pool(args.examples), tok, cfg.max_len)
    flops = lora_step_flops(counts, encoded_work(enc, suffix=True))  # the same at every size

    def run(batches) -> None:
        for b in batches:
            with rt.amp():
                nll, _ = response_nll(peft, b, suffix=True, kernels=kernels)
            nll.sum().backward()
        peft.zero_grad(set_to_none=True)

    sizes = []
    for size in SIZES:
        ix = token_batches(enc.lengths, size)
        batches = [collate(enc, i, tok.pad_token_id) for i in ix]
        run(batches[:1])
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            run(batches)
            times.append(time.perf_counter() - t)
        wall = float(np.median(times))
        tokens = int(enc.lengths.sum())
        sizes.append({"size": size, "batches": len(ix), "tokens": tokens,
                      "mean_batch_tokens": tokens / len(ix), "wall_s": wall, "times_s": times,
                      "tokens_per_s": tokens / wall, "gflops": flops / wall / 1e9,
                      "mfu": flops / wall / 1e9 / peak_gflops})
        print(sizes[-1], flush=True)
    # wall = per_batch · batches + per_token · tokens, least squares over the sizes
    a = np.array([[s["batches"], s["tokens"]] for s in sizes], dtype=float)
    (per_batch, per_token), *_ = np.linalg.lstsq(a, np.array([s["wall_s"] for s in sizes]),
                                                 rcond=None)
    flops_per_token = sizes[-1]["gflops"] * sizes[-1]["wall_s"] / sizes[-1]["tokens"]
    ops = ops_per_batch(lambda: run([collate(enc, token_batches(enc.lengths, 512)[0], tok.pad_token_id)]))
    # speed_lm's training batches: its pool and config (batch_tokens 2048, length groups)
    bench = encode(real_pool(100), tok, cfg.max_len)
    groups = length_batches(bench.lengths, 2048, cfg.max_batch, 0)
    r = {"command": "python benchmarks/train_batches.py " + " ".join(sys.argv[1:]),
         "date": str(date.today()), "machine": cpu(), "threads": torch.get_num_threads(),
         "torch": torch.__version__, "dtype": rt.dtype_name, "peak_gflops": peak_gflops,
         "examples": args.examples, "repeats": args.repeats, "sizes": sizes,
         "fit": {"per_batch_s": float(per_batch), "per_token_s": float(per_token),
                 "mfu_without_batch_cost": flops_per_token / float(per_token) / peak_gflops},
         "ops_per_batch": sum(ops.values()), "top_ops": dict(ops.most_common(8)),
         "speed_lm_batches": {"batches": len(groups),
                              "mean_real_tokens": float(bench.lengths.sum() / len(groups))},
         "matmuls": matmuls([256, 512, 768, 1024, 1536, 2048])}
    r["wall_s"] = time.perf_counter() - t0
    write_json(args.out / "train_batches.json", r)
    write_text(args.out / "train_batches.md", markdown(r))
    print(markdown(r))
    return 0


def markdown(r: dict) -> str:
    fit, sb = r["fit"], r["speed_lm_batches"]
    lines = [
        "# LoRA training's speed by micro-batch size", "",
        f"Command: `{r['command']}` — {r['date']}, {r['machine']}, {r['threads']} threads, "
        f"torch {r['torch']}, {r['dtype']} (peak {r['peak_gflops']:.0f} GFLOP/s, measured in "
        f"this run). The same {r['examples']} real examples, forward + backward (LoRA r=16 on "
        f"q/k/v/o, ccds's own forward), in micro-batches of up to S real tokens; "
        f"median of {r['repeats']}.", "",
        "| S (real tokens) | micro-batches | mean tokens | wall s | tokens/s | MFU |",
        "|---|---|---|---|---|---|"]
    for s in r["sizes"]:
        lines.append(f"| {s['size']} | {s['batches']} | {s['mean_batch_tokens']:.0f} "
                     f"| {s['wall_s']:.1f} | {s['tokens_per_s']:.0f} | {s['mfu']:.0%} |")
    lines += [
        "", f"Fit: wall = {fit['per_batch_s'] * 1e3:.0f} ms per micro-batch + "
        f"{fit['per_token_s'] * 1e3:.3f} ms per token. Without the per-batch part training "
        f"would run at {fit['mfu_without_batch_cost']:.0%} MFU. One micro-batch dispatches "
        f"{r['ops_per_batch']:,} aten ops forward + backward (most: "
        + ", ".join(f"{k} {v}" for k, v in r["top_ops"].items()) + "). "
        f"speed_lm's training pool (100 examples, batch_tokens 2048) forms {sb['batches']} "
        f"length-grouped micro-batches of {sb['mean_real_tokens']:.0f} real tokens on average.",
        "", "Frozen-weight matmuls by rows (bf16, GFLOP/s): one matmul as oneDNN runs it, and "
        "the same product as a bmm over two halves of the rows (weights copied per half).", "",
        "| weights | in → out | rows | matmul | bmm of halves |", "|---|---|---|---|---|"]
    for m in r["matmuls"]:
        lines.append(f"| {m['weights']} | {m['in']} → {m['out']} | {m['rows']} "
                     f"| {m['matmul_gflops']:.0f} | {m['bmm_halves_gflops']:.0f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
