"""LoRA fine-tuning on a subset, with FLOPs accounting and LESS/S2L-ready checkpoints.

A deliberately plain loop: length-grouped micro-batches (shuffled in order), gradient
accumulation with the loss averaged over every response token of the optimizer step,
AdamW, warmup then linear/cosine decay, autocast where the hardware is fast at it.
Checkpoints hold the adapter and the AdamW moments in safetensors, because LESS builds its
gradient features from exactly those moments; with the RNG state and the step they also let
a killed run (`out` given) resume from its last checkpoint and end bit-identical to an
uninterrupted one. Multi-GPU: wrap the same loop with
`accelerate launch` (see README); each optimizer step's sequences are then split across the
processes (`split_step`), so N GPUs do 1/N of the step each. fp16 autocast (GPUs without
bf16) trains with a GradScaler: fp16 gradients of small losses would otherwise underflow.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .data.types import Example
from .errors import CcdsError
from .flops import Ledger, Meter, Stage
from .io import atomic_dir, bar, stable_hash, write_json
from .lm import own_kernels, response_nll
from .models import (
    Runtime,
    add_lora,
    batch_budget,
    counts_without_weights,
    free_bytes,
    load_causal_lm,
    param_counts,
    pick_runtime,
    save_adapter,
)
from .tokenize import Encoded, collate, encode, length_batches, ordered_batches


class TrainConfig(BaseModel):
    """LoRA fine-tuning settings. Defaults suit SmolLM2-135M on a few thousand examples."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error

    model: str = "smollm2-135m"
    lora: bool = Field(True, description="LoRA adapters; False trains every weight")
    lora_r: int = Field(16, ge=1)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(
        0.0, ge=0, lt=1, description="0: dropout makes a masked copy of every LoRA "
        "module's input each training step; for 1-3 epochs over a selected subset it buys "
        "little")
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    epochs: float = Field(1.0, gt=0)
    max_tokens: int | None = Field(None, gt=0, description="stop after this many tokens")
    max_flops: float | None = Field(
        None, gt=0, description="a hard cap on training FLOPs (ccds convention, padded "
        "batches priced as they run): the run stops before the first step that would pass "
        "it, the schedule planned for the steps that fit")
    batch_tokens: int = Field(4096, ge=16, description="token budget of one micro-batch")
    micro_tokens: int | None = Field(
        None, ge=1, description="the most padded tokens one forward/backward holds: a bigger "
        "micro-batch runs as row chunks whose gradients add up to the same update. Default: "
        "no split on a CPU; on a GPU what free memory holds for the model, its LoRA rank and "
        "gradient checkpointing")
    max_batch: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float | None = 1.0
    max_len: int = Field(512, ge=8)
    order: Literal["shuffle", "given"] = Field(
        "shuffle", description="'given': keep the examples' order (a curriculum)")
    checkpoints: int = Field(0, ge=0, description="evenly spaced checkpoints to save")
    save_optimizer: bool = Field(True, description="AdamW moments in checkpoints (LESS)")
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    measure_flops: bool = True
    gradient_checkpointing: bool = Field(
        False, description="recompute each layer's activations in the backward pass: one "
        "more forward of the layers per micro-batch, for the activations of about one layer "
        "instead of all (long sequences, big models)")
    attn: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="attention kernel training runs with (flash_attention_2 needs "
        "the flash-attn package, a CUDA GPU and bf16/fp16)")

    # Settings that change how a run executes, not what it trains (at most the last bits):
    # run-store keys and resume keys leave them out, so flipping one reuses finished work.
    EXECUTION: ClassVar[frozenset[str]] = frozenset({"gradient_checkpointing", "attn",
                                                     "micro_tokens"})
    # Settings added after runs were stored: left out of keys while unset, so those runs
    # keep their keys (the committed study resumes).
    LATER: ClassVar[frozenset[str]] = frozenset({"max_flops"})

    def identity(self, *also: str) -> dict:
        """What determines the trained weights: the keys of runs, resumes and reuse."""
        unset = {k for k in self.LATER if getattr(self, k) is None}
        return self.model_dump(exclude={"device", *self.EXECUTION, *unset, *also})


@dataclass
class TrainResult:
    model: torch.nn.Module
    tokenizer: object
    steps: int
    tokens: int
    losses: list[float]
    lrs: list[float]
    checkpoints: list[Path] = field(default_factory=list)
    encoding: dict = field(default_factory=dict)
    stage: Stage | None = None


