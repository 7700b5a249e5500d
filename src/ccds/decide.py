"""How `ccds run` decides to spend one budget: which method, at which fraction, after which
pilot. Pure arithmetic over a `World` (what things cost, and a way to try an arm), so the
same rule runs live (`spend.py`) and replayed over stored runs (`experiments/replay.py`).

The adaptive rule (README, "Spending a budget"):

1. Price every method's selection on this pool (its own cost model) and training (C_full).
2. A default from the prior alone: the method whose predicted gain at the fraction its price
   leaves is largest. The prior gives each method a rate λ (headroom bought per C_full of
   training); methods it does not know get random's rate — no evidence is no bonus.
3. A pilot, if the budget holds one: arms are methods in order of price (cheap to score
   first), each trained on a small fraction and evaluated on V, while the pilot stays within
   `pilot_share` of B and, where fractions are discrete, within the slack the final
   training would leave unused anyway. Successive halving: the better half of the arms
   doubles its fraction while the pilot budget lasts.
4. The fit: one headroom A = P̄ − P0 shared by every method, calibrated on the pilot's points
   under the prior's shapes, then each piloted method's own λ from its points; unpiloted
   methods keep the prior's λ scaled by how the piloted methods' rates compare with the
   prior's (and say "prior"). Every option is predicted as a gain over the
   measured P0 on V, at the fraction B leaves it after its unpaid selection.
5. The choice: the best prediction, except that the default is kept unless the pilot beat it
   by more than `z` standard errors of V (a small V decides nothing by noise), and an
   unpiloted method must beat the piloted best by that margin too. Training on the whole
   pool is the same data for every method, so no selection is bought once B covers it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

import numpy as np

Basis = Literal["pilot", "prior"]


@dataclass
class Arm:
    """One pilot training: `p` on V, with its standard error where V gives one."""

    method: str
    fraction: float
    flops: float
    p: float
    se: float | None = None


class World(Protocol):
    """What a rule may ask: prices (unpaid selection is charged once), and trials."""

    c_full: float  # training on the whole pool
    fractions: Sequence[float] | None  # allowed fractions; None: any in (0, 1]
    spent: float

    def selection_cost(self, method: str) -> float: ...
    def training_cost(self, method: str, fraction: float) -> float: ...
    def eval_cost(self) -> float: ...
    def trial(self, method: str, fraction: float) -> Arm: ...
    def zero_shot(self) -> tuple[float, float | None]: ...  # P0 on V and its se, charged


@dataclass
class Option:
    """A way to spend what is left, as predicted at the moment of decision."""

    method: str
    fraction: float
    selection_flops: float  # still to pay
    training_flops: float
    gain: float | None  # predicted P − P0 on V; None when withheld
    lam: float
    basis: Basis


@dataclass
class Decision:
    method: str | None  # None: nothing affordable
    fraction: float
    strategy: str
    budget: float
    pilot_budget: float
    pilot_flops: float
    headroom: float | None  # A = P̄ − P0 on V, where the pilot calibrates it
    p0: float | None = None  # zero-shot on V, measured when there is a pilot
    arms: list[Arm] = field(default_factory=list)
    options: list[Option] = field(default_factory=list)
    reason: str = ""
    certainty: float | None = None  # P(the choice beats the runner-up on V), where measured
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def affordable(world: World, method: str, left: float) -> float:
    """The largest fraction of `method` that `left` FLOPs pay for (its unpaid selection
    first); 0 when none. Discrete worlds: the largest allowed fraction that fits."""
    room = left - world.selection_cost(method)
    if room <= 0:
        return 0.0
    if world.fractions is None:
        return min(1.0, room / world.c_full)
    fits = [f for f in world.fractions if world.training_cost(method, f) <= room]
    return max(fits, default=0.0)


def _shape(lam: float, f: float) -> float:
    return 1.0 - math.exp(-lam * f)


def _lam_from_points(arms: list[Arm], p0: float, a: float) -> float:
    """λ that makes A·(1 − e^{−λf}) fit a method's pilot points (least squares on a log
    grid; bounded, so a flat or negative gain gives λ near 0)."""
    grid = np.geomspace(1e-3, 200.0, 400)
    err = [sum((p0 + a * _shape(g, arm.fraction) - arm.p) ** 2 for arm in arms) for g in grid]
    return float(grid[int(np.argmin(err))])


def _headroom(arms: list[Arm], p0: float, prior: dict[str, float]) -> float | None:
    """A = P̄ − P0 from the pilot: each arm's gain divided by its prior shape; the median,
    so one lucky arm does not set it. None when no arm gained."""
    vals = [(arm.p - p0) / _shape(prior[arm.method], arm.fraction) for arm in arms
            if arm.p > p0 and _shape(prior[arm.method], arm.fraction) > 0]
    return float(np.median(vals)) if vals else None


def _se_diff(a: Arm, b: Arm | None, fallback: float | None) -> float:
    ses = [x.se for x in (a, b) if x is not None and x.se is not None]
    if len(ses) == 2:
        return math.hypot(*ses)
    return fallback or 0.0


def adaptive(world: World, budget: float, methods: Sequence[str], prior: dict[str, float],
             *, pilot_share: float = 0.15, z: float = 1.0, min_arms: int = 2) -> Decision:
    """Pilot cheap arms within `pilot_share` of `budget`, fit, and choose (module doc).
    `prior`: λ per C_full of training for the methods it knows (others get random's)."""
    lam0 = {m: prior.get(m, prior.get("random", 1.0)) for m in methods}
    notes = [f"{m}: no prior rate, random's used" for m in methods if m not in prior]
    left = budget - world.spent
    price = {m: world.selection_cost(m) for m in methods}

    def ranked(lams: dict[str, float], room: float) -> list[tuple[float, str, float]]:
        out = []
        for m in methods:
            f = affordable(world, m, room)
            if f > 0:
                out.append((_shape(lams[m], f), m, f))
        return sorted(out, key=lambda t: (-t[0], price[t[1]], t[1]))

    by_prior = ranked(lam0, left)
    if not by_prior:
        return Decision(None, 0.0, "adaptive", budget, 0.0, 0.0, None, notes=notes,
                        reason="no method trains on any fraction of the pool within the budget")
    default = by_prior[0][1]

    # -- the pilot: cheap-to-score first, within the share and (discrete) the slack ------
    pilot_budget = pilot_share * left
    if world.fractions is not None:  # a pilot must not cost the final training a level
        final_f = affordable(world, default, left)
        slack = left - price[default] - world.training_cost(default, final_f)
        pilot_budget = min(pilot_budget, slack)
    arms: list[Arm] = []
    start = world.spent
    p0 = p0_se = None
    order = sorted(methods, key=lambda m: (price[m], m))
    for k in range(len(order), min_arms - 1, -1):  # when tight, the priciest arms drop out
        # 5% kept aside: measured counts run a few percent over analytic prices (padding)
        fr0 = _pilot_fraction(world, order[:k], price, 0.95 * pilot_budget - world.eval_cost())
        if fr0 is None:
            continue
        cost = {m: price[m] + world.training_cost(m, fr0) + world.eval_cost() for m in order}
        chosen, total = [], world.eval_cost()  # P0 on V first
        for m in order[:k]:
            if total + cost[m] <= 0.95 * pilot_budget:
                chosen.append(m)
                total += cost[m]
        if len(chosen) >= min_arms:
            p0, p0_se = world.zero_shot()
            arms = _halving(world, chosen, fr0, start + pilot_budget)
            break
    pilot_flops = world.spent - start
    left = budget - world.spent

    # -- the fit ----------------------------------------------------------------------------
    lams, basis = dict(lam0), dict.fromkeys(methods, "prior")
    a = _headroom(arms, p0, lam0) if arms else None
    if a is not None:
        piloted = sorted({arm.method for arm in arms})
        for m in piloted:
            lams[m] = _lam_from_points([x for x in arms if x.method == m], p0, a)
            basis[m] = "pilot"
        # the prior's rates are another model's on another task: scaled by how the piloted
        # methods' rates here compare with the prior's (geometric mean of the ratios)
        kappa = math.exp(float(np.mean([math.log(lams[m] / lam0[m]) for m in piloted])))
        for m in methods:
            if m not in piloted:
                lams[m] = kappa * lam0[m]
    options = []
    for m in methods:
        f = affordable(world, m, left)
        if f <= 0:
            continue
        options.append(Option(m, f, world.selection_cost(m), world.training_cost(m, f),
                              None if a is None else a * _shape(lams[m], f), lams[m],
                              basis[m] if arms else "prior"))
    if not options:
        return Decision(None, 0.0, "adaptive", budget, pilot_budget, pilot_flops, a, p0, arms,
                        reason="the pilot left nothing to train on", notes=notes)
    key = (lambda o: o.gain) if a is not None else (lambda o: _shape(o.lam, o.fraction))
    options.sort(key=lambda o: (-key(o), o.selection_flops, o.method))

    # -- the choice, guarded against V's noise --------------------------------------------
    best, reason, certainty = options[0], "", None
    last = {arm.method: arm for arm in arms}  # each method's largest-fraction arm
    if not arms:
        reason = (f"no pilot fits this budget ({pilot_share:.0%} share"
                  + (", discrete fractions' slack" if world.fractions is not None else "")
                  + f"): the prior's best at the fraction its price leaves, {best.method}")
    else:
        top = max(last.values(), key=lambda x: x.p)
        fallback = p0_se
        d = last.get(default)
        margin = z * _se_diff(top, d, fallback)
        if d is not None and top.method != default and top.p - d.p <= margin:
            best = next((o for o in options if o.method == default), best)
            reason = (f"the pilot's best, {top.method} ({top.p:.4f} on V), beat the prior's "
                      f"{default} ({d.p:.4f}) by less than {z:g} standard errors: {default} kept")
        elif best.basis != "pilot":
            piloted = [o for o in options if o.basis == "pilot"]
            if piloted and (best.gain or 0) - (piloted[0].gain or 0) <= margin:
                reason = (f"{best.method} (unpiloted, prior rate) is predicted within the "
                          f"noise of {piloted[0].method}: the piloted one kept")
                best = piloted[0]
        if not reason:
            reason = (f"{best.method} has the best predicted gain at {best.fraction:.1%}"
                      + (f" ({best.basis})" if best.basis else ""))
        others = [x for x in last.values() if x.method != best.method]
        mine = last.get(best.method)
        if mine is not None and others:
            runner = max(others, key=lambda x: x.p)
            s = _se_diff(mine, runner, fallback)
            certainty = _phi((mine.p - runner.p) / s) if s > 0 else None
    if best.fraction >= 1.0 and any(o.fraction >= 1.0 for o in options):
        full = min((o for o in options if o.fraction >= 1.0), key=lambda o: o.selection_flops)
        if full.method != best.method:
            reason += f"; the budget covers the whole pool, so {full.method} (cheapest) trains it"
            best = full
    return Decision(best.method, best.fraction, "adaptive", budget, pilot_budget, pilot_flops,
                    a, p0, arms, options, reason, certainty, notes)


def _pilot_fraction(world: World, methods: Sequence[str], price: dict[str, float],
                    pilot_budget: float) -> float | None:
    """The first round's fraction for these arms: the smallest allowed one in a discrete
    world; else what lets every arm and a second round of the better half fit, or else one
    round (at most 5%, at least 0.5%)."""
    if pilot_budget <= 0:
        return None
    if world.fractions is not None:
        return min(world.fractions)
    n, half = len(methods), math.ceil(len(methods) / 2)
    sel = sum(price[m] for m in methods)
    v, c = world.eval_cost(), world.c_full
    f = (pilot_budget - sel - (n + half) * v) / ((n + 2 * half) * c)  # two rounds
    if f < 0.005:
        f = (pilot_budget - sel - n * v) / (n * c)  # one round
    f = min(f, 0.05)
    return f if f >= 0.005 else None


def _next_fraction(world: World, f: float) -> float | None:
    if world.fractions is None:
        return min(1.0, 2 * f)
    up = [x for x in world.fractions if x > f]
    return min(up) if up else None


def _halving(world: World, methods: list[str], f: float, stop_at: float) -> list[Arm]:
    """Successive halving: every arm at `f`, then the better half at the next fraction, while
    a round fits before `stop_at` (in world.spent)."""
    arms, alive = [], list(methods)
    while alive and f is not None:
        cost = sum(world.selection_cost(m) + world.training_cost(m, f) + world.eval_cost()
                   for m in alive)
        if world.spent + cost > stop_at:
            break
        got = [world.trial(m, f) for m in alive]
        arms += got
        if len(alive) == 1:
            break
        got.sort(key=lambda x: -x.p)
        alive = [x.method for x in got[: math.ceil(len(got) / 2)]]
        f = _next_fraction(world, f)
    return arms


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def planned(world: World, budget: float, options: list[tuple[str, float]]) -> Decision:
    """Execute a plan's ranked (method, fraction) options: the first affordable one, at the
    largest fraction that fits what is left (the plan is `ccds plan`'s, from its prior or
    fits)."""
    left = budget - world.spent
    for m, f in options:
        g = affordable(world, m, left)
        f = min(f, g) if world.fractions is None else max(
            [x for x in world.fractions if x <= f + 1e-12 and x <= g], default=0.0)
        if f > 0:
            return Decision(m, f, "plan", budget, 0.0, 0.0, None,
                            reason=f"the plan's pick, {m}, at {f:.1%}")
    return Decision(None, 0.0, "plan", budget, 0.0, 0.0, None,
                    reason="no planned option trains on anything within the budget")
