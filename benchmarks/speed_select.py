"""Speed of the passes that run without a language model (issue 6), each beside the way a
reference implementation does it, in one run:

- BM25 on a 100k-document pool of real text against a few hundred queries: ccds (two-pass
  sparse scoring, the code `ccds score bm25` runs) vs rank_bm25's BM25Okapi, one query at a
  time; same ranking (Spearman, top-5% overlap).
- S2L k-means on 1M × 12 loss trajectories: ccds (k-means++ seeding + faiss Lloyd, the code
  S2L runs) vs scikit-learn's KMeans with the same k, iterations and seeding; inertia side
  by side so the speed is not bought with worse clusters.
- Facility location on real sentence embeddings: lazy greedy (ccds) vs plain greedy; the
  same picks, and how many gain evaluations each needs.

    .venv/bin/python benchmarks/speed_select.py            # ~10 min on the 2-core CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from peak import cpu
from scipy.stats import spearmanr

from ccds.data.sources import (
    gsm8k_target,
    load_alpaca,
    load_bbh,
    load_bigbench,
    load_gsm8k,
    load_mmlu,
)
from ccds.data.types import Example
from ccds.io import write_json, write_text
from ccds.score import Context, get_method, run
from ccds.score.bm25 import tokenize
from ccds.score.facility import lazy_greedy, plain_greedy
from ccds.score.s2l import kmeans, kmeans_pp


def timed(fn, repeats: int = 1):
    """fn's result and its wall times over `repeats` calls."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, times


def stats(times: list[float]) -> dict:
    return {"min": min(times), "median": float(np.median(times)), "max": max(times),
            "repeats": len(times)}


def real_documents(n: int) -> list[Example]:
    """Every text in ../shared/data (BIG-bench, GSM8K train, Alpaca, MMLU, BBH), topped up
    to n with pairs of them joined, so the pool is real text of realistic lengths."""
    docs = (load_bigbench() + load_gsm8k() + load_alpaca() + load_mmlu() + load_bbh())
    base = len(docs)
    rng = np.random.default_rng(0)
    while len(docs) < n:
        i, j = rng.integers(base, size=2)
        docs.append(Example(f"pair-{len(docs)}", docs[i].prompt + "\n" + docs[j].prompt,
                            docs[i].response, "pair"))
    return docs[:n]


def bench_bm25(n_docs: int, n_queries: int) -> dict:
    pool = real_documents(n_docs)
    target, _ = gsm8k_target(n_val=n_queries)  # V: GSM8K train questions
    method = get_method("bm25")
    ours, t_ours = timed(lambda: run(method, pool, target, ctx=Context(), cache=None), 3)

    def reference():
        from rank_bm25 import BM25Okapi

        bm = BM25Okapi([tokenize(e.prompt) for e in pool], k1=1.5, b=0.75, epsilon=0.25)
        return np.mean([bm.get_scores(tokenize(f"{q.prompt} {q.response}"))  # ccds's query
                        for q in target.val], axis=0)

    ref, t_ref = timed(reference)
    k = len(pool) // 20
    top = set(np.argsort(-ours.values, kind="stable")[:k])
    top_ref = set(np.argsort(-ref, kind="stable")[:k])
    return {"docs": len(pool), "queries": len(target.val),
            "pool_tokens": int(sum(len(tokenize(e.prompt)) for e in pool[:2000]) / 2000
                               * len(pool)),
            "ccds_s": stats(t_ours), "rank_bm25_s": stats(t_ref),
            "speedup": float(np.median(t_ref) / np.median(t_ours)),
            "spearman": float(spearmanr(ours.values, ref).statistic),
            "top5_overlap": len(top & top_ref) / k,
            "max_abs_diff": float(np.abs(ours.values - ref).max())}


def trajectories(n: int, t: int, seed: int = 0) -> np.ndarray:
    """Loss curves shaped like a proxy's: a·exp(−b·step) + c per example, drawn from a few
    dozen families (easy, hard, learnable, noisy) with per-example jitter."""
    rng = np.random.default_rng(seed)
    fam = rng.integers(40, size=n)
    a, b, c = rng.uniform(0.2, 3, 40), rng.uniform(0.05, 1.5, 40), rng.uniform(0.05, 2.5, 40)
    steps = np.linspace(0, 10, t)
    x = (a[fam, None] * rng.lognormal(0, 0.2, (n, 1)) * np.exp(-b[fam, None] * steps)
         + c[fam, None] + rng.normal(0, 0.05, (n, t)))
    return x.astype(np.float32)


def inertia(x: np.ndarray, labels: np.ndarray) -> float:
    cent = np.zeros((labels.max() + 1, x.shape[1]))
    np.add.at(cent, labels, x)
    cent /= np.maximum(np.bincount(labels), 1)[:, None]
    return float(((x - cent[labels]) ** 2).sum())