def step_flops(enc: Encoded, group: list[np.ndarray], counts: dict[str, int],
               full: bool = False, padded: bool = False) -> float:
    """Analytic FLOPs of one optimizer step, as the Meter will charge it (the loss covers the
    response and its end-of-turn suffix); known before the step runs. `padded`: an upper
    bound on what the matmuls actually run (what a measured count sees, and what a FLOPs cap
    holds): every row as long as its micro-batch's longest, and attention's backward
    recomputing the scores (fused kernels such as CPU SDPA and flash attention do), half a
    forward attention more."""
    from .flops import Work, attention_flops, full_step_flops, lora_step_flops

    w = Work()
    resp = enc.response_lengths
    for ix in group:
        lengths = enc.lengths[ix]
        width = int(lengths.max())
        w.add([width] * len(ix) if padded else lengths, int(resp[ix].sum()), len(ix) * width)
    recompute = attention_flops(counts, w) / 2 if padded else 0.0
    return (full_step_flops if full else lora_step_flops)(counts, w) + recompute


def plan_steps(enc: Encoded, cfg: TrainConfig, counts: dict[str, int] | None = None
               ) -> list[list[np.ndarray]]:
    """The whole run as optimizer steps, each a list of micro-batch index arrays. With
    `cfg.max_flops` (and the model's `counts` to price steps), the run ends before the first
    step that would pass the cap, padding included (so the charge, which counts real tokens,
    and the measured count both stay under it): planned up front, so the schedule decays
    over what runs."""
    lengths = enc.lengths
    steps: list[list[np.ndarray]] = []
    tokens, flops = 0, 0.0
    if cfg.max_flops is not None and counts is None:
        raise ValueError("max_flops needs the model's parameter counts to price each step")
    for epoch in range(math.ceil(cfg.epochs)):
        batches = (ordered_batches(lengths, cfg.batch_tokens, cfg.max_batch)
                   if cfg.order == "given" else
                   length_batches(lengths, cfg.batch_tokens, cfg.max_batch, cfg.seed + epoch))
        groups = [batches[i:i + cfg.grad_accum] for i in range(0, len(batches), cfg.grad_accum)]
        if epoch + 1 > cfg.epochs:  # fractional last epoch
            groups = groups[: max(1, int(len(groups) * (cfg.epochs - epoch)))]
        for g in groups:
            if cfg.max_tokens is not None and tokens >= cfg.max_tokens:
                return steps
            if cfg.max_flops is not None:
                flops += step_flops(enc, g, counts, full=not cfg.lora, padded=True)
                if flops > cfg.max_flops:
                    return steps
            steps.append(g)
            tokens += int(sum(lengths[b].sum() for b in g))
    return steps


def split_step(group: list[np.ndarray], lengths: np.ndarray, world: int
               ) -> list[list[np.ndarray]]:
    """One optimizer step's micro-batches, per process: every process gets work whenever the
    step has at least `world` sequences.

    Micro-batches are halved (largest first) until there are `world` of them, then dealt
    largest first to the least loaded process (by padded tokens). The step's sequences and
    its loss normaliser are those of one process, and so is the update; a single process
    gets `group` as it is.
    """
    if world == 1:
        return [list(group)]

    def cost(b: np.ndarray) -> int:
        return len(b) * int(lengths[b].max())

    pieces = list(group)
    while len(pieces) < world:
        halvable = [i for i, b in enumerate(pieces) if len(b) > 1]
        if not halvable:
            break
        b = pieces.pop(max(halvable, key=lambda i: cost(pieces[i])))
        b = b[np.argsort(lengths[b], kind="stable")]  # alternate: halves of equal tokens
        pieces += [b[0::2], b[1::2]]
    ranks: list[list[np.ndarray]] = [[] for _ in range(world)]
    load = [0] * world
    for b in sorted(pieces, key=cost, reverse=True):
        r = load.index(min(load))
        ranks[r].append(b)
        load[r] += cost(b)
    return ranks


