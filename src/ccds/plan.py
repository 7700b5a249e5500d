"""`ccds plan`: for a FLOPs budget, a trained model, a selection model and a pool, which
method and fraction to use, and what to expect.

Each method is described by a fitted curve P(x) over total compute in units of its own full
training (x = s + f: selection share s, training fraction f) and by how its selection cost
scales: c_sel = k · N_sel · T_pool (k = 2 for a forward pass over the pool, ≈ 10.8 for LESS).
At the user's scale, C_full = 6 · N_train · T_pool (paper convention), the selection costs
k · N_sel · T_pool / tasks, and the affordable fraction is f = (budget − c_sel) / C_full,
capped at 1. The prediction is the curve at the fraction it was fitted with, x = s_fit + f —
it assumes a method turns a training fraction into performance as it did where it was
fitted; only the price changes. Every plan's cost is within the budget by construction.

The prior (no sweep needed) is the CCDS paper's MMLU fits (spec §2, §4): rates per 1e18 FLOPs
at Llama-2-7B and selection costs from its reference totals. It gives curve shapes, not the
user's numbers: its predictions are shares of the attainable gain (P − P0)/(P̄ − P0), never
Llama-2's MMLU accuracy; P in the user's units needs a measurement (`ccds run` measures P0
on V, `ccds plan --pilot` fits a sweep). Embeddings are priced by their encoder's forward
pass over the pool (the paper drew them at ~0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .analyse.fit import curve
from .errors import CcdsError
from .io import read_json

# Llama-2-7B, pool 270,679 examples ≈ 1.0e8 tokens: full training 4.593e18 FLOPs (6·N·T)
_PAPER_FULL_7B = 4.593e18
_PAPER_NT_7B = _PAPER_FULL_7B / 6  # N·T of the 7B model on that pool
PAPER_PRIOR = {
    "source": "Yin & Rush 2024, MMLU, Llama-2 (spec §2, §4)",
    "sizes": {7e9: {"pbar": 47.42, "p0": 45.18}, 13e9: {"pbar": 55.50, "p0": 52.89},
              70e9: {"pbar": 70.05, "p0": 68.75}},
    # rate per 1e18 FLOPs of total compute at 7B; k: selection FLOPs / (N_sel · T_pool)
    "methods": {"random": {"rate": 0.515, "k": 0.0},  # embed: its encoder's cost (below)
                "bm25": {"rate": 0.910, "k": 0.0},
                "embed": {"rate": 1.316, "k": 0.0},
                "ppl": {"rate": 1.913, "k": 1.531e18 / _PAPER_NT_7B},
                "less": {"rate": 0.455, "k": 8.269e18 / _PAPER_NT_7B}},
}


_COUNT = re.compile(r"(\d+\.?\d*|\.\d+)(e[+-]?\d+)?([kmbt]?)", re.IGNORECASE)
_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
COUNT_FORMS = "7B, 70b, 1.5B, 135M, 7e9 or 7000000000"


def parse_count(text: str, what: str = "count") -> float:
    """A count as people write model and pool sizes: '7B', '70b', '1.5B', '135M', '7e9' or
    '7000000000'."""
    m = _COUNT.fullmatch(text.strip())
    if m is None:
        raise CcdsError(f"{what} {text!r} is not a number", None, f"write it as {COUNT_FORMS}")
    return float(m[1] + (m[2] or "")) * _SCALE[m[3].lower()]


def model_size(spec: str) -> float:
    """Parameters a token pays for: a count (see `parse_count`) or a model whose active
    non-embedding size is read from its config (a mixture-of-experts runs only its top-k)."""
    if _COUNT.fullmatch(spec.strip()):
        return parse_count(spec)
    from .models import counts_without_weights

    try:
        return float(counts_without_weights(spec)["active"])
    except CcdsError as e:
        if not e.what.startswith("unknown model"):
            raise
        raise CcdsError(f"{spec!r} is neither a parameter count nor a known model", None,
                        f"give a count ({COUNT_FORMS}) or a model: {e.fix}") from None


@dataclass
class MethodModel:
    """What the planner needs about one method."""

    name: str
    pbar: float
    p0: float
    lam: float  # per C_full of the fit
    s_fit: float  # selection share at the fit's scale
    k: float  # selection FLOPs per (selection-model parameter · pool token)
    lam_interval: tuple[float, float] | None = None
    relative: bool = False  # predictions are shares of the attainable gain, not P
    per_token: float = 0.0  # selection FLOPs per pool token whatever the selection model is

    def predict(self, f: float, lam: float | None = None) -> float:
        return float(curve(self.s_fit + f, self.pbar, self.p0,
                           self.lam if lam is None else lam, 1.0))


# ccds's default sentence encoder, all-MiniLM-L6-v2: 6 layers of width 384, so ≈ 12·6·384²
# non-embedding parameters, 2 FLOPs each per pool token
ENCODER_PARAMS = 12 * 6 * 384**2


def paper_prior(n_train: float, encoder_params: float = ENCODER_PARAMS) -> list[MethodModel]:
    """The paper's curves as shapes: P̄ = 1 and P0 = 0, so a prediction is the share of the
    attainable gain. `encoder_params`: what embed's encoder costs per pool token / 2 (0: the
    paper's free embeddings, as `ccds plan` priced them before)."""
    out = []
    for name, m in PAPER_PRIOR["methods"].items():
        lam = m["rate"] * _PAPER_FULL_7B / 1e18  # per C_full at 7B
        s_fit = m["k"] * _PAPER_NT_7B / _PAPER_FULL_7B
        out.append(MethodModel(name, 1.0, 0.0, lam, s_fit, m["k"], relative=True,
                               per_token=2.0 * encoder_params if name == "embed" else 0.0))
    return out


