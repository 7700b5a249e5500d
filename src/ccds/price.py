"""Pricing: FLOPs in hours and hours in FLOPs, in one place for every command that prices
compute (`ccds plan`, `ccds cost`), so they agree.

A `Rate` is the FLOP/s one GPU pass of each kind (score, less, train) runs at: a device's
dense bf16 peak times an MFU (given, measured by benchmarks/gpu.py, or assumed), or a
throughput measured on this machine. A budget in hours becomes FLOPs at the training pass's
rate (the planner's budgets pay mostly for training); any FLOPs become hours at their own
pass's rate. `ccds.flops` (which loads torch) is imported only where a GPU is priced, so a
plan in FLOPs starts fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, get_args

from .errors import CcdsError

if TYPE_CHECKING:
    from .data.types import Example, Target
    from .flops import Device, GpuStage

Unit = Literal["flops", "gpu-hours", "hours"]
UNITS: tuple[Unit, ...] = get_args(Unit)
_UNIT_WORDS: dict[Unit, str] = {"flops": "FLOPs", "gpu-hours": "GPU-hours", "hours": "hours"}
_ADD_DEVICE = "add --device h100, h200 or a100"


@dataclass(frozen=True)
class Rate:
    """FLOP/s of each GPU pass kind, and how it was found: `source` is a phrase that follows
    a quantity ("on h100 at MFU 0.4 (assumed)", "measured on this machine by the pilot").
    `device` is set for a GPU's datasheet rate: only then are hours GPU-hours."""

    per_stage: dict[GpuStage, float]
    source: str
    device: Device | None = None

    def __post_init__(self):
        from .flops import GpuStage

        stages = get_args(GpuStage)
        if not self.per_stage:
            raise CcdsError("a rate needs the FLOP/s of at least one pass", self.source)
        for stage, flops_s in self.per_stage.items():
            if stage not in stages:
                raise CcdsError(f"unknown GPU pass {stage!r}", self.source,
                                f"use {', '.join(stages)}")
            if not (math.isfinite(flops_s) and flops_s > 0):
                raise CcdsError(f"{stage} runs at {flops_s} FLOP/s: must be positive and "
                                "finite", self.source)

    @classmethod
    def gpu(cls, device: Device, mfu: float | None = None,
            results_path: Path | str | None = None, *, n_params: float | str) -> Rate:
        """`device`'s dense bf16 peak times the MFU of `flops.gpu_mfu`: `mfu` if given, else
        what benchmarks/gpu.py measured (`results_path`, else this checkout's) on the model
        nearest `n_params` (a count, or a model whose total count its config gives), else the
        default. Raises CcdsError for an unknown device or an MFU outside (0, 1]."""
        from .flops import DEVICE_PEAK_FLOPS, gpu_mfu

        if device not in DEVICE_PEAK_FLOPS:
            raise CcdsError(f"unknown device {device!r}", None,
                            f"use {', '.join(DEVICE_PEAK_FLOPS)}")
        if isinstance(n_params, str):
            from .models import counts_without_weights

            n_params = counts_without_weights(n_params)["total"]
        per_mfu, said = gpu_mfu(mfu, results_path, float(n_params))
        return cls({s: DEVICE_PEAK_FLOPS[device] * m for s, m in per_mfu.items()},
                   f"on {device} at MFU {said}", device)

    @classmethod
    def measured(cls, per_stage: dict[GpuStage, float], source: str) -> Rate:
        """A throughput measured on this machine (what wall-clock hours are priced at)."""
        return cls(dict(per_stage), source)

    @property
    def hours_unit(self) -> str:
        """What `hours_of` counts: hours of one GPU at its datasheet rate, else of this
        machine's wall clock."""
        return "GPU-hours" if self.device is not None else "hours"


def gpu_rate(device: Device | None, mfu: float | None = None,
             results_path: Path | str | None = None, *, n_params: float | str) -> Rate | None:
    """`Rate.gpu`, or None without a device (an MFU or a results file without one is an
    error: they price GPU-hours)."""
    _need_device(device, mfu, results_path)
    return None if device is None else Rate.gpu(device, mfu, results_path, n_params=n_params)


def budget_flops(value: float, unit: Unit, rate: Rate | None) -> float:
    """FLOPs of a budget of `value` `unit`s; hours are priced at the training pass's rate.
    gpu-hours need a GPU's rate, hours a GPU's or a measured one."""
    _check_budget(value, unit, gpu=rate is not None and rate.device is not None,
                  rated=rate is not None)
    return value if unit == "flops" else value * 3600 * _flops_s(rate, "train")


def check_budget(value: float, unit: Unit, device: Device | None, mfu: float | None = None,
                 *, measured: bool = False) -> None:
    """The checks of `gpu_rate` and `budget_flops` that need no rate, for a caller that
    finds the rate only after work (a plan's pilot, a measurement): bad input fails first.
    `measured`: a throughput will be measured."""
    _need_device(device, mfu, None)
    if mfu is not None:
        from .flops import check_mfu

        check_mfu(mfu)
    _check_budget(value, unit, gpu=device is not None, rated=device is not None or measured)