def fit_memory(batches: list[np.ndarray], lengths: np.ndarray, max_tokens: int | None
               ) -> list[np.ndarray]:
    """Micro-batches cut into row chunks of at most `max_tokens` padded tokens (one row at
    least): the loss is normalised by the step's tokens, so the chunks' gradients sum to
    the micro-batch's."""
    if max_tokens is None:
        return list(batches)
    out = []
    for b in batches:
        rows = max(1, max_tokens // int(lengths[b].max()))
        out += [b[i:i + rows] for i in range(0, len(b), rows)]
    return out


def lr_lambda(cfg: TrainConfig, total: int):
    warm = math.ceil(cfg.warmup_ratio * total)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1 - progress)

    return f


def train(examples: Sequence[Example], cfg: TrainConfig | None = None, *, model=None,
          tokenizer=None, out: str | Path | None = None, ledger: Ledger | None = None,
          runtime: Runtime | None = None, progress: str | None = "train") -> TrainResult:
    """Fine-tune `cfg.model` (or the given model) with LoRA on `examples`.

    Under `accelerate launch` with several processes, each optimizer step's micro-batches
    are split across the processes (`split_step`) and DDP sums their gradients, so the update
    is the one a single process would make (up to summation order).
    """
    cfg = cfg or TrainConfig()
    if not examples:
        raise CcdsError("nothing to train on: the subset is empty", None,
                        "select at least one example")
    rt = runtime or pick_runtime(cfg.device, cfg.dtype)
    _check_attn(cfg.attn, rt)
    acc = _accelerator(rt)
    if acc is not None:
        rt = Runtime(acc.device, rt.autocast)
    if not cfg.lora:
        check_full_fits(cfg, rt, model)
    if model is None:  # frozen weights straight onto the device in their dtype
        model, tokenizer, _ = load_causal_lm(
            cfg.model, attn=cfg.attn, runtime=rt if cfg.lora else Runtime(rt.device, None))
    if cfg.lora and not hasattr(model, "peft_config"):
        model = add_lora(model, cfg)
    if not cfg.lora:  # fp32 masters for every weight, even if placed in bf16 before
        model.float().requires_grad_(True)
    rt.place(model)
    enc = encode(examples, tokenizer, cfg.max_len)
    counts = param_counts(model)
    steps = plan_steps(enc, cfg, counts)
    if not steps:
        first = step_flops(enc, plan_steps(enc, cfg.model_copy(update={"max_flops": None}),
                                           counts)[0], counts, full=not cfg.lora, padded=True)
        raise CcdsError(f"a training budget of {cfg.max_flops:.3g} FLOPs buys no step: the "
                        f"first costs {first:.3g}", None,
                        "raise max_flops, or lower batch_tokens / grad_accum")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, len(steps)))
    save_at = {round(len(steps) * (i + 1) / cfg.checkpoints) for i in range(cfg.checkpoints)}
    run_key = stable_hash(cfg.identity("measure_flops"),
                          rt.dtype_name, counts_key(model), [(e.id, e.prompt, e.response) for e in examples])
    # fp16's narrow range: the loss is scaled up before backward so that small gradients do
    # not flush to zero, and steps whose gradients overflowed are skipped
    scaler = torch.amp.GradScaler(rt.device.type) if rt.autocast == torch.float16 else None
    resumed = (_resume(Path(out), run_key, model, opt, sched, named, scaler)
               if out is not None and cfg.lora and cfg.save_optimizer else None)
    rank, world = (acc.process_index, acc.num_processes) if acc else (0, 1)
    main = rank == 0
    plain = model
    if acc is not None:
        model, opt = acc.prepare(model, opt)
    torch.manual_seed(cfg.seed)
    model.train()
    pad = tokenizer.pad_token_id
    result = TrainResult(plain, tokenizer, 0, 0, [], [], encoding=enc.summary())
    start = 0
    if resumed is not None:
        state, rng = resumed
        start, result.losses, result.lrs = state["step"], state["losses"], state["lrs"]
        result.tokens, result.steps = state["tokens"], start
        result.checkpoints = state["checkpoints"]  # the ones before the restart count too
        restore_rng(rng, rt.device)
    meter = Meter("train", "training", counts, cfg.measure_flops, rt.device)
    last_ckpt = start  # a checkpoint's mean LR covers the steps since the one before
    b = bar(len(steps), progress if main else None, unit="step")
    lengths, resp = enc.lengths, enc.response_lengths  # O(pool) each: once, not per step
    # ccds's own forward where it serves the model (and the run asks for SDPA attention)
    kernels = own_kernels(model, rt) if cfg.attn == "sdpa" else None
    with meter, _executing(plain, cfg):
        micro = cfg.micro_tokens or _micro_tokens(plain, rt, cfg)
        for step, group in enumerate(steps, 1):
            mine = fit_memory(split_step(group, lengths, world)[rank], lengths, micro)
            if step <= start:  # done before the restart: charge its work, do not redo it
                for ix in mine:
                    meter.lora_step(collate(enc, ix, pad), full=not cfg.lora, ran=False)
                b.update()
                last_ckpt = step
                continue
            n_tok = sum(int(resp[ix].sum()) for ix in group)
            total = torch.zeros((), device=rt.device)  # read once per step, not per batch
            for j, ix in enumerate(mine):
                sync = j == len(mine) - 1
                with (acc.no_sync(model) if acc is not None and not sync
                      else contextlib.nullcontext()):
                    batch = collate(enc, ix, pad).to(rt.device)
                    with rt.amp():
                        nll, _ = response_nll(model, batch, suffix=True, kernels=kernels)
                        loss = nll.sum() / max(n_tok, 1)
                    _backward(acc, scaler, loss * world)  # DDP averages over the processes
                total += loss.detach().float()
                meter.lora_step(batch, full=not cfg.lora)
                result.tokens += batch.real_tokens
            if not mine:  # fewer sequences than processes: join the all-reduce with zeros
                zero = _one_token_loss(model, int(enc.ids[group[0][0]][-1]), rt) * 0.0
                _backward(acc, scaler, zero)
            if scaler is not None:
                scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            result.lrs.append(sched.get_last_lr()[0])
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            result.losses.append(_sum(acc, total))
            result.steps = step
            b.update()
            b.set_postfix_str(f"loss {result.losses[-1]:.3f}")
            if out is not None and step in save_at:
                lr_mean = float(np.mean(result.lrs[last_ckpt:step]))
                if main:
                    result.checkpoints.append(save_checkpoint(
                        Path(out) / f"checkpoint-{step:06d}", plain,
                        opt if cfg.save_optimizer else None, named,
                        {"step": step, "epoch": step / len(steps) * cfg.epochs,
                         "mean_lr": lr_mean, "run_key": run_key, "losses": result.losses,
                         "lrs": result.lrs, "tokens": result.tokens,
                         "scaler": scaler.state_dict() if scaler is not None else None}))
                last_ckpt = step
    b.close()
    plain.eval()
    stage = meter.stage
    if acc is not None:  # the ledger charges the work of every process
        for f in ("analytic_flops", "paper_flops", "measured_flops", "tokens", "padded_tokens"):
            setattr(stage, f, type(getattr(stage, f) or 0)(_sum(acc, getattr(stage, f) or 0)))
        result.tokens = int(_sum(acc, result.tokens))
    stage.detail |= {"steps": result.steps, "examples": len(examples), "processes": world,
                    "resumed_at_step": start,
                    "encoding": result.encoding, "lora_params": counts["lora"],
                    "final_loss": result.losses[-1] if result.losses else None}
    if ledger is not None:
        ledger.add(stage)
    if out is not None and main:
        save_adapter(Path(out) / "adapter", plain)
        write_json(Path(out) / "train.json", {"config": cfg.model_dump(), "losses": result.losses,
                                             "lrs": result.lrs, "stage": stage})
    result.stage = stage
    return result