def bench_kmeans(n: int, t: int, k: int, iters: int) -> dict:
    from sklearn.cluster import KMeans

    x = trajectories(n, t)
    ours, t_ours = timed(lambda: kmeans(x, k, seed=0, iters=iters), 2)

    def reference():  # the same seeding, handed to scikit-learn's Lloyd
        return KMeans(k, init=kmeans_pp(x, k, 0), n_init=1, max_iter=iters,
                      random_state=0).fit_predict(x)

    ref, t_ref = timed(reference, 1)
    _, t_seed = timed(lambda: kmeans_pp(x, k, 0))
    return {"n": n, "t": t, "k": k, "iters": iters, "ccds_s": stats(t_ours),
            "sklearn_s": stats(t_ref), "seeding_s": stats(t_seed),
            "speedup": float(np.median(t_ref) / np.median(t_ours)),
            "inertia_ccds": inertia(x, ours), "inertia_sklearn": inertia(x, ref)}


def bench_facility(n: int, frac: float) -> dict:
    import torch

    docs = (load_gsm8k() + load_alpaca())[:n]
    emb = get_method("embed").embed([e.prompt for e in docs], torch.device("cpu"))  # MiniLM
    k = max(1, int(frac * n))
    (lazy, evals), t_lazy = timed(lambda: lazy_greedy(emb, k), 3)
    plain, t_plain = timed(lambda: plain_greedy(emb, k), 1)
    return {"n": n, "d": int(emb.shape[1]), "picks": k, "lazy_s": stats(t_lazy),
            "plain_s": stats(t_plain), "speedup": float(np.median(t_plain) / np.median(t_lazy)),
            "lazy_gain_evaluations": evals, "plain_gain_evaluations": k * n,
            "same_picks": float(np.mean(lazy == plain))}


def markdown(r: dict) -> str:
    b, km, fl = r["bm25"], r["kmeans"], r["facility"]
    return "\n".join([
        "# Selection passes without a language model: speed beside the reference", "",
        f"Command: `{r['command']}` — {r['date']}, {r['machine']}, {r['wall_s'] / 60:.1f} min.",
        "Times are min / median / max over the repeats shown; ratios are medians from the "
        "same run.", "",
        "| pass | size | ccds s | reference s | speedup | target | agreement |",
        "|---|---|---|---|---|---|---|",
        f"| BM25 vs rank_bm25 | {b['docs']:,} docs × {b['queries']} queries | "
        f"{_t(b['ccds_s'])} | {_t(b['rank_bm25_s'])} | {b['speedup']:.1f}x | ≥ 20x | "
        f"Spearman {b['spearman']:.6f}, top-5% overlap {b['top5_overlap']:.3f} |",
        f"| k-means vs scikit-learn | {km['n']:,} × {km['t']}, K={km['k']}, "
        f"{km['iters']} iters | {_t(km['ccds_s'])} | {_t(km['sklearn_s'])} | "
        f"{km['speedup']:.1f}x | ≤ 60 s | inertia {km['inertia_ccds']:.4g} vs "
        f"{km['inertia_sklearn']:.4g} |",
        f"| facility location: lazy vs plain greedy | {fl['n']:,} × {fl['d']}, "
        f"{fl['picks']} picks | {_t(fl['lazy_s'])} | {_t(fl['plain_s'])} | "
        f"{fl['speedup']:.1f}x | — | same picks {fl['same_picks']:.1%}; gain evaluations "
        f"{fl['lazy_gain_evaluations']:,} vs {fl['plain_gain_evaluations']:,} |", "",
        f"k-means++ seeding alone (shared by both k-means columns): "
        f"{_t(km['seeding_s'])} s.", ""])


def _t(s: dict) -> str:
    return (f"{s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f}" if s["repeats"] > 1
            else f"{s['min']:.2f}")


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--trajectories", type=int, default=1_000_000)
    ap.add_argument("--facility", type=int, default=6000)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    r = {"command": "python benchmarks/speed_select.py " + " ".join(sys.argv[1:]),
         "date": str(date.today()),
         "machine": f"{cpu()}, "
                    f"{torch.get_num_threads()} threads"}
    print("facility location ...", flush=True)
    r["facility"] = bench_facility(args.facility, 0.05)
    print(r["facility"], flush=True)
    print("k-means ...", flush=True)
    r["kmeans"] = bench_kmeans(args.trajectories, 12, 100, 25)
    print(r["kmeans"], flush=True)
    print("bm25 ...", flush=True)
    r["bm25"] = bench_bm25(args.docs, args.queries)
    print(r["bm25"], flush=True)
    r["wall_s"] = time.perf_counter() - t0
    write_json(args.out / "speed_select.json", r)
    write_text(args.out / "speed_select.md", markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
