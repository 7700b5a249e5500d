"""Speed of the language-model passes (issue 6) against this machine's measured peak and
against the reference style, in one run:

- loss / perplexity scoring of a real pool with SmolLM2-135M: ccds's `score_sequences`
  (length-bucketed batches, the dtype `auto` picks here, LM head only at response
  positions; what `ccds score ppl` and every loss-based method run) vs one example at a
  time in fp32 with full logits (the S2L and CCDS reference code); MFU, same scores;
- LESS per-example LoRA gradients: one backward per batch (ccds) vs one backward per example,
  equal features (cosine);
- LoRA training of SmolLM2-135M: tokens/s and MFU.

MFU = model FLOPs (ccds convention, real tokens only, padding not counted) / wall time /
the matmul peak, measured in the same run, of the dtype ccds runs in on this machine
(`pick_runtime()`: bf16 autocast where it is measured faster than fp32, else fp32).

    .venv/bin/python benchmarks/speed_lm.py            # ~30 min on the 2-core CPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from datetime import date
from functools import partial
from pathlib import Path

import numpy as np
import torch
from peak import cpu, peak
from scipy.stats import spearmanr
from summary import LM_TARGETS, target_text

from ccds.data.sources import load_alpaca, load_bigbench, load_gsm8k
from ccds.flops import Ledger, encoded_work, forward_flops, lora_step_flops
from ccds.io import write_json, write_text
from ccds.lm import _no_grad_pass, own_kernels, response_nll, score_sequences
from ccds.models import add_lora, load_causal_lm, param_counts, pick_runtime
from ccds.score.less import LESS, lora_names, per_example_grads
from ccds.tokenize import collate, encode
from ccds.train import TrainConfig, train


def real_pool(n: int, seed: int = 0):
    """A mixed pool of real examples (GSM8K train, Alpaca, BIG-bench), lengths as they come."""
    docs = load_gsm8k() + load_alpaca() + load_bigbench()
    idx = np.random.default_rng(seed).choice(len(docs), n, replace=False)
    return [docs[i] for i in idx]


def placed(model, rt):
    """A copy placed as every ccds pass places its model (frozen weights in the autocast
    dtype)."""
    return rt.place(copy.deepcopy(model))


def gemm_ceiling(model, dtype: torch.dtype, tokens: int = 8192) -> float:
    """GFLOP/s of the model's own linear layers alone (`tokens` rows): the best any
    implementation keeping these shapes could do, before attention and norms."""
    shapes = sorted({tuple(m.weight.shape) for m in model.modules()
                     if isinstance(m, torch.nn.Linear) and m.out_features < 10_000})
    flops = secs = 0.0
    for out_f, in_f in shapes:
        x = torch.randn(tokens, in_f, dtype=dtype)
        w = torch.randn(out_f, in_f, dtype=dtype)
        torch.nn.functional.linear(x, w)
        t = time.perf_counter()
        for _ in range(10):
            torch.nn.functional.linear(x, w)
        secs += (time.perf_counter() - t) / 10
        flops += 2 * tokens * in_f * out_f
    return flops / secs / 1e9


def time_shares(fn) -> dict[str, float]:
    """Where `fn`'s time goes (torch profiler, self CPU time): matrix multiplies, attention
    (forward and backward), the optimizer, and everything else (norms, rotary, activations,
    casts, their gradients)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    shares = {"gemm": 0.0, "attention": 0.0, "head log-softmax": 0.0, "optimizer": 0.0,
              "other": 0.0}
    for e in prof.key_averages():
        kind = ("gemm" if e.key in ("aten::mm", "aten::addmm", "aten::bmm") else
                "attention" if "scaled_dot_product" in e.key else
                "head log-softmax" if "log_softmax" in e.key else
                "optimizer" if "foreach" in e.key or "adam" in e.key.lower() else "other")
        shares[kind] += e.self_cpu_time_total
    total = sum(shares.values())
    return {k: v / total for k, v in shares.items() if v}


