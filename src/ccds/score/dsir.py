"""DSIR (Xie et al. 2023): importance resampling on hashed n-gram features.

Each example's text (prompt + response by default) is lowercased and split into runs of
word characters and runs of punctuation (`\\w+|[^\\w\\s]+` in the `regex` engine, whose `\\w`
keeps combining marks inside words), as nltk's WordPunctTokenizer does in the featuriser of
p-lambda's `data-selection`; its unigrams and bigrams are hashed into B buckets (10,000 by
default) with the same stable hash (SHA-256 of the UTF-8 n-gram, mod B), so ccds's features
are the reference's. Bucket distributions of the pool (raw) and of the target's V
(optionally Laplace-smoothed) give each example the log importance weight
log w(x) = Σ_b c_b(x)·(log p_target[b] − log p_raw[b]), with ε = 1e-8 inside each log.
Scores are log w plus seeded Gumbel noise (`resample="gumbel"`: the top k is then a sample
without replacement in proportion to w) or log w itself (`resample="topk"`). Like the
reference, examples under `min_length` tokens (100) are set aside: they rank after every
longer one (among themselves by the same score), so any fraction of the pool can be taken.

Two streamed passes, like BM25's: pass 1 counts the pool's buckets a shard at a time
(`reduce_pool`; counts of shards add up), pass 2 scores a chunk at a time (`map_pool`).
Either runs on Ray. The cost is CPU work: 2 FLOPs (a multiply-add of count × log ratio) per
n-gram occurrence in the pool, no model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Literal

import numpy as np
import regex  # the Unicode `\w` of nltk's tokenizers (marks join words); transformers needs it
from pydantic import Field

from ..data.types import Example
from .backend import map_pool, reduce_pool
from .base import Method, Params, Pass

EPS = 1e-8  # inside each log, as the reference adds it
_WORDPUNCT = regex.compile(r"\w+|[^\w\s]+")
_MEMO: dict[int, dict[str, int]] = {}  # per bucket count: n-gram -> bucket, this process
_MEMO_MAX = 1 << 20  # n-grams remembered per bucket count before the memo starts afresh


def bucket(ngram: str, buckets: int) -> int:
    """The stable hash of an n-gram: SHA-256 of its UTF-8 bytes mod `buckets` (the same in
    every process and on every machine, and the same as `data_selection.hash_buckets`)."""
    return int.from_bytes(hashlib.sha256(ngram.encode("utf-8")).digest(), "big") % buckets


def words(text: str) -> list[str]:
    """Lowercased word and punctuation runs: the reference featuriser's tokens."""
    return _WORDPUNCT.findall(text.lower())


def ngram_count(n_words: int, n: int) -> int:
    """Unigrams + … + n-grams of a text of `n_words` tokens."""
    return sum(max(n_words - i + 1, 0) for i in range(1, n + 1))


