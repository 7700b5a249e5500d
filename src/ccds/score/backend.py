"""Where a scoring pass runs: in this process (`local`, the default) or on a Ray cluster.

`map_pool` runs a `base.Pass` over the pool. Locally it is one call per chunk of the pool,
batched by length inside; on Ray (`on_ray`, imported only then) the pool goes out in shards
to an actor pool. Either way the rows come back in pool order and the work is metered, so
the ledger is the same on either backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..data.types import Example
from ..flops import Meter
from .base import Backend, Pass


def map_pool(p: Pass, pool: Sequence[Example], ctx, meter: Meter, *, key: str,
             desc: str | None = None) -> np.ndarray:
    """Run `p` over the pool on `ctx.backend`; rows in pool order. `key` names the
    computation (method settings, weights, pool) so finished shards are found again."""
    backend: Backend = ctx.backend
    if backend.kind == "ray":
        from .on_ray import ray_map

        return ray_map(p, pool, ctx, meter, key, desc)
    p.setup(ctx.runtime)
    n, out = backend.chunk, None
    for lo in range(0, len(pool), n):  # only a chunk is ever tokenized at once
        label = desc if len(pool) <= n else f"{desc} {lo // n + 1}/{-(-len(pool) // n)}"
        rows = np.asarray(p(pool[lo:lo + n], ctx.runtime, meter, label if ctx.progress else None))
        if out is None:  # filled in place: no second copy of the pool's rows at the end
            out = np.empty((len(pool),) + rows.shape[1:], rows.dtype)
        out[lo:lo + len(rows)] = rows
    return out


def reduce_pool(fn: Callable[[Sequence[Example]], Any], pool: Sequence[Example], ctx,
                size: int) -> list:
    """`fn` of each `size`-row shard of the pool, in order (partial results a caller merges,
    like BM25's document frequencies): in this process, or as Ray tasks."""
    shards = [pool[lo:lo + size] for lo in range(0, len(pool), size)]
    if ctx.backend.kind == "local":
        return [fn(s) for s in shards]
    from .on_ray import ray_reduce

    return ray_reduce(fn, shards, ctx.backend)