def _micro_tokens(model, rt: Runtime, cfg: TrainConfig) -> int | None:
    """What free device memory holds for a forward/backward (None on a CPU: no split)."""
    if free_bytes(rt.device) is None:
        return None
    return batch_budget(model, rt, backward=True, checkpointing=cfg.gradient_checkpointing)


def _check_attn(attn: str, rt: Runtime) -> None:
    """flash_attention_2 fails deep inside the first forward when it cannot run: say so up
    front."""
    if attn != "flash_attention_2":
        return
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        raise CcdsError("attn flash_attention_2 needs the flash-attn package and a CUDA GPU",
                        None, "pip install flash-attn on the GPU machine, or use attn: sdpa")
    if rt.autocast is None:
        raise CcdsError("attn flash_attention_2 runs in bf16 or fp16, not fp32", None,
                        "set dtype: bf16 (or fp16), or use attn: sdpa")


@contextlib.contextmanager
def _executing(model, cfg: TrainConfig):
    """`cfg.attn` and `cfg.gradient_checkpointing` on `model` (a PeftModel or a plain one)
    for the run, restored after: the caller's model (a sweep's base model) stays as given."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ckpt = cfg.gradient_checkpointing and not checkpointing(base)
    if ckpt and not base.supports_gradient_checkpointing:
        raise CcdsError(f"{type(base).__name__} does not support gradient checkpointing",
                        None, "set gradient_checkpointing: false")
    attn = base.config._attn_implementation
    if attn != cfg.attn:
        base.set_attn_implementation(cfg.attn)
    if ckpt:
        # non-reentrant: needs no input that requires grad and replays dropout's RNG, so
        # the run trains as it would without checkpointing
        on = getattr(base, "activation_checkpointing_enable", None)  # newer transformers
        (on or base.gradient_checkpointing_enable)({"use_reentrant": False})
    try:
        yield
    finally:
        if ckpt:
            off = getattr(base, "activation_checkpointing_disable", None)
            (off or base.gradient_checkpointing_disable)()
            base.disable_input_require_grads()  # which the enable added
        if attn != cfg.attn:
            base.set_attn_implementation(attn)


def checkpointing(model) -> bool:
    """Whether gradient checkpointing is on in `model` (any transformers version)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _one_token_loss(model, token: int, rt: Runtime) -> torch.Tensor:
    """A forward of one token through every layer: the cheapest graph that reaches every
    trainable parameter, which DDP needs from each process to all-reduce the gradients."""
    with rt.amp():
        ids = torch.tensor([[token]], device=rt.device)
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits.float().sum()