def from_fits(path: Path | str, target: str | None = None
              ) -> tuple[list[MethodModel], float]:
    """Method models from `ccds analyze`'s fits.json (the group of `target`, else the first)
    and its C_full / (N_train · T_pool), so plans price training in the fit's convention."""
    report = read_json(path)
    try:
        groups = [g for g in report["groups"] if target in (None, g["target"]) and g["fits"]]
        if not groups:
            raise CcdsError("no fitted curves in this fits file" + (f" for {target}" if target
                            else ""), str(path), "run ccds analyze on a sweep with enough "
                                                 "fractions")
        g = groups[0]
        out = []
        for name, f in g["fits"].items():
            meta = g["methods"][name]
            iv = f.get("intervals", {}).get("lam")  # an unidentified upper end: a flat curve
            out.append(MethodModel(name, f["pbar"], f["p0"], f["lam"], meta["selection_share"],
                                   meta["k"], (iv[0], np.inf if iv[1] is None else iv[1])
                                   if iv else None))
        return out, float(g["c_full_k"])
    except (KeyError, TypeError, IndexError, AttributeError, ValueError):
        raise CcdsError("not a fits file written by `ccds analyze`", str(path),
                        "pass the report/fits.json of `ccds analyze`") from None


@dataclass
class Option:
    method: str
    fraction: float
    selection_flops: float
    training_flops: float
    predicted: float
    interval: tuple[float, float] | None
    relative: bool = False  # `predicted` is a share of the attainable gain

    @property
    def total(self) -> float:
        return self.selection_flops + self.training_flops


def plan(budget: float, n_train: float, n_sel: float, pool_tokens: float,
         models: list[MethodModel], tasks: int = 1, c_full_k: float = 6.0
         ) -> tuple[list[Option], list[tuple[str, str]]]:
    """Every affordable option, best first, and the methods ruled out (with why).
    Training on the whole pool costs c_full_k · N_train · T_pool (6: the paper's convention)."""
    if not all(np.isfinite(x) and x > 0 for x in (budget, n_train, n_sel, pool_tokens)) \
            or tasks < 1:
        raise CcdsError("budget, model sizes and pool tokens must be positive (finite) numbers,"
                        " tasks ≥ 1")
    c_full = c_full_k * n_train * pool_tokens
    options, ruled_out = [], []
    for m in models:
        c_sel = (m.k * n_sel + m.per_token) * pool_tokens / tasks
        if c_sel >= budget:
            ruled_out.append((m.name, f"its selection alone costs {c_sel:.3g} FLOPs, more than "
                                      f"the budget {budget:.3g}"))
            continue
        f = min(1.0, (budget - c_sel) / c_full)
        lo_hi = None
        if m.lam_interval is not None:
            lo_hi = tuple(sorted((m.predict(f, m.lam_interval[0]),
                                  m.predict(f, m.lam_interval[1]))))
        options.append(Option(m.name, f, c_sel, f * c_full, m.predict(f), lo_hi, m.relative))
    options.sort(key=lambda o: -o.predicted)
    return options, ruled_out


def explain(options: list[Option], ruled_out: list[tuple[str, str]], budget: float,
            c_full: float, tasks: int, source: str) -> str:
    if not options:
        return ("No method fits this budget: " + "; ".join(f"{m}: {w}" for m, w in ruled_out)
                + ". Raise the budget or use a smaller selection model.")
    best = options[0]
    what = "share of the attainable gain" if best.relative else ""
    text = (f"Use {best.method} on {best.fraction:.1%} of the pool: its selection costs "
            f"{best.selection_flops:.3g} FLOPs ({best.selection_flops / budget:.0%} of the "
            f"budget) and training {best.training_flops:.3g}, for a predicted "
            f"{what + ' ' if what else ''}{best.predicted:.2f}")
    if best.interval:
        text += f" [{best.interval[0]:.2f}, {best.interval[1]:.2f}]"
    text += "."
    if len(options) > 1:
        ru = options[1]
        text += (f" The runner-up, {ru.method} on {ru.fraction:.1%}, predicts {ru.predicted:.2f}"
                 f" ({best.predicted - ru.predicted:+.2f} for the choice).")
    if best.fraction >= 1:
        text += " The budget covers the whole pool; what is left over buys nothing more here."
    pricier = [o for o in options if o.selection_flops > best.selection_flops + 0.05 * budget]
    if pricier:
        o = pricier[0]
        text += (f" {o.method} spends {o.selection_flops / budget:.0%} of the budget on "
                 f"selection, which leaves {o.fraction:.1%} of the pool for training; sharing "
                 f"its selection over more than {tasks} task(s) would lower that price.")
    if best.relative:
        text += (" Predictions are shares of the gain over zero-shot that full training would "
                 "bring: the prior's curves are another model's on another task, so P in your "
                 "units is withheld until it is measured (ccds run measures P0 on V; "
                 "--pilot or --fits plan from your own runs).")
    text += f" (Curves: {source}; full training costs {c_full:.3g} FLOPs.)"
    return text