def _need_device(device: Device | None, mfu: float | None,
                 results_path: Path | str | None) -> None:
    given = [f for f, v in (("--mfu", mfu), ("--gpu-results", results_path)) if v is not None]
    if device is None and given:
        raise CcdsError(f"{' and '.join(given)} price{'s' if len(given) == 1 else ''} "
                        "GPU-hours, which need --device", None, _ADD_DEVICE)


def _check_budget(value: float, unit: Unit, *, gpu: bool, rated: bool) -> None:
    if unit not in UNITS:
        raise CcdsError(f"unknown budget unit {unit!r}", None, f"use {', '.join(UNITS)}")
    if not (math.isfinite(value) and value > 0):
        raise CcdsError(f"budget {value:g} {_UNIT_WORDS[unit]} must be positive and finite",
                        None, "e.g. --budget 1e18 (FLOPs) or --budget 64 --unit gpu-hours")
    if unit == "gpu-hours" and not gpu:
        raise CcdsError("--unit gpu-hours needs --device", None, _ADD_DEVICE)
    if unit == "hours" and not rated:
        raise CcdsError("--unit hours needs --device or a measured throughput", None,
                        f"{_ADD_DEVICE} (hours of that GPU), or give the budget in FLOPs")


def hours_of(flops: float, rate: Rate, stage: GpuStage = "train") -> float:
    """Hours that `flops` of `stage` passes take at `rate` (`budget_flops`'s inverse)."""
    return flops / _flops_s(rate, stage) / 3600


def describe_budget(value: float, unit: Unit, rate: Rate | None) -> str:
    """The budget as given and in the other unit, with where the rate comes from:
    "64 GPU-hours = 1.14e+20 FLOPs on h100 at MFU 0.5 (given)"."""
    flops = budget_flops(value, unit, rate)
    given = f"{value:.3g} {_UNIT_WORDS[unit]}"
    if rate is None:
        return given
    if unit == "flops":
        return f"{given} = {hours_of(flops, rate):.3g} {rate.hours_unit} {rate.source}"
    return f"{given} = {flops:.3g} FLOPs {rate.source}"



def _flops_s(rate: Rate, stage: GpuStage) -> float:
    if stage not in rate.per_stage:
        raise CcdsError(f"no FLOP/s for {stage} passes", rate.source,
                        f"measure one, or price with {', '.join(rate.per_stage)}")
    return rate.per_stage[stage]


class CostRow(NamedTuple):
    """One stage of `ccds cost`: FLOPs (ccds convention; None when the method needs a
    target and none was given), the paper's 6·N·T (training only) and hours at the rate."""

    stage: str
    flops: float | None
    paper: float | None
    hours: float | None


@dataclass(frozen=True)
class CostTable:
    """`ccds cost`'s table as data: its title, the hours column's header (None without a
    rate) and its rows."""

    title: str
    hours_column: str | None
    rows: list[CostRow]


def cost_rows(examples: Sequence[Example], target: Target | None, methods: Sequence[str] | None,
              train_model: str, fractions: Sequence[float], epochs: float,
              rate: Rate | None = None) -> CostTable:
    """Price training on each fraction of `examples` and each selection method (all
    registered ones if `methods` is None) before anything runs; with a rate, also in hours
    (selection at its scoring pass's rate, LESS at its gradient pass's)."""
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise CcdsError(f"--fractions {','.join(f'{f:g}' for f in fractions)!r} must be "
                        "numbers in (0, 1]", None, "e.g. --fractions 0.05,0.1,1")
    if not 0 < epochs < math.inf:
        raise CcdsError(f"--epochs {epochs} must be positive")
    from .score import REGISTRY
    from .score.base import selection_costs
    from .train import TrainConfig, training_cost

    full = training_cost(examples, TrainConfig(model=train_model, epochs=epochs))
    priced: list[tuple[str, float | None, float | None, GpuStage]] = [
        (f"train on {f:.1%}", full.analytic * f, full.paper * f, "train") for f in fractions]
    for name, c in selection_costs(methods or sorted(REGISTRY), examples, target).items():
        priced.append((f"select: {name}", c, None, "less" if name == "less" else "score"))
    title = (f"FLOPs for {len(examples):,} examples ({full.tokens:,} tokens); "
             f"training {train_model} with LoRA, {epochs:g} epoch(s)")
    column = None
    if rate is not None:
        title += f"; {rate.hours_unit} {rate.source}"
        one = set(rate.per_stage.values())
        if rate.device is not None:
            from .flops import DEVICE_PEAK_FLOPS

            peak = DEVICE_PEAK_FLOPS[rate.device]
            title += f", of its {peak / 1e12:.0f} TFLOP/s dense bf16 peak"
            mfu = f"{one.pop() / peak:g}" if len(one) == 1 else "measured"
            column = f"GPU-hours ({rate.device}, MFU {mfu})"
        else:
            column = "hours (measured)"
    rows = [CostRow(label, flops, paper,
                    None if rate is None or flops is None else hours_of(flops, rate, stage))
            for label, flops, paper, stage in priced]
    return CostTable(title, column, rows)