def _backward(acc, scaler, loss: torch.Tensor) -> None:
    if scaler is not None:
        loss = scaler.scale(loss)
    if acc is None:
        loss.backward()
    else:
        acc.backward(loss)


def _accelerator(rt: Runtime):
    """An Accelerator when launched with several processes (accelerate launch / torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=rt.device.type == "cpu")


def check_full_fits(cfg: TrainConfig, rt: Runtime, model=None) -> None:
    """Full fine-tuning holds fp32 weights, their gradients and AdamW's two moments: 16 bytes
    a parameter before any activation. Refuse up front, before loading, what cannot fit
    (an 8B model needs 128 GB), instead of failing at the first backward or step."""
    free = free_bytes(rt.device)
    if free is None:
        return
    if model is not None:  # weights already on the device are already out of `free`
        n = param_counts(model)["total"]
        free += sum(p.numel() * p.element_size() for p in model.parameters()
                    if p.device.type == rt.device.type)
    else:
        try:
            n = counts_without_weights(cfg.model)["total"]
        except (OSError, ValueError):  # no config to read here: loading will say why
            return
    need = 16 * n
    if need > 0.9 * free:  # the rest for activations, as batch_budget keeps
        raise CcdsError(f"full fine-tuning of {cfg.model} needs about {need / 1e9:.0f} GB "
                        f"(16 bytes × {n / 1e9:.2f}B parameters: fp32 weights, gradients, "
                        f"AdamW moments) but {rt.device} has {free / 1e9:.0f} GB free", None,
                        "train LoRA (lora: true), or pick a smaller model or a larger device")


def _sum(acc, x: torch.Tensor | float) -> float:
    """The step's loss summed over processes: the step's one read of the device."""
    if acc is None:
        return float(x)
    t = torch.as_tensor(x).to(acc.device, torch.float64).reshape(1)
    return float(acc.reduce(t, reduction="sum").item())


def save_checkpoint(path: Path, model, opt: torch.optim.Optimizer | None,
                    named: list[tuple[str, torch.nn.Parameter]], state: dict) -> Path:
    """Adapter + AdamW moments (exp_avg, exp_avg_sq by parameter name) + JSON state."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, p in named:
        s = opt.state.get(p, {}) if opt is not None else {}
        for key in ("exp_avg", "exp_avg_sq"):
            if key in s:
                tensors[f"{name}.{key}"] = s[key].detach().cpu().contiguous()
    tensors.update(rng_states(next(model.parameters()).device))
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if opt is not None:
            save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    return path


