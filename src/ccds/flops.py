"""The FLOPs ledger (spec §2): analytic counts, measured counts, wall time and peak memory.

Two analytic conventions are kept side by side:
- "ccds": what ccds actually computes, on real (unpadded) tokens — 2·N·T forward for the
  non-embedding body (N = `active`: a mixture-of-experts runs the router and top-k experts),
  the LM head only where logits are needed, LoRA adapters, and the attention score/value
  matmuls (4·n_layer·d_attn·L² per sequence of length L, d_attn = n_heads·head_dim, the
  full L×L product as the eager and SDPA kernels compute it, on sliding-window layers too:
  they mask the product, they do not skip it). Backward of a LoRA step adds the input
  gradients (2·N·T) and the adapters' weight gradients; frozen weights get none. Decoding
  with a KV cache is where a window saves work: transformers keeps only the last `window`
  keys of those layers, so a step there attends to min(context, window) keys.
- "paper": the compute-constrained data selection paper's charge, N = non-embedding
  parameters (active ones for a mixture-of-experts): 2·N·T to score, 6·N·T to train (LoRA
  or not), no attention term.
Measured counts come from torch's FLOP formulas (those of FlopCounterMode) applied to every op
that actually ran in a stage's first `SAMPLED_BATCHES` batches, scaled to the stage by the
analytic count: a Python hook on every op costs throughput wherever matmuls are fast (a
fifth of a LoRA step on an AMX CPU: benchmarks/speed_lm.py) and keeps CUDA graphs from
being captured. The stage's detail says what was counted; `Sample(None)` counts everything.
torch has no formula for the fused CPU attention kernel nor for the grouped matmul
transformers runs a mixture-of-experts with (both count 0), so ccds registers them below.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode
from torch.utils.flop_counter import flop_registry

Kind = Literal["selection", "training", "evaluation"]


def _register_cpu_attention() -> None:
    """Give FlopCounterMode the fused CPU SDPA kernels (same formulas as the GPU ones)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    pairs = [("_scaled_dot_product_flash_attention_for_cpu", fc.sdpa_flop),
             ("_scaled_dot_product_flash_attention_for_cpu_backward", fc.sdpa_backward_flop)]
    for op_name, formula in pairs:
        op = getattr(aten, op_name, None)
        if op is not None and op not in fc.flop_registry:
            fc.flop_registry[op] = formula


_register_cpu_attention()


def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """aten._grouped_mm: each row (or column) meets only its own group's matrix, so a ragged
    product costs what one dense product of the same rows would."""
    if len(a_shape) == 3 and len(b_shape) == 2:  # [G, M, K] @ [K, ΣN]
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * math.prod(a_shape) * b_shape[-1]  # [ΣM, K] @ [G, K, N]; [K, ΣM] @ [ΣM, N]; batched


def _register_grouped_mm() -> None:
    """Count the expert matmuls of transformers' default ("grouped_mm") MoE forward."""
    from torch.utils import flop_counter as fc

    op = getattr(torch.ops.aten, "_grouped_mm", None)
    if op is not None and op not in fc.flop_registry:
        fc.flop_registry[op] = fc.shape_wrapper(_grouped_mm_flop)


_register_grouped_mm()


SAMPLED_BATCHES = 8  # batches a stage counts op by op (Meter), then charges at their ratio
_METERS: ContextVar[tuple[Meter, ...]] = ContextVar("ccds_meters", default=())  # innermost last