@dataclass(frozen=True)
class Featuriser:
    """Hashed 1..n-gram occurrences of examples' text, a chunk at a time."""

    buckets: int = 10_000
    ngrams: int = 2
    text: Literal["full", "prompt"] = "full"
    chunk: int = 4096  # examples whose n-gram strings are held at once

    def text_of(self, e: Example) -> str:
        return e.prompt if self.text == "prompt" else f"{e.prompt}\n{e.response}"

    def occurrences(self, examples: Sequence[Example]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The bucket of every n-gram occurrence, the example each belongs to, and each
        example's length in tokens (for a chunk: every n-gram string is held at once)."""
        grams: list[str] = []
        lengths = np.empty(len(examples), dtype=np.int64)
        per = np.empty(len(examples), dtype=np.int64)
        for i, e in enumerate(examples):
            toks = words(self.text_of(e))
            before = len(grams)
            grams += toks
            for k in range(2, self.ngrams + 1):  # "a b" for each adjacent pair (k = 2), ...
                grams += map(" ".join, zip(*(toks[j:] for j in range(k)), strict=False))
            lengths[i], per[i] = len(toks), len(grams) - before
        memo = _MEMO.setdefault(self.buckets, {})
        new = set(grams).difference(memo)
        if len(memo) + len(new) > _MEMO_MAX:
            memo.clear()
            new = set(grams)
        memo.update((g, bucket(g, self.buckets)) for g in new)
        # itemgetter looks every n-gram up in one C loop (it returns a bare value for one)
        found = itemgetter(*grams)(memo) if len(grams) > 1 else [memo[g] for g in grams]
        ids = np.array(found, dtype=np.int64)
        return ids, np.repeat(np.arange(len(examples)), per), lengths

    def counts(self, examples: Sequence[Example]) -> np.ndarray:
        """Bucket counts summed over `examples` (shards' counts merge by addition)."""
        total = np.zeros(self.buckets, dtype=np.int64)
        for lo in range(0, len(examples), self.chunk):
            ids, _, _ = self.occurrences(examples[lo:lo + self.chunk])
            total += np.bincount(ids, minlength=self.buckets)
        return total


def log_ratio(raw: np.ndarray, target: np.ndarray, smoothing: float = 0.0) -> np.ndarray:
    """log p_target − log p_raw per bucket; `smoothing` (Laplace α) is added to every target
    bucket count before normalising."""
    t = target.astype(np.float64) + smoothing
    p_t = t / max(t.sum(), EPS)
    p_r = raw / max(raw.sum(), 1)
    return np.log(p_t + EPS) - np.log(p_r + EPS)


class DSIRParams(Params):
    execution = frozenset({"shard_size"})
    buckets: int = Field(10_000, ge=1, description="hash buckets of the n-gram features")
    ngrams: int = Field(2, ge=1, le=5, description="1: unigrams; 2: unigrams + bigrams; ...")
    text: Literal["full", "prompt"] = Field(
        "full", description="text featurised: prompt + response, or the prompt")
    smoothing: float = Field(0.0, ge=0, description="Laplace α added to each target bucket "
                             "count (0: the reference's unsmoothed estimate)")
    resample: Literal["gumbel", "topk"] = Field(
        "gumbel", description="gumbel: log w + seeded Gumbel noise, so the top k is a sample "
                              "∝ w without replacement; topk: log w")
    min_length: int = Field(100, ge=0, description="examples with fewer tokens rank after "
                            "all longer ones (the reference drops them; 0: keep all)")
    shard_size: int = Field(100_000, ge=1, description="pool rows counted per task (pass 1)")


class DSIR(Method):
    name = "dsir"
    Params = DSIRParams

    @property
    def featuriser(self) -> Featuriser:
        p = self.params
        return Featuriser(p.buckets, p.ngrams, p.text)

    def cost(self, pool, target) -> float:
        """2 FLOPs per n-gram occurrence in the pool: the multiply-add of its count and its
        bucket's log ratio (hashing and counting are not FLOPs; no model runs)."""
        f = self.featuriser
        return 2.0 * sum(ngram_count(len(words(f.text_of(e))), f.ngrams) for e in pool)

    def log_weights(self, pool, target, ctx, meter) -> tuple[np.ndarray, np.ndarray]:
        """log w of every pool example and its length in tokens."""
        f, p = self.featuriser, self.params
        raw = sum(reduce_pool(f.counts, pool, ctx, p.shard_size),
                  np.zeros(f.buckets, dtype=np.int64))
        ratio = log_ratio(raw, f.counts(target.val), p.smoothing)
        rows = map_pool(LogWeights(f, ratio), pool, ctx, meter, key=self.key(pool, target, ctx),
                        desc="dsir")
        return rows[:, 0], rows[:, 1]

    def score(self, pool, target, ctx, meter) -> np.ndarray:
        logw, length = self.log_weights(pool, target, ctx, meter)
        s = logw.copy()
        if self.params.resample == "gumbel":
            s += np.random.default_rng(self.params.seed).gumbel(size=len(s))
        short = length < self.params.min_length
        if short.any() and not short.all():  # below every longer example, order kept
            s[short] -= s[short].max() - s[~short].min() + 1.0
        return s


class LogWeights(Pass):
    """Pass 2: each example's log importance weight and length, a chunk at a time."""

    def __init__(self, f: Featuriser, ratio: np.ndarray):
        self.f, self.ratio = f, ratio

    def __call__(self, examples, runtime, meter, progress=None) -> np.ndarray:
        out = np.empty((len(examples), 2))
        for lo in range(0, len(examples), self.f.chunk):
            chunk = examples[lo:lo + self.f.chunk]
            ids, row, lengths = self.f.occurrences(chunk)
            out[lo:lo + len(chunk), 0] = np.bincount(row, weights=self.ratio[ids],
                                                     minlength=len(chunk))
            out[lo:lo + len(chunk), 1] = lengths
            meter.add(2.0 * len(ids), counted=True)
        return out
