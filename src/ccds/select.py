"""Scores -> a subset: by fraction, count, token budget or FLOPs budget.

Ranking is by score, highest first, ties broken by pool position, so the same scores always
give the same subset. A FLOPs budget pays for selection first; what is left buys training
tokens at the given cost per token.
"""

from __future__ import annotations

import numpy as np

from .errors import CcdsError


def rank(scores: np.ndarray) -> np.ndarray:
    """Pool indices from best to worst score (stable on ties)."""
    return np.lexsort((np.arange(len(scores)), -np.asarray(scores, dtype=np.float64)))


def budget_count(n: int, *, fraction: float | None = None, count: int | None = None) -> int:
    given = [x is not None for x in (fraction, count)]
    if sum(given) != 1:
        raise CcdsError("give exactly one of fraction or count")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise CcdsError(f"fraction {fraction} is outside (0, 1]", None,
                            "use e.g. 0.05 for 5% of the pool")
        return max(1, int(round(fraction * n)))
    assert count is not None
    if count < 1:
        raise CcdsError(f"count {count} must be at least 1")
    return min(count, n)


def select(scores: np.ndarray, *, fraction: float | None = None, count: int | None = None,
           tokens: int | None = None, flops: float | None = None,
           lengths: np.ndarray | None = None, flops_per_token: float | None = None,
           selection_flops: float = 0.0) -> np.ndarray:
    """Indices of the chosen examples, in rank order.

    tokens: take examples in rank order while their total length fits (skipping ones that
    do not fit). flops: the token budget is (flops − selection_flops) / flops_per_token.
    """
    order = rank(scores)
    if tokens is None and flops is None:
        return order[: budget_count(len(order), fraction=fraction, count=count)]
    if lengths is None:
        raise CcdsError("a token or FLOPs budget needs token lengths of the pool")
    if flops is not None:
        if not np.isfinite(flops):
            raise CcdsError(f"the FLOPs budget {flops} is not a finite number")
        if not flops_per_token:
            raise CcdsError("a FLOPs budget needs the training cost per token")
        left = flops - selection_flops
        if left <= 0:
            raise CcdsError(f"the FLOPs budget {flops:.3e} does not cover the selection cost "
                            f"{selection_flops:.3e} alone", None,
                            "raise the budget or choose a cheaper method")
        tokens = int(left // flops_per_token)
        if tokens <= 0:
            raise CcdsError(f"the FLOPs budget leaves {left:.3e} after selection, less than "
                            f"training on one token costs ({flops_per_token:.3e})", None,
                            "raise the budget")
    assert tokens is not None
    if tokens <= 0:
        raise CcdsError(f"token budget {tokens} must be positive")
    taken = np.cumsum(np.asarray(lengths)[order])
    fits = taken <= tokens
    chosen = order[fits] if fits.all() or not fits.any() else order[: int(np.argmin(fits))]
    rest = order[len(chosen):]
    used = int(np.asarray(lengths)[chosen].sum())
    extra = []
    for i in rest:  # greedily fill what is left with later, shorter examples
        if used + lengths[i] <= tokens:
            extra.append(i)
            used += int(lengths[i])
    return np.concatenate([chosen, np.asarray(extra, dtype=order.dtype)])