RNG_KEY = "__torch_cpu_rng_state__"
CUDA_RNG_KEY = "__torch_cuda_rng_state__"


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators a resumed run continues from: the CPU's, and on CUDA the device's too
    (dropout draws its masks there; restoring the CPU's alone would replay the first
    steps' masks after a restart)."""
    states = {RNG_KEY: torch.get_rng_state()}
    if device.type == "cuda":
        states[CUDA_RNG_KEY] = torch.cuda.get_rng_state(device)
    return states


def restore_rng(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states[RNG_KEY])
    if device.type == "cuda" and CUDA_RNG_KEY in states:
        torch.cuda.set_rng_state(states[CUDA_RNG_KEY], device)


def counts_key(model) -> list[int]:
    """What identifies the base model for a resume: its parameter shapes."""
    return [int(p.numel()) for p in model.parameters()]


def _resume(out: Path, run_key: str, model, opt, sched, named, scaler=None):
    """The latest checkpoint of this very run (same config, model and examples), loaded into
    the model, the optimizer, the schedule and the fp16 loss scaler; None if there is
    none."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    found = []
    for ck in out.glob("checkpoint-*"):
        try:
            state = json.loads((ck / "state.json").read_text())
        except (OSError, ValueError):
            continue
        if state.get("run_key") == run_key and (ck / "optimizer.safetensors").exists():
            found.append((state["step"], ck, state))
    if not found:
        return None
    step, ck, state = max(found, key=lambda t: t[0])
    state["checkpoints"] = sorted(c for _, c, _ in found)
    set_peft_model_state_dict(model, load_file(str(ck / "adapter_model.safetensors")))
    t = load_file(str(ck / "optimizer.safetensors"))
    for name, p in named:
        opt.state[p] = {"step": torch.tensor(float(step)),
                        "exp_avg": t[f"{name}.exp_avg"].to(p.device),
                        "exp_avg_sq": t[f"{name}.exp_avg_sq"].to(p.device)}
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping the schedule without an optimizer step
        for _ in range(step):
            sched.step()
    return state, {k: t[k] for k in (RNG_KEY, CUDA_RNG_KEY) if k in t}


@dataclass(frozen=True)
class TrainingCost:
    """What training on a pool costs before anything is loaded: the sweep's C_full, the
    `ccds cost` table and `ccds select --tokens/--flops` all read it from here."""

    analytic: float  # every example for cfg.epochs, ccds convention
    paper: float  # 6·N·T for cfg.epochs (N active non-embedding parameters)
    tokens: int  # training tokens in the pool, as truncated to cfg.max_len
    per_token: float  # analytic FLOPs of one more training token, attention aside
    lengths: np.ndarray  # tokens per example, for token budgets


def training_cost(examples: Sequence[Example], cfg: TrainConfig, tokenizer=None) -> TrainingCost:
    """Price `cfg`'s training on `examples` from the model's config (no weights loaded; the
    tokenizer is loaded unless given). `analytic` is every example for `cfg.epochs` (C_full
    for a pool); `planned_flops` prices the steps a run will take."""
    from .flops import Work, encoded_work, lora_step_flops, paper_flops
    from .models import counts_without_weights, resolve

    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model).path)
    counts = counts_without_weights(cfg.model, cfg if cfg.lora else None)
    enc = encode(examples, tokenizer, cfg.max_len)
    work = encoded_work(enc, suffix=True)
    one = Work()
    one.add([1], 1, 1)  # one token, attention aside: the marginal cost of training on it
    return TrainingCost(analytic=lora_step_flops(counts, work) * cfg.epochs,
                        paper=paper_flops(counts, work.tokens, training=True) * cfg.epochs,
                        tokens=work.tokens, per_token=lora_step_flops(counts, one),
                        lengths=enc.lengths)


def planned_flops(examples: Sequence[Example], cfg: TrainConfig, tokenizer=None) -> float:
    """The analytic FLOPs `train(examples, cfg)` will charge, before anything is loaded: its
    planned steps priced one by one (under `cfg.max_flops` when set)."""
    from .models import counts_without_weights, resolve

    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model).path)
    counts = counts_without_weights(cfg.model, cfg if cfg.lora else None)
    enc = encode(examples, tokenizer, cfg.max_len)
    return float(sum(step_flops(enc, g, counts, full=not cfg.lora)
                     for g in plan_steps(enc, cfg, counts)))