class FlopCounter(TorchDispatchMode):
    """Counts the FLOPs of every op torch's FlopCounterMode knows, with the same formulas.

    FlopCounterMode also attributes FLOPs to modules through hooks on every module call,
    which doubles the wall time of small models; ccds only needs the total.
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


@dataclass
class Sample:
    """The batches counted op by op (the first `size`; None: every one) and what they gave;
    the batches after them are charged at the sample's ratio of counted to analytic FLOPs.
    One Sample may span meters (a Ray actor's shards), so the count does not restart."""

    size: int | None
    batches: int = 0
    flops: float = 0.0  # what the counters saw on them
    analytic: float = 0.0  # their analytic FLOPs

    @property
    def done(self) -> bool:
        return self.size is not None and self.batches >= self.size

    @property
    def ratio(self) -> float:
        return self.flops / self.analytic if self.analytic else 1.0


def sampling(sample: int | Sample | None) -> Sample:
    """The Sample a meter keeps: the one given, or a new one of `sample` batches (None: the
    first SAMPLED_BATCHES)."""
    if isinstance(sample, Sample):
        return sample
    return Sample(SAMPLED_BATCHES if sample is None else sample)


# -- analytic formulas --------------------------------------------------------------------

@dataclass
class Work:
    """Token statistics of the sequences a model processed (real tokens, not padding)."""

    sequences: int = 0
    tokens: int = 0  # Σ L
    tokens_sq: int = 0  # Σ L², for attention
    head_tokens: int = 0  # positions whose logits were needed
    padded_tokens: int = 0  # B·L_max summed over batches: what actually ran

    def add(self, lengths, head_tokens: int, padded: int) -> None:
        ls = [int(x) for x in lengths]
        self.sequences += len(ls)
        self.tokens += sum(ls)
        self.tokens_sq += sum(x * x for x in ls)
        self.head_tokens += head_tokens
        self.padded_tokens += padded


def encoded_work(enc, suffix: bool = False) -> Work:
    """The Work of one pass over encoded sequences, as a Meter would record it."""
    heads = int(enc.response_lengths.sum()) - (0 if suffix else int(enc.n_suffix.sum()))
    w = Work()
    w.add(enc.lengths, heads, enc.n_tokens)
    return w


def attention_flops(p: dict[str, int], w: Work) -> float:
    """Score and value matmuls of one pass: the full L×L product on every layer."""
    return 4 * p["n_layer"] * p["d_attn"] * w.tokens_sq


def forward_flops(p: dict[str, int], w: Work) -> float:
    """ccds convention, one forward pass (LoRA adapters included when present)."""
    return (2 * (p["active"] + p["lora"]) * w.tokens + 2 * p["head"] * w.head_tokens
            + attention_flops(p, w))


def lora_step_flops(p: dict[str, int], w: Work) -> float:
    """ccds convention, forward + backward of a LoRA step: ≈ 4·N·T + 6·N_lora·T + attention."""
    return (4 * p["active"] * w.tokens + 4 * p["head"] * w.head_tokens
            + 6 * p["lora"] * w.tokens + 3 * attention_flops(p, w))


def full_step_flops(p: dict[str, int], w: Work) -> float:
    """ccds convention, forward + backward with every weight trained: ≈ 6·N·T + attention."""
    return 6 * p["active"] * w.tokens + 6 * p["head"] * w.head_tokens + 3 * attention_flops(p, w)


def _keys(c: int, window: int) -> int:
    """Σ_{i=1..c} min(i, window): keys seen by decoding steps at contexts 1..c."""
    if not window or c <= window:
        return c * (c + 1) // 2
    return window * (window + 1) // 2 + (c - window) * window


def generation_flops(p: dict[str, int], prompt_lens, new_lens) -> float:
    """ccds convention, KV-cached greedy decoding: a prefill with logits at the last
    position (the full product on every layer), then one token at a time attending to the
    cache, which a sliding-window layer holds at most `window` keys of."""
    n = p["active"] + p["lora"]
    w, n_win = p["window"], p["n_window_layers"]
    per_key = 4 * p["d_attn"]
    total = 0.0
    for lp, g in zip(prompt_lens, new_lens, strict=True):
        lp, g = int(lp), int(g)
        total += 2 * n * lp + 2 * p["head"] + p["n_layer"] * per_key * lp * lp  # prefill
        steps = max(g - 1, 0)  # the first new token came out of the prefill; step j sees lp+j
        keys = ((p["n_layer"] - n_win) * (_keys(lp + steps, 0) - _keys(lp, 0))
                + n_win * (_keys(lp + steps, w) - _keys(lp, w)))
        total += steps * (2 * n + 2 * p["head"]) + per_key * keys
    return total


def paper_flops(p: dict[str, int], tokens: int, training: bool) -> float:
    """The paper's charge: 6·N·T to train, 2·N·T for a forward pass (N non-embedding; the
    active parameters of a mixture-of-experts)."""
    return (6 if training else 2) * p["active"] * tokens


# -- the ledger ---------------------------------------------------------------------------

@dataclass
class Stage:
    """One accounted piece of work."""

    name: str
    kind: Kind
    analytic_flops: float = 0.0  # ccds convention
    paper_flops: float = 0.0  # paper convention
    measured_flops: float | None = None
    tokens: int = 0
    padded_tokens: int = 0
    wall_s: float = 0.0
    peak_mem_mb: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Ledger:
    stages: list[Stage] = field(default_factory=list)

    def add(self, stage: Stage) -> Stage:
        self.stages.append(stage)
        return stage

    def total(self, kind: Kind | None = None, field_: str = "analytic_flops") -> float:
        return float(sum(getattr(s, field_) or 0.0 for s in self.stages
                         if kind is None or s.kind == kind))

    def to_dict(self) -> dict[str, Any]:
        kinds: list[Kind] = ["selection", "training", "evaluation"]
        return {"conventions": {"analytic_flops": "ccds (see ccds.flops)",
                                "paper_flops": "2·N·T forward, 6·N·T training, N non-embedding"},
                "stages": [s.to_dict() for s in self.stages],
                "totals": {k: {"analytic_flops": self.total(k),
                               "paper_flops": self.total(k, "paper_flops"),
                               "measured_flops": self.total(k, "measured_flops"),
                               "wall_s": self.total(k, "wall_s")} for k in kinds}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ledger:
        return cls([Stage(**s) for s in d.get("stages", [])])


class Meter:
    """Context manager that fills a Stage: time, peak memory, measured and analytic FLOPs.

    Code inside reports what it ran through `forward(batch)` / `lora_step(batch)` /
    `add(analytic, paper)`; the analytic count is built from those reports while
    FlopCounterMode independently counts every matmul that actually executed.

    A meter inside a counting one counts its own ops, even with `measure=False` (its stage
    then shows no measured total), and hands its total up; meanwhile the outer counter is
    off the dispatch stack, so no op goes through two Python hooks and, once the inner
    sample is over, none through any. Without a `device` of its own it runs on the outer's.
    """

    def __init__(self, name: str, kind: Kind, params: dict[str, int] | None = None,
                 measure: bool = True, device: torch.device | None = None,
                 sample: int | Sample | None = None):
        self.stage = Stage(name, kind)
        self.params = params
        self.measure = measure
        self._device_given = device is not None
        self.device = device or torch.device("cpu")
        # FlopCounter's Python hook on every op costs throughput and keeps graphs from
        # being captured: count the first batches, then let go of every op
        self._sample = sampling(sample)
        self.work = Work()
        self._counted = 0.0
        self._all = [0.0, 0]  # reported batches: analytic FLOPs, number
        self._own = [0.0, 0.0, 0]  # counted here: FLOPs seen, their batches' analytic, batches
        self._counts = measure  # counts ops (also when nested in a counting meter)
        self._counter: FlopCounter | None = None  # while this meter's sample lasts
        self._on = False  # the counter is on the dispatch stack
        self._outer: Meter | None = None  # the counting meter this one hands its total to
        self._resume = False  # put the outer's counter back on exit
        self.remote_measured = 0.0
        self._stack = contextlib.ExitStack()

    @property
    def sample(self) -> int | None:
        return self._sample.size

    def __enter__(self) -> Meter:
        stack = _METERS.get()
        around = stack[-1] if stack else None
        if around is not None and not self._device_given:
            self.device = around.device
        self._outer = around if around is not None and around._counts else None
        self._counts = self.measure or self._outer is not None
        self._token = _METERS.set((*stack, self))
        self._resume = self._outer is not None and self._outer._on and self._outer._pop()
        if self._counts and not self._sample.done:
            self._counter = FlopCounter()
            self._counter.__enter__()
            self._on = True
        outer_mem = around._mem if around is not None and around.device == self.device else None
        self._mem = self._stack.enter_context(_PeakMemory(self.device, outer=outer_mem))
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.stage.wall_s = time.perf_counter() - self._t0
        self._stack.close()
        if self._counter is not None:
            if self._on:
                self._counter.__exit__(*exc)
                self._on = False
            self._finish()
        measured = 0.0
        if self._counts:  # uncounted batches at the sample's ratio (none on the CPU)
            (a_all, n_all), (seen, a_seen, n_seen) = self._all, self._own
            measured = seen + (a_all - a_seen) * self._sample.ratio + self._counted
            if self.measure and n_seen < n_all:
                self.stage.detail["measured_on"] = {
                    "batches": n_seen, "of": n_all, "counted_flops": seen,
                    "analytic_flops": a_seen}
        if self.measure:
            self.stage.measured_flops = measured
        self.stage.peak_mem_mb = self._mem.peak_mb
        self.stage.tokens = self.work.tokens
        self.stage.padded_tokens = self.work.padded_tokens
        _METERS.reset(self._token)
        if self._outer is not None:
            if self._resume and self._outer._counter is not None:
                self._outer._counter.__enter__()
                self._outer._on = True
            # without measure, remote work is the caller's to hand up (proxy.trajectories)
            self._outer._counted += measured - (0.0 if self.measure else self.remote_measured)

    def _pop(self) -> bool:
        """Take the counter off the dispatch stack; False if another mode sits on top of it
        (it then stays and counts on)."""
        if _current_dispatch_mode() is not self._counter:
            return False
        self._counter.__exit__(None, None, None)
        self._on = False
        return True

    def _finish(self) -> None:
        """The sample is over (or the meter ends): keep what the counter saw."""
        self._own[0] += self._counter.total
        self._sample.flops += self._counter.total
        self._counter = None

    def _batch(self, analytic: float) -> None:
        """A reported batch's analytic FLOPs; the counter stops once the sample is done."""
        self._all[0] += analytic
        self._all[1] += 1
        if self._counter is None:
            return
        self._own[1] += analytic
        self._own[2] += 1
        self._sample.analytic += analytic
        self._sample.batches += 1
        if self._sample.done and (not self._on or self._pop()):
            self._finish()

    def _record(self, batch, suffix: bool, head: bool = True, packed: bool = False) -> Work:
        lengths = batch.lengths.tolist()  # the host's copies: no wait on the device
        heads = int(batch.response.sum()) - (0 if suffix else int(batch.suffix.sum()))
        heads *= head
        w = Work()
        w.add(lengths, heads, batch.real_tokens if packed else int(batch.attention_mask.numel()))
        self.work.add(lengths, w.head_tokens, w.padded_tokens)
        return w

    def forward(self, batch, suffix: bool = False, head: bool = True,
                packed: bool = False) -> None:
        """A no-grad pass scoring the response (its end-of-turn suffix too if `suffix`);
        `head=False`: hidden states only, no LM head; `packed`: run on the real tokens only
        (`decoder.states`), so none of the padding ran."""
        assert self.params is not None
        w = self._record(batch, suffix, head, packed)
        flops = forward_flops(self.params, w)
        self.stage.analytic_flops += flops
        self.stage.paper_flops += paper_flops(self.params, w.tokens, training=False)
        self._batch(flops)

    def lora_step(self, batch, full: bool = False, ran: bool = True) -> None:
        """Forward and backward of a training step (loss on response and suffix): LoRA, or
        every weight trained if `full`. `ran=False`: done before a restart, charged but not
        run now, so not part of what is measured."""
        assert self.params is not None
        w = self._record(batch, suffix=True)
        flops = (full_step_flops if full else lora_step_flops)(self.params, w)
        self.stage.analytic_flops += flops
        self.stage.paper_flops += paper_flops(self.params, w.tokens, training=True)
        if ran:
            self._batch(flops)

    def generation(self, prompt_lens, new_lens) -> None:
        assert self.params is not None
        flops = generation_flops(self.params, prompt_lens, new_lens)
        self.stage.analytic_flops += flops
        self._batch(flops)
        tokens = int(sum(prompt_lens)) + int(sum(new_lens))
        self.stage.paper_flops += paper_flops(self.params, tokens, training=False)
        self.work.tokens += tokens
        self.work.sequences += len(prompt_lens)

    def add(self, analytic: float, paper: float | None = None, *, counted: bool = False,
            batch: bool = False) -> None:
        """`counted`: work done outside torch (e.g. scipy sparse products), which
        FlopCounterMode cannot see; its exact count then goes to the measured total too.
        `batch`: the work of one batch of a model (a sentence encoder's), which counts
        towards the sample a GPU meter counts op by op."""
        self.stage.analytic_flops += analytic
        self.stage.paper_flops += analytic if paper is None else paper
        if counted:
            self._counted += analytic
        if batch:
            self._batch(analytic)

    def measured_elsewhere(self, flops: float) -> None:
        """FLOPs another process counted for this stage (a Ray actor's FlopCounterMode)."""
        self._counted += flops
        self.remote_measured += flops

    def merge(self, analytic_flops: float, paper_flops: float, measured_flops: float,
              tokens: float, padded_tokens: float, reused: bool = False) -> None:
        """Work metered elsewhere (a Ray actor). `reused`: done by an earlier run and saved,
        so it is charged but not measured now (as LESS charges its cached features)."""
        self.add(analytic_flops, paper_flops)
        if reused:
            d = self.stage.detail
            d["reused_flops"] = d.get("reused_flops", 0.0) + analytic_flops
        else:
            self.measured_elsewhere(measured_flops)
        self.work.tokens += int(tokens)
        self.work.padded_tokens += int(padded_tokens)


class _PeakMemory:
    """Peak resident memory during a block: CUDA allocator peak, or RSS sampled on the CPU.
    CUDA has one peak counter per device, which a nested block resets: it hands the peak
    so far to the block around it (`outer`), and its own when it ends."""

    def __init__(self, device: torch.device, interval: float = 0.02,
                 outer: _PeakMemory | None = None):
        self.device, self.interval, self.peak_mb = device, interval, 0.0
        self.outer, self.floor = outer, 0  # floor: bytes seen before a nested block reset

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            if self.outer is not None:
                self.outer.floor = max(self.outer.floor,
                                       torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._stop = threading.Event()
        self._peak = _rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            peak = max(self.floor, torch.cuda.max_memory_allocated(self.device))
            if self.outer is not None:
                self.outer.floor = max(self.outer.floor, peak)
            self.peak_mb = peak / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self._peak, _rss_bytes()) / 2**20


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- GPU-hours ----------------------------------------------------------------------------

Device = Literal["h100", "h200", "a100"]
GpuStage = Literal["score", "less", "train"]

# Dense bf16 tensor-core peaks, no sparsity, from NVIDIA's datasheets (H100 SXM, H200 SXM,
# A100 SXM 80GB; the datasheets' larger figures assume 2:4 sparsity; PCIe cards peak lower).
DEVICE_PEAK_FLOPS: dict[Device, float] = {"h100": 989e12, "h200": 989e12, "a100": 312e12}
DEFAULT_MFU = 0.40  # assumed when nothing was measured


def gpu_hours(flops: float, device: Device, mfu: float) -> float:
    """Hours of one GPU that `flops` take at `mfu` of the device's dense bf16 peak."""
    return flops / (DEVICE_PEAK_FLOPS[device] * mfu) / 3600


def device_of(name: str) -> Device | None:
    """The table's key for a CUDA device name ("NVIDIA H100 80GB HBM3" -> "h100")."""
    low = name.lower()
    return next((d for d in DEVICE_PEAK_FLOPS if d in low), None)


def measured_mfu(results: dict[str, Any], stage: GpuStage, n_params: float) -> float | None:
    """The MFU benchmarks/gpu.py measured for `stage` on the model closest in size to
    `n_params` (log scale): what a pass of that kind reached on real hardware, as a fraction
    of the datasheet peak that `gpu_hours` divides by (of the measured matmul peak for a
    GPU the table lacks). None if that stage was not measured."""
    best: tuple[float, float] | None = None
    for m in results.get("models", {}).values():
        s = m.get("stages", {}).get(stage, {})
        size, mfu = m.get("params_total"), s.get("mfu_datasheet") or s.get("mfu")
        if s.get("status") != "ok" or not mfu or not size:
            continue
        gap = abs(math.log(size / max(n_params, 1.0)))
        if best is None or gap < best[0]:
            best = (gap, float(mfu))
    return None if best is None else best[1]


def mfu_by_stage(mfu: float | None, results: dict[str, Any] | None, n_params: float
                 ) -> tuple[dict[GpuStage, float], str]:
    """The MFU to price each GPU pass at, and where it comes from (said in `ccds cost`'s
    title): `mfu` if given, else what benchmarks/gpu.py measured (`results`) on the model
    nearest in size, else DEFAULT_MFU. A smoke run's figures (a CPU) price nothing."""
    stages: tuple[GpuStage, ...] = ("score", "less", "train")
    if mfu is not None:
        return dict.fromkeys(stages, mfu), f"{mfu:g} (given)"
    if not results or results.get("smoke"):
        return dict.fromkeys(stages, DEFAULT_MFU), f"{DEFAULT_MFU:g} (assumed)"
    got = {s: measured_mfu(results, s, n_params) for s in stages}
    per = {s: DEFAULT_MFU if v is None else v for s, v in got.items()}
    said = ", ".join(f"{s} {per[s]:.2f}" + (" assumed" if got[s] is None else "")
                     for s in stages)
    return per, f"measured on {results.get('device', 'a GPU')} by benchmarks/gpu.py: {said}"


GPU_RESULTS = "benchmarks/results/gpu.json"  # where benchmarks/gpu.py writes, in a checkout


def check_mfu(mfu: float | None) -> None:
    """An MFU is a fraction of the peak: in (0, 1] (None: not given)."""
    from .errors import CcdsError

    if mfu is not None and not 0 < mfu <= 1:
        raise CcdsError(f"--mfu {mfu} must be in (0, 1]", None, "e.g. --mfu 0.4")


def gpu_mfu(mfu: float | None, results_path: os.PathLike | str | None, n_params: float
            ) -> tuple[dict[GpuStage, float], str]:
    """`mfu_by_stage` from benchmarks/gpu.py's results file: `results_path`, else this
    checkout's GPU_RESULTS if there (ccds installed from a wheel has none: the default MFU)."""
    from pathlib import Path

    from .errors import CcdsError
    from .io import read_json

    check_mfu(mfu)
    if results_path is not None and not Path(results_path).is_file():
        raise CcdsError("no such file", str(results_path), "run benchmarks/gpu.py on a GPU, "
                        "or leave --gpu-results out")
    path = Path(results_path or Path(__file__).resolve().parents[2] / GPU_RESULTS)
    results = read_json(path) if mfu is None and path.is_file() else None
    return mfu_by_stage(mfu, results, n_params)
