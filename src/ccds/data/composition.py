"""What a selected subset is made of, against the pool it came from (S2L's Figure-style
view), and how purely trajectory clusters follow the data's sources."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .types import Example

_SPLIT = re.compile(r"[/:]")


def group(source: str, depth: int = 1) -> str:
    """`bigbench/arithmetic/3_digit` at depth 1 is `bigbench`, at depth 2 `bigbench/arithmetic`."""
    parts = _SPLIT.split(source or "unknown")
    return "/".join(parts[:depth])


def shares(examples: Sequence[Example], depth: int = 1) -> dict[str, float]:
    c = Counter(group(e.source, depth) for e in examples)
    n = max(sum(c.values()), 1)
    return {k: v / n for k, v in c.most_common()}


def composition(pool: Sequence[Example], subsets: dict[str, Sequence[Example]],
                depth: int = 1, top: int = 12) -> dict:
    """Share of each group in the pool and in each subset; groups beyond `top` are 'other'."""
    base = shares(pool, depth)
    keep = list(base)[:top]
    out = {"groups": keep + (["other"] if len(base) > top else []), "pool": {}, "subsets": {}}

    def fold(s: dict[str, float]) -> dict[str, float]:
        d = {g: s.get(g, 0.0) for g in keep}
        if len(base) > top:
            d["other"] = 1.0 - sum(d.values())
        return d

    out["pool"] = fold(base)
    for name, ex in subsets.items():
        out["subsets"][name] = fold(shares(ex, depth))
    return out


def cluster_purity(labels: np.ndarray, sources: Sequence[str], depth: int = 1) -> float:
    """Mean over examples of the share of their cluster's most common group (1 = every
    cluster holds one group; the pool's largest group share = no relation at all)."""
    labels = np.asarray(labels)
    groups = np.array([group(s, depth) for s in sources])
    total = 0
    for c in np.unique(labels):
        total += Counter(groups[labels == c]).most_common(1)[0][1]
    return total / max(len(labels), 1)


def plot_composition(comp: dict, path: Path | str, title: str = "") -> None:
    """Grouped horizontal bars: the pool's share of each group beside each subset's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    names = ["pool", *comp["subsets"]]
    series = [comp["pool"], *comp["subsets"].values()]
    g = comp["groups"]
    y = np.arange(len(g))
    h = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.35 * len(g) * max(1, len(names) / 2)))
    for i, (n, s) in enumerate(zip(names, series, strict=True)):
        ax.barh(y + i * h, [100 * s[k] for k in g], h, label=n,
                color="0.6" if n == "pool" else None)
    ax.set_yticks(y + h * (len(names) - 1) / 2, g)
    ax.invert_yaxis()
    ax.set_xlabel("share of examples (%)")
    ax.set_title(title or "composition of the selected subsets")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