def compiled_scoring(model, enc, pad_id: int, flops: float, rt) -> dict:
    """ccds's own forward with its elementwise kernels compiled (CCDS_COMPILE=on, what `auto`
    picks for a pass predicted to run longer than the cost model's break-even): the first
    pass compiles into an empty inductor cache (its extra time is the compile), the second
    runs compiled."""
    import tempfile

    from ccds import decoder

    decoder.compiled.cache_clear()
    torch._dynamo.reset()  # nor what this process compiled already (auto may have)
    with environ(CCDS_COMPILE="on", TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp()):
        t = time.perf_counter()
        score_sequences(model, enc, pad_id, rt)
        first = time.perf_counter() - t
        t = time.perf_counter()
        score_sequences(model, enc, pad_id, rt)
        wall = time.perf_counter() - t
    return {"examples": len(enc), "compile_s": first - wall, "wall_s": wall,
            "gflops": flops / wall / 1e9}


@contextlib.contextmanager
def environ(**values: str):
    """These environment variables set for the block, as they were after it."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def transformers_scoring(model, enc, pad_id: int, flops: float, rt, repeats: int = 2) -> dict:
    """The same pass through the model's own (transformers') forward, as ccds ran it before
    `decoder.states`: similar-length batches of at most 8,192 padded tokens."""
    from ccds import decoder

    served, times = decoder.supports, []
    decoder.supports = lambda base: False
    try:
        for _ in range(repeats):
            t = time.perf_counter()
            score_sequences(model, enc, pad_id, rt, max_tokens=8192)
            times.append(time.perf_counter() - t)
    finally:
        decoder.supports = served
    wall = float(np.median(times))
    return {"wall_s": wall, "spread": spread(times), "gflops": flops / wall / 1e9}


def spread(times: list[float]) -> dict:
    return {"min": min(times), "median": float(np.median(times)), "max": max(times),
            "repeats": len(times)}


def bench_scoring(model, tok, pool, n_ref: int, rt, peak_gflops: float) -> dict:
    enc = encode(pool, tok, 512)
    counts = param_counts(model)
    flops = forward_flops(counts, encoded_work(enc))
    times, ours_model = [], placed(model, rt)
    # ccds's defaults (its own forward; `auto` compiles if a cached build pays), three
    # passes: the first also builds what later ones reuse (oneDNN kernels per shape, the
    # heap, compiled kernels), so the median is a warm pass, as most of a long one is
    for _ in range(3):
        t = time.perf_counter()
        s = score_sequences(ours_model, enc, tok.pad_token_id, rt)
        times.append(time.perf_counter() - t)
    from ccds import decoder

    auto_compiled = _no_grad_pass(ours_model, enc, rt, None).kernels not in (None, decoder.EAGER)
    hf = transformers_scoring(ours_model, enc, tok.pad_token_id, flops, rt)
    hf["ccds_speedup"] = hf["wall_s"] / float(np.median(times))
    sub = encode(pool[:200], tok, 512)
    shares = time_shares(partial(score_sequences, ours_model, sub, tok.pad_token_id, rt))
    with environ(CCDS_COMPILE="off"):  # the eager kernels, whatever auto picked above
        score_sequences(ours_model, sub, tok.pad_token_id, rt)  # its shapes built once
        ours_sub = time.perf_counter()
        score_sequences(ours_model, sub, tok.pad_token_id, rt)
        ours_sub = time.perf_counter() - ours_sub
    compiled = compiled_scoring(ours_model, sub, tok.pad_token_id,
                                forward_flops(counts, encoded_work(sub)), rt)
    compiled["speedup"] = ours_sub / compiled["wall_s"]
    del ours_model
    ours = s["nll_sum"] / np.maximum(s["n_tokens"], 1)

    # the reference: one example at a time, fp32, logits over the whole sequence
    sub = encode(pool[:n_ref], tok, 512)
    ref = np.zeros(n_ref)
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(n_ref):
            ids = torch.as_tensor(sub.ids[i], dtype=torch.long)[None]
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            k = int(sub.response_lengths[i] - sub.n_suffix[i])  # response, not end-of-turn
            lo = int(sub.n_prompt[i]) - 1  # logits at p predict token p + 1
            ref[i] = nll[lo:lo + k].mean().item()
    t_ref = time.perf_counter() - t
    ref_flops = forward_flops(counts, encoded_work(sub))
    ours_tps = enc.lengths.sum() / np.median(times)
    ref_tps = sub.lengths.sum() / t_ref
    rel = np.abs(ours[:n_ref] - ref) / np.abs(ref)
    return {"examples": len(pool), "tokens": int(enc.lengths.sum()), "model_flops": flops,
            "ccds_s": spread(times),
            "ccds_tokens_per_s": float(ours_tps), "ccds_gflops": flops / np.median(times) / 1e9,
            "mfu": flops / np.median(times) / 1e9 / peak_gflops,
            "reference_examples": n_ref, "reference_s": t_ref,
            "reference_tokens_per_s": float(ref_tps),
            "reference_gflops": ref_flops / t_ref / 1e9,
            "speedup": float(ours_tps / ref_tps),
            "max_rel_diff": float(rel.max()), "median_rel_diff": float(np.median(rel)),
            "spearman": float(spearmanr(ours[:n_ref], ref).statistic),
            "time_shares": shares, "transformers": hf, "compiled": compiled,
            "auto_compiled": auto_compiled}


def bench_less(model, tok, pool, repeats: int = 3) -> dict:
    peft = add_lora(copy.deepcopy(model), TrainConfig(lora_r=8, lora_alpha=32, lora_dropout=0.0))
    with torch.no_grad():  # a warmed-up adapter: LoRA B is not zero
        g = torch.Generator().manual_seed(0)
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    names = lora_names(peft)
    params = dict(peft.named_parameters())
    enc = encode(pool, tok, 512)
    from ccds.tokenize import length_batches

    out = {"examples": len(pool), "lora_params": int(sum(params[n].numel() for n in names))}
    base = {n: p.detach().clone() for n, p in peft.named_parameters() if not p.requires_grad}

    def restore():  # the frozen weights as loaded, fp32
        for n, p in peft.named_parameters():
            if n in base:
                p.data = base[n]

    default = LESS().batch_tokens(pick_runtime(dtype="fp32"))  # the CPU default
    out["batch_tokens"], out["budget_s"], out["budget_spread"] = default, {}, {}
    for dtype in ("bf16", "fp32"):  # each as LESS places its model (bf16: frozen in bf16)
        restore()
        rt = pick_runtime(dtype=dtype)
        rt.place(peft)
        kernels = own_kernels(peft, rt)  # as LESS runs it: ccds's own forward, eager
        out["budget_s"][dtype], out["budget_spread"][dtype] = {}, {}
        for budget in sorted({512, 2048, default}):  # the token budget of a batch
            feats, times = torch.zeros(len(pool), out["lora_params"]), []
            for _ in range(repeats):
                t = time.perf_counter()
                for index in length_batches(enc.lengths, budget):
                    feats[index] = per_example_grads(
                        peft, collate(enc, index, tok.pad_token_id), names, rt, kernels)
                times.append(time.perf_counter() - t)
            out["budget_spread"][dtype][budget] = spread(times)
            out["budget_s"][dtype][budget] = float(np.median(times))
            if budget == default:
                out[f"batched_{dtype}_s"] = out["budget_s"][dtype][budget]
                out[f"_feats_{dtype}"] = feats
    restore()  # the reference: the fp32 model as loaded
    ref = torch.zeros_like(out["_feats_fp32"])
    peft.eval()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(len(pool)):  # the reference loop: one backward per example, fp32
            peft.zero_grad()
            nll, n = response_nll(peft, collate(enc, np.array([i]), tok.pad_token_id),
                                  suffix=True)
            (nll / n).sum().backward()
            ref[i] = torch.cat([params[nm].grad.flatten() for nm in names])
        times.append(time.perf_counter() - t)
    out["loop_fp32_s"], out["loop_spread"] = float(np.median(times)), spread(times)
    out["loop_gflops"] = lora_step_flops(param_counts(peft), encoded_work(
        enc, suffix=True)) / out["loop_fp32_s"] / 1e9
    peft.zero_grad(set_to_none=True)
    for dtype in ("bf16", "fp32"):
        cos = torch.nn.functional.cosine_similarity(out.pop(f"_feats_{dtype}"), ref, dim=1)
        out[f"cosine_{dtype}_min"] = float(cos.min())
        out[f"speedup_{dtype}"] = out["loop_fp32_s"] / out[f"batched_{dtype}_s"]
    peft.unload()
    return out


def bench_training(model, tok, pool, rt, peak_gflops: float, repeats: int = 3) -> dict:
    cfg = TrainConfig(epochs=1, lr=2e-4, batch_tokens=2048, max_len=512)
    times = []
    for _ in range(repeats):
        ledger = Ledger()
        t = time.perf_counter()
        res = train(pool, cfg, model=copy.deepcopy(model), tokenizer=tok, runtime=rt,
                    ledger=ledger, progress=None)
        times.append(time.perf_counter() - t)
        res.model.unload()
    wall, stage = float(np.median(times)), ledger.stages[0]
    shares = time_shares(lambda: train(
        pool[:60], cfg, model=copy.deepcopy(model), tokenizer=tok,
        runtime=rt, progress=None).model.unload())
    return {"examples": len(pool), "tokens": res.tokens, "wall_s": wall, "wall_spread":
            spread(times), "time_shares": shares,
            "tokens_per_s": res.tokens / wall, "model_flops": stage.analytic_flops,
            "gflops": stage.analytic_flops / wall / 1e9,
            "mfu": stage.analytic_flops / wall / 1e9 / peak_gflops}


def markdown(r: dict) -> str:
    s, g, t = r["scoring"], r["less"], r["training"]
    tg = {k: target_text(k, r["dtype"]) for k in LM_TARGETS["bf16"]}
    return "\n".join([
        "# Language-model passes: MFU and speed beside the reference style", "",
        f"Command: `{r['command']}` — {r['date']}, {r['machine']}, {r['wall_s'] / 60:.1f} min.",
        f"Peak measured in this run: fp32 {r['peak']['fp32_gflops']:.0f}, bf16 "
        f"{r['peak']['bf16_gflops']:.0f} GFLOP/s (2048² matmul); ccds runs in "
        f"**{r['dtype']}** here, so MFU is against the {r['dtype']} peak. SmolLM2's own linear "
        f"layers alone, {r['dtype']}, 8192 rows: {r['peak']['model_gemm_gflops']:.0f} GFLOP/s "
        f"({r['peak']['model_gemm_gflops'] / r['peak']['used_gflops']:.0%} of the peak: the "
        "ceiling at this model's shapes before attention and norms). MFU counts real tokens' "
        "model FLOPs (ccds convention), not padding.", "",
        f"| pass | size | ccds ({r['dtype']}) | reference | speedup | MFU | target | agreement |",
        "|---|---|---|---|---|---|---|---|",
        f"| loss scoring, SmolLM2-135M | {s['examples']} real examples, {s['tokens']:,} tokens "
        f"| {s['ccds_tokens_per_s']:,.0f} tok/s ({s['ccds_gflops']:.0f} GFLOP/s) "
        f"| {s['reference_tokens_per_s']:,.0f} tok/s (1 at a time, fp32, "
        f"{s['reference_examples']} ex) | {s['speedup']:.1f}x | {s['mfu']:.0%} "
        f"| {tg['scoring']} | per-example NLL rel. diff median {s['median_rel_diff']:.1e}, "
        f"max {s['max_rel_diff']:.1e}; Spearman {s['spearman']:.4f} |",
        f"| LESS per-example LoRA gradients | {g['examples']} examples, {g['lora_params']:,} "
        f"LoRA params | batched bf16 {g['batched_bf16_s']:.1f} s, fp32 "
        f"{g['batched_fp32_s']:.1f} s | loop fp32 {g['loop_fp32_s']:.1f} s "
        f"| {g['speedup_bf16']:.1f}x (bf16), {g['speedup_fp32']:.1f}x (fp32) | — | "
        f"{tg['less']} | min cosine bf16 {g['cosine_bf16_min']:.5f}, fp32 "
        f"{g['cosine_fp32_min']:.6f} |",
        f"| LoRA training, SmolLM2-135M | {t['examples']} examples, {t['tokens']:,} tokens | "
        f"{t['tokens_per_s']:,.0f} tok/s ({t['gflops']:.0f} GFLOP/s) | — | — | "
        f"{t['mfu']:.0%} | {tg['training']} | — |", "",
        "Where the time goes (profiler, self time): scoring 200 examples "
        + ", ".join(f"{k} {v:.0%}" for k, v in s["time_shares"].items())
        + "; LoRA training on 60 examples "
        + ", ".join(f"{k} {v:.0%}" for k, v in t["time_shares"].items())
        + f". Scoring runs through ccds's own forward (`decoder.states`: real tokens only, "
        f"one q/k/v matmul, causal flash attention per length group); through the model's own "
        f"(transformers') forward, as before, the same pool takes "
        f"{s['transformers']['wall_s']:.1f} s ({s['transformers']['gflops']:.0f} GFLOP/s, "
        f"{s['transformers']['gflops'] / r['peak']['used_gflops']:.0%} MFU): ccds's is "
        f"{s['transformers']['ccds_speedup']:.2f}x. `CCDS_COMPILE=auto` "
        + ("compiled the elementwise kernels for that pass (a cached build made it pay)"
           if s.get("auto_compiled") else "ran that pass eager")
        + ". With its elementwise kernels compiled "
        f"(`CCDS_COMPILE=on`; `auto` compiles past the cost model's break-even) the same 200 "
        f"examples score {s['compiled']['speedup']:.2f}x faster than with `CCDS_COMPILE=off` "
        f"({s['compiled']['gflops']:.0f} GFLOP/s, "
        f"{s['compiled']['gflops'] / r['peak']['used_gflops']:.0%} MFU); what compiling costs "
        "is measured in fresh processes (results/compile_warm.md): in this one, inductor "
        "keeps what it built in memory.", "",
        "Spread over repeats in one process (min–max; the medians are used above; the "
        "first pass of each also builds oneDNN's kernels for each new shape and grows the "
        "heap"
        + (", and scoring's loads the compiled kernels" if s.get("auto_compiled") else "")
        + "): "
        + ", ".join(f"{name} {x['min']:.1f}–{x['max']:.1f} s ({x['repeats']}x)" for name, x in (
            ("scoring", s["ccds_s"]), ("LESS loop", g["loop_spread"]),
            (f"LESS fp32 at {g['batch_tokens']:,} tokens",
             g["budget_spread"]["fp32"][g["batch_tokens"]]),
            ("training", t["wall_spread"]))) + ".", "",
        f"LESS, by tokens per batch (ccds default {g['batch_tokens']:,}): "
        + "; ".join(f"{dt} " + ", ".join(f"{int(b):,}: {v:.1f} s" for b, v in by.items())
                    for dt, by in g["budget_s"].items())
        + f". The one-example fp32 loop runs at {g['loop_gflops']:.0f} GFLOP/s "
        f"({g['loop_gflops'] / r['peak']['used_gflops']:.0%} of the {r['dtype']} peak).", ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--pool", type=int, default=1000)
    ap.add_argument("--reference", type=int, default=100)
    ap.add_argument("--less", type=int, default=48)
    ap.add_argument("--train", type=int, default=300)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    r = {"command": "python benchmarks/speed_lm.py " + " ".join(sys.argv[1:]),
         "date": str(date.today()),
         "machine": f"{cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
         "peak": {"fp32_gflops": peak(torch.float32), "bf16_gflops": peak(torch.bfloat16)}}
    rt = pick_runtime()  # what every ccds command runs in on this machine
    r["dtype"] = rt.dtype_name
    r["peak"]["used_gflops"] = r["peak"][f"{r['dtype']}_gflops"]
    model, tok, _ = load_causal_lm("smollm2-135m")
    r["peak"]["model_gemm_gflops"] = gemm_ceiling(model, rt.autocast or torch.float32)
    print(r["peak"], flush=True)
    pool = real_pool(args.pool)
    r["scoring"] = bench_scoring(model, tok, pool, args.reference, rt,
                                r["peak"]["used_gflops"])
    print(r["scoring"], flush=True)
    r["less"] = bench_less(model, tok, pool[: args.less])
    print(r["less"], flush=True)
    r["training"] = bench_training(model, tok, pool[: args.train], rt,
                                  r["peak"]["used_gflops"])
    print(r["training"], flush=True)
    r["wall_s"] = time.perf_counter() - t0
    write_json(args.out / "speed_lm.json", r)
    write_text(args.out / "speed_lm.md", markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
