"""BM25 (Okapi) lexical relevance of pool prompts to a target's validation examples.

BM25 is linear in the query's term counts, so the mean score over a subtask's validation
examples is the score of their mean term-count vector: scoring is one sparse matrix-vector
product per subtask and no |D|×|V| matrix is ever formed. idf follows Okapi with the common
floor for negative values (ε·mean idf, ε = 0.25), so scores agree with rank_bm25's BM25Okapi.

Two passes keep memory bounded for pools of millions: pass 1 streams the pool once for
document frequencies and lengths (statistics of shards merge by addition, so shards can be
counted anywhere); pass 2 scores one shard at a time, with only the query terms as columns.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse as sp
from pydantic import Field

from ..data.types import Example
from .backend import map_pool, reduce_pool
from .base import Method, Params, Pass, Reduce, aggregate_subtasks

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lowercase, strip punctuation, split: the CCDS BM25 preprocessing."""
    return _TOKEN.findall(text.lower())


@dataclass
class CorpusStats:
    """Pass 1: what BM25 needs to know about the whole pool. `a + b` merges shards."""

    n: int = 0
    total_len: int = 0
    df: Counter = field(default_factory=Counter)

    @classmethod
    def of(cls, docs: Iterable[Example]) -> CorpusStats:
        s = cls()
        for e in docs:
            toks = tokenize(e.prompt)
            s.n += 1
            s.total_len += len(toks)
            s.df.update(set(toks))
        return s

    def __add__(self, other: CorpusStats) -> CorpusStats:
        return CorpusStats(self.n + other.n, self.total_len + other.total_len,
                           self.df + other.df)

    def idf(self, terms: Sequence[str], epsilon: float) -> np.ndarray:
        """Okapi idf of `terms`; negative values floored at ε·(mean idf over the vocabulary)."""
        all_df = np.fromiter(self.df.values(), dtype=np.float64, count=len(self.df))
        floor = epsilon * float(np.mean(np.log(self.n - all_df + 0.5) - np.log(all_df + 0.5)))
        df = np.array([self.df[t] for t in terms], dtype=np.float64)
        idf = np.log(self.n - df + 0.5) - np.log(df + 0.5)
        idf[idf < 0] = floor
        return idf


class BM25Params(Params):
    execution = frozenset({"shard_size"})
    k1: float = Field(1.5, ge=0, description="term-frequency saturation")
    b: float = Field(0.75, ge=0, le=1, description="document-length normalisation")
    epsilon: float = Field(0.25, ge=0, description="floor of negative idf, times mean idf")
    query: Literal["prompt", "full"] = Field(
        "full", description="V text used as the query: the prompt, or prompt + response")
    reduce: Reduce = Field("mean", description="over subtasks")
    shard_size: int = Field(100_000, ge=1, description="documents scored at a time (pass 2)")


class BM25(Method):
    name = "bm25"
    Params = BM25Params

    def _stats(self, pool) -> CorpusStats:
        n = self.params.shard_size
        return sum((CorpusStats.of(pool[lo:lo + n]) for lo in range(0, len(pool), n)),
                   CorpusStats())

    def cost(self, pool, target) -> float:
        """2 FLOPs per (query term, matching document): the sparse product's multiply-adds."""
        stats = self._stats(pool)
        terms, queries = self._queries(target, stats)
        df = np.array([stats.df[t] for t in terms], dtype=np.float64)
        return float(sum(2.0 * df[q.nonzero()[0]].sum() for q in queries.values()))

    def score(self, pool, target, ctx, meter) -> np.ndarray:
        p = self.params
        stats = sum(reduce_pool(CorpusStats.of, pool, ctx, p.shard_size), CorpusStats())
        terms, queries = self._queries(target, stats)
        scorer = Scorer(self, stats.idf(terms, p.epsilon), {t: j for j, t in enumerate(terms)},
                        stats.total_len / max(stats.n, 1), np.stack(list(queries.values()), 1))
        return map_pool(scorer, pool, ctx, meter, key=self.key(pool, target, ctx), desc="bm25")

    def weights(self, tf: sp.csr_matrix, dl: np.ndarray, idf: np.ndarray,
                avgdl: float) -> sp.csr_matrix:
        """BM25 term weights w(d, t) = idf(t)·tf·(k1+1) / (tf + k1·(1 − b + b·|d|/avgdl))."""
        k1, b = self.params.k1, self.params.b
        w = tf.astype(np.float64).tocsr(copy=True)
        rows = np.repeat(np.arange(tf.shape[0]), np.diff(w.indptr))
        norm = k1 * (1 - b + b * dl / max(avgdl, 1e-12))
        w.data = idf[w.indices] * w.data * (k1 + 1) / (w.data + norm[rows])
        return w

    def _queries(self, target, stats: CorpusStats) -> tuple[list[str], dict[str, np.ndarray]]:
        """The pool terms the queries use, and each subtask's mean term-count vector."""
        texts = {}
        for name, idx in target.val_by_subtask().items():
            texts[name] = [tokenize(target.val[i].prompt if self.params.query == "prompt"
                                    else f"{target.val[i].prompt} {target.val[i].response}")
                           for i in idx]
        terms = sorted({t for docs in texts.values() for d in docs for t in d if t in stats.df})
        column = {t: j for j, t in enumerate(terms)}
        out = {}
        for name, docs in texts.items():
            q = np.zeros(len(terms))
            for d in docs:
                for t in d:
                    if t in column:
                        q[column[t]] += 1
            out[name] = q / len(docs)
        return terms, out


class Scorer(Pass):
    """Pass 2: each document's BM25 score for each subtask's query, a shard at a time,
    combined over subtasks right away (a row per document, not one per subtask)."""

    def __init__(self, method: BM25, idf: np.ndarray, column: dict[str, int], avgdl: float,
                 queries: np.ndarray):
        self.method, self.idf, self.column, self.avgdl = method, idf, column, avgdl
        self.queries = queries  # terms × subtasks

    def __call__(self, examples, runtime, meter, progress=None) -> np.ndarray:
        n = self.method.params.shard_size
        out = np.empty(len(examples))
        for lo in range(0, len(examples), n):
            tf, dl = _term_counts(examples[lo:lo + n], self.column)
            w = self.method.weights(tf, dl, self.idf, self.avgdl)
            out[lo:lo + len(dl)] = aggregate_subtasks(w @ self.queries,
                                                      self.method.params.reduce)
            for q in self.queries.T:
                meter.add(2.0 * w[:, q.nonzero()[0]].nnz, counted=True)
        return out


def _term_counts(docs: Sequence[Example], column: dict[str, int]
                 ) -> tuple[sp.csr_matrix, np.ndarray]:
    """Counts of the query terms (columns) in each document, and each document's length."""
    indptr, indices, dl = [0], [], np.empty(len(docs))
    for i, e in enumerate(docs):
        toks = tokenize(e.prompt)
        dl[i] = len(toks)
        indices.extend(column[t] for t in toks if t in column)
        indptr.append(len(indices))
    m = sp.csr_matrix((np.ones(len(indices)), np.asarray(indices, dtype=np.int64),
                       np.asarray(indptr)), shape=(len(docs), len(column)))
    m.sum_duplicates()
    return m, dl
