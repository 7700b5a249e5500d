"""ccds's own forward of Llama-style decoders: transformers' numbers, without its padding.

Why: a padded batch of similar-length rows is small (a few hundred to a few thousand
tokens once padding is capped), and where matmuls are fast (AMX CPUs, GPUs) its small
matmuls and the per-op work around them (the 4-D mask, K/V heads repeated for grouped
attention, five kernels per norm) dominate. Here a batch's real tokens are one [N, d]
matrix through every linear layer (no padding, so batches are packed by real tokens
whatever their lengths), q/k/v are one matmul, SwiGLU runs in place, and attention runs
causally on groups of similar-length rows padded on the right: no mask, so the fused
kernel, and grouped K/V heads are never repeated. LoRA adapters run beside their frozen
base (A's of q/k/v fused, each B added by the matmul itself), so trained models take this
path too.

The elementwise work between the matmuls (residual add + RMSNorm, rotary embedding,
SwiGLU) is four small functions; `compiled()` fuses each into one kernel with
`torch.compile`, which `compile_pays` decides per pass (compiling takes seconds, and
inductor caches what it built on disk for the next process).

`supports` names the models served (Llama; Mistral and Qwen2 without a sliding window);
any other runs its own forward (`lm._decoder_states`). tests/test_decoder.py holds both
paths to the same numbers.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .errors import CcdsError
from .tokenize import Batch, to_device

# attention groups: rows at most this much shorter than their longest. A looser bound pads
# more (attention's cost grows with width²), a tighter one makes more, smaller SDPA calls
MAX_PAD = 0.1
Compile = Literal["auto", "on", "off"]


def supports(base) -> bool:
    """Whether `base` (a causal LM, not a PeftModel wrapper) has exactly the layer
    structure this forward implements."""
    cfg = getattr(base, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in ("llama", "mistral", "qwen2") or getattr(cfg, "hidden_act", None) != "silu":
        return False
    if kind == "mistral" and getattr(cfg, "sliding_window", None) is not None:
        return False
    if kind == "qwen2" and getattr(cfg, "use_sliding_window", False):
        return False
    return hasattr(base.get_decoder(), "rotary_emb")


class Kernels(NamedTuple):
    """The elementwise steps between matmuls, eager or compiled."""

    rms: Callable  # (x, weight, eps) -> RMSNorm(x)
    add_rms: Callable  # (x, a, weight, eps) -> (x + a, RMSNorm(x + a))
    rope: Callable  # (x [N, heads, dim], cos, sin) -> x rotated
    swiglu: Callable  # (gate, up) -> silu(gate) * up



def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers computes it: fp32 statistics, scaled in the input's dtype."""
    f = x.float()
    return w * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _add_rms(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, eps: float):
    x = x + a
    return x, _rms(x, w, eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin, the rotated half added into each half in place: three
    kernels where the textbook form (a negated half, a concatenation, two products and a
    sum) takes five, and one rounding fewer in bf16."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled():
        return F.silu(gate) * up
    return F.silu(gate, inplace=True).mul_(up)  # into gate's columns: no [N, d_ff] temporaries


EAGER = Kernels(_rms, _add_rms, _rope, _swiglu)


@cache  # one compiled set per process; inductor keeps its artefacts on disk between them
def compiled() -> Kernels:
    """The four kernels under `torch.compile` (dynamic shapes: one build serves every
    batch), each falling back to eager if compiling fails here."""
    return Kernels(*(_guarded(torch.compile(f, dynamic=True), f) for f in EAGER))

# The cost model's numbers, from a 2-core AMX CPU: compiling the four kernels into an empty
# inductor cache took 14-16 s, and 2.8-3.3 s in a later process that found them there
# (benchmarks/compile_warm.py); compiled, scoring ran 1.2x faster (a sixth of the eager time
# saved), whose eager forward ran at a third of the matmul peak (benchmarks/speed_lm.py).
COMPILE_SECONDS, WARM_COMPILE_SECONDS = 16.0, 3.3
COMPILE_SAVES, EAGER_SHARE = 0.17, 0.33
# a pass of fewer FLOPs never pays, even on a 50 GFLOP/s CPU: no need to measure the rate
NEVER_PAYS_BELOW = WARM_COMPILE_SECONDS / COMPILE_SAVES * EAGER_SHARE * 50e9


@cache  # read once per process: the dtype choice and every compile decision read it
def cpu_info() -> tuple[str | None, frozenset[str]]:
    """The CPU's model name and instruction-set flags from /proc/cpuinfo (None, {} elsewhere)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, frozenset()
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags = re.search(r"flags\s*:\s*(.*)", info)
    return model and model.group(1), frozenset(flags.group(1).split() if flags else ())


def _built_marker(kernel: str, dtype: torch.dtype, grad: bool = False) -> Path | None:
    """A file in inductor's cache saying this torch already compiled `kernel` (this source)
    for `dtype` inputs there, on this CPU (model and instruction sets: a cache directory
    shared by machines of another kind holds no build of theirs for this one), without
    gradients or (`grad`, another graph) with them: it lives and goes with the artefacts it
    stands for."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch layout: assume a cold cache
        return None
    model, flags = cpu_info()
    root = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    source = "".join(inspect.getsource(f) for f in EAGER)
    machine = f"{model} {' '.join(sorted(flags))}"
    key = hashlib.sha256(f"{torch.__version__} {dtype} {grad} {machine} {source}".encode()
                         ).hexdigest()
    key = key[:16]
    return Path(root) / "ccds" / f"{kernel}-{key}"


def compile_seconds(dtype: torch.dtype, grad: bool = False) -> float:
    """What compiling the kernels for a pass on `dtype` inputs, without gradients or
    (`grad`) with them, costs now: little where an earlier process built them into the same
    inductor cache (`_built_marker`), else a full build."""
    markers = [_built_marker(k, dtype, grad) for k in Kernels._fields]
    warm = all(m is not None and m.exists() for m in markers)
    return WARM_COMPILE_SECONDS if warm else COMPILE_SECONDS


def compile_setting() -> Compile:
    """$CCDS_COMPILE: auto (default), on or off."""
    value = os.environ.get("CCDS_COMPILE", "auto")
    if value not in ("auto", "on", "off"):
        raise CcdsError(f"CCDS_COMPILE is '{value}'", None, "set it to auto, on or off")
    return value  # type: ignore[return-value]


def compile_pays(setting: Compile, device: torch.device, seconds: float | None,
                 dtype: torch.dtype = torch.float32) -> bool:
    """Whether to compile the kernels for a pass predicted to take `seconds` eager (None:
    unknown) on `dtype` activations. `auto` compiles on CPUs only (where the saving was
    measured) and only when the saving beats the compile time (`compile_seconds`: a cached
    build is cheap); `on`/`off` force it."""
    if setting != "auto":
        return setting == "on"
    return (device.type == "cpu" and seconds is not None
            and COMPILE_SAVES * seconds > compile_seconds(dtype))


def kernels_for(seconds: float | None, device: torch.device,
                dtype: torch.dtype = torch.float32) -> Kernels:
    """The kernels for a pass predicted to take `seconds` eager (`compile_pays`)."""
    return compiled() if compile_pays(compile_setting(), device, seconds, dtype) else EAGER


try:  # the check dynamo makes before it skips a function for the rest of the process
    from torch.utils._python_dispatch import any_torch_dispatch_mode_on_stack as _in_mode
except ImportError:  # another torch: any mode on the stack
    def _in_mode() -> bool:
        return torch._C._len_torch_dispatch_stack() > 0


def _guarded(fast: Callable, eager: Callable) -> Callable:
    """`fast` (compiled), or `eager` from its first failure on (no C++ compiler or Triton here,
    an unsupported op): one warning, and the pass goes on with the same numbers to rounding.
    Its first success for each input dtype and grad mode leaves `_built_marker` for later
    processes.

    Eager too while a dispatch mode is on (a Meter's FLOP counter, over a pass's first
    batches): dynamo would run that call eager and skip the function for the rest of the
    process, so the pass would never compile, and the marker would claim a build."""
    failed: list[BaseException] = []
    built: set[tuple[torch.dtype, bool]] = set()

    def run(*args):
        if not failed and not _in_mode():
            try:
                out = fast(*args)
            except (torch.OutOfMemoryError, MemoryError):
                raise  # the batch is too large, compiled or not
            except Exception as e:  # noqa: BLE001 - any compile failure means: run eager
                failed.append(e)
                warnings.warn(f"torch.compile failed ({str(e).splitlines()[0][:200]}); "
                              "running eager (CCDS_COMPILE=off silences this)", stacklevel=2)
            else:
                graph = (args[0].dtype, torch.is_grad_enabled())
                if graph not in built:
                    built.add(graph)
                    _mark_built(eager.__name__.lstrip("_"), *graph)
                return out
        return eager(*args)
    return run


def _mark_built(kernel: str, dtype: torch.dtype, grad: bool = False) -> None:
    marker = _built_marker(kernel, dtype, grad)
    if marker is not None:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:  # a read-only cache: the next process pays the full build
            pass


@dataclass
class _Group:
    """Rows attended together: `rows` × `width`, right-padded, gathered from the flat tokens
    by `take` and their real positions kept by `keep` (both None: the rows are already
    contiguous and unpadded)."""

    rows: int
    width: int
    take: torch.Tensor | None
    keep: torch.Tensor | None
    span: tuple[int, int]  # the group's tokens in the flat order


def _layout(lengths: np.ndarray, device) -> tuple[list[_Group], np.ndarray]:
    """Attention groups of the batch's rows, and each flat token's position in its row.

    Rows keep their order (the flat tokens are row-major); a group closes at a row longer
    than its first or more than MAX_PAD shorter. Pads point at the group's first token:
    right-padded and causal, no real query ever attends to them."""
    starts = np.concatenate([[0], np.cumsum(lengths)])
    groups: list[_Group] = []
    r = 0
    while r < len(lengths):
        width, end = int(lengths[r]), r + 1
        while end < len(lengths) and (1 - MAX_PAD) * width <= lengths[end] <= width:
            end += 1
        span = (int(starts[r]), int(starts[end]))
        ls = lengths[r:end]
        if width == 0:  # empty rows: nothing to attend
            pass
        elif (ls == width).all():
            groups.append(_Group(end - r, width, None, None, span))
        else:
            cols = np.arange(width)
            real = cols[None, :] < ls[:, None]
            take = np.where(real, starts[r:end, None] + cols[None, :], span[0]).reshape(-1)
            groups.append(_Group(end - r, width, to_device(torch.from_numpy(take), device),
                                 to_device(torch.from_numpy(np.flatnonzero(real)), device),
                                 span))
        r = end
    position = np.arange(int(starts[-1])) - np.repeat(starts[:-1], lengths)
    return groups, position


def states(base, batch: Batch, kernels: Kernels = EAGER) -> torch.Tensor:
    """The decoder's last hidden states at the real tokens of the left-padded `batch`, row
    by row: [N, d] (`unflatten` gives transformers' [B, W, d] layout, `positions` maps
    into it). Differentiable; with the model's gradient checkpointing on, each layer is
    recomputed in the backward as transformers would."""
    decoder = base.get_decoder()
    device = batch.input_ids.device
    lengths = np.asarray(batch.lengths, dtype=np.int64)
    at = to_device(torch.from_numpy(real_positions(batch)), device)
    groups, position = _layout(lengths, device)
    x = decoder.embed_tokens(batch.input_ids.reshape(-1).index_select(0, at))
    if not len(x):
        return x
    cos, sin = decoder.rotary_emb(x[None], to_device(torch.from_numpy(position), device)[None])
    rope = (cos[0].unsqueeze(1), sin[0].unsqueeze(1))  # [N, 1, head_dim]
    layers = list(decoder.layers)
    first = layers[0].input_layernorm
    h = kernels.rms(x, first.weight, first.variance_epsilon)
    for i, layer in enumerate(layers):
        # every norm but the first follows a residual add, and is fused with it
        after = layers[i + 1].input_layernorm if i + 1 < len(layers) else decoder.norm
        step = partial(_layer, layer, after, rope=rope, groups=groups, kernels=kernels)
        # transformers' rule: its checkpointing layers recompute when on and training
        recompute = (torch.is_grad_enabled() and layer.training
                     and getattr(layer, "gradient_checkpointing", False))
        x, h = checkpoint(step, x, h, use_reentrant=False) if recompute else step(x, h)
    return h


def real_positions(batch: Batch) -> np.ndarray:
    """Flat [B·W] positions of the real tokens, row by row: row r's are its last
    lengths[r] columns (left padding)."""
    lengths = np.asarray(batch.lengths, dtype=np.int64)
    width = batch.input_ids.shape[1]
    rows = np.repeat(np.arange(len(lengths)), lengths)
    first = rows * width + width - lengths[rows]  # each token's row's first real column
    return first + np.arange(len(rows)) - (np.cumsum(lengths) - lengths)[rows]


def positions(batch: Batch) -> np.ndarray:
    """[B·W]: for each position of the batch's left-padded layout, its row in `states`'s
    output (-1 at the padding). Host-side: indexing by it never reads the device."""
    where = np.full(batch.input_ids.numel(), -1, dtype=np.int64)
    real = real_positions(batch)
    where[real] = np.arange(len(real))
    return where


def unflatten(t: torch.Tensor, batch: Batch, at: torch.Tensor | None = None) -> torch.Tensor:
    """[N, ...] per real token (`states`'s layout) -> [B, W, ...], the batch's left-padded
    layout, zeros at the padding; `at`: `real_positions` on t's device, if already there.
    Costs B·W rows: for batches of similar lengths (LESS's hooks), not for packed ones."""
    rows, width = batch.input_ids.shape
    if at is None:
        at = to_device(torch.from_numpy(real_positions(batch)), t.device)
    out = t.new_zeros(rows * width, *t.shape[1:]).index_copy_(0, at, t)
    return out.view(rows, width, *t.shape[1:])


def _layer(layer, after, x: torch.Tensor, h: torch.Tensor, *, rope, groups: list[_Group],
           kernels: Kernels) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer: (residual stream, its normed copy) in, the same out, `after` the
    norm that follows it (the next layer's input norm, or the final one)."""
    a = _attention(layer.self_attn, h, rope, groups, kernels)
    norm = layer.post_attention_layernorm
    x, h = kernels.add_rms(x, a, norm.weight, norm.variance_epsilon)
    # gate and up as two matmuls: one over concatenated weights would hold [N, 2·d_ff]
    # and the weights' copy at the peak, for little speed at these row counts
    mlp = layer.mlp
    m = _linear(mlp.down_proj, kernels.swiglu(_linear(mlp.gate_proj, h), _linear(mlp.up_proj, h)))
    return kernels.add_rms(x, m, after.weight, after.variance_epsilon)


class _Lora(NamedTuple):
    """A linear layer as `_project` computes it: its frozen base, and its one adapter's
    (A [r, in], B [out, r], scaling, dropout), or no adapter."""

    base: torch.nn.Linear
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    scale: float = 1.0
    dropout: Callable | None = None


def _hooked(m: torch.nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _parts(m: torch.nn.Module) -> _Lora | None:
    """`m` as base + adapter where computing it so gives its own output: a plain Linear, or
    a peft LoRA Linear with one plain active adapter, unmerged. None for anything else and
    for layers with hooks (LESS captures through them), which are called as they are."""
    if _hooked(m):
        return None
    if type(m) is torch.nn.Linear:
        return _Lora(m)
    lora_a, lora_b = getattr(m, "lora_A", None), getattr(m, "lora_B", None)
    if (lora_a is None or type(m).__name__ != "Linear" or getattr(m, "merged", True)
            or m.disable_adapters or len(m.active_adapters) != 1):
        return None
    (name,) = m.active_adapters
    variant = name in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(name)
    if name not in lora_a or variant or type(m.base_layer) is not torch.nn.Linear:
        return None  # DoRA and other variants change the formula
    a, b, drop = lora_a[name], lora_b[name], m.lora_dropout[name]
    if any(map(_hooked, (m.base_layer, a, b))) or b.bias is not None:
        return None
    dropout = drop if drop.training and getattr(drop, "p", 0) > 0 else None
    return _Lora(m.base_layer, a.weight, b.weight, m.scaling[name], dropout)


def _project(mods, x: torch.Tensor) -> list[torch.Tensor]:
    """Each module's output for `x` [N, in]. Frozen bases run as one matmul over their
    concatenated weights, LoRA adapters' A as one matmul over theirs (unless dropout draws a
    mask per adapter), and each B is added into its output by the matmul itself (addmm,
    scaling folded into B): no fp32 copy of x, no separate scale and add, as peft's layer
    would run them. Anything else (other adapters, hooks, trained bases) is called as it
    is."""
    parts = [_parts(m) for m in mods]
    if any(p is None for p in parts):
        return [m(x) for m in mods]
    bases = [p.base for p in parts]
    biases = [m.bias for m in bases]
    # fused only for frozen weights: under grad the concatenated copy is kept for the
    # backward (full fine-tuning would hold a second copy of every q/k/v weight)
    if len(bases) > 1 and not any(m.weight.requires_grad for m in bases) and (
            all(b is not None for b in biases) or all(b is None for b in biases)):
        w = torch.cat([m.weight for m in bases])
        b = torch.cat(biases) if biases[0] is not None else None
        outs = list(F.linear(x, w, b).split([m.out_features for m in bases], -1))
    else:
        outs = [F.linear(x, m.weight, m.bias) for m in bases]
    adapted = [i for i, p in enumerate(parts) if p.a is not None]
    if not adapted:
        return outs
    if any(parts[i].dropout is not None for i in adapted):
        hs = [F.linear(x if parts[i].dropout is None else parts[i].dropout(x), parts[i].a)
              for i in adapted]
    else:
        hs = F.linear(x, torch.cat([parts[i].a for i in adapted])).split(
            [parts[i].a.shape[0] for i in adapted], -1)
    for i, h in zip(adapted, hs, strict=True):
        outs[i] = torch.addmm(outs[i], h, (parts[i].b * parts[i].scale).t())
    return outs


def _linear(mod, x: torch.Tensor) -> torch.Tensor:
    return _project([mod], x)[0]


def _attention(attn, h: torch.Tensor, rope, groups: list[_Group],
               kernels: Kernels) -> torch.Tensor:
    """Self-attention of the flat tokens `h`, group by group (`_layout`), through the
    layer's own projections."""
    n, dim = len(h), attn.head_dim
    q, k, v = _project([attn.q_proj, attn.k_proj, attn.v_proj], h)
    q = kernels.rope(q.view(n, -1, dim), *rope)
    k = kernels.rope(k.view(n, -1, dim), *rope)
    v = v.view(n, -1, dim)
    parts = []
    for g in groups:
        qkv = []
        for t in (q, k, v):
            t = t[g.span[0]:g.span[1]] if g.take is None else t.index_select(0, g.take)
            qkv.append(t.view(g.rows, g.width, t.shape[1], dim).transpose(1, 2))
        o = _causal(*qkv, scale=attn.scaling,
                    dropout=attn.attention_dropout if attn.training else 0.0)
        o = o.transpose(1, 2).reshape(g.rows * g.width, -1)
        parts.append(o if g.keep is None else o.index_select(0, g.keep))
    return _linear(attn.o_proj, parts[0] if len(parts) == 1 else torch.cat(parts))


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
            dropout: float) -> torch.Tensor:
    """Causal attention of [B, heads, L, dim] (k, v may have fewer heads: grouped). With
    gradients on a CPU and rows of at most `MATH_BACKWARD_WIDTH`, through `_MathBackward`;
    else SDPA's own."""
    if (torch.is_grad_enabled() and q.device.type == "cpu" and not dropout
            and q.shape[2] <= MATH_BACKWARD_WIDTH):
        return _MathBackward.apply(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1],
                                          dropout_p=dropout)


# rows up to this width take `_MathBackward` (benchmarks/attention_backward.py: the width
# that made LoRA training fastest)
MATH_BACKWARD_WIDTH = 256


class _MathBackward(torch.autograd.Function):
    """SDPA's fused forward, and a backward of batched matmuls over the [L, L] scores.

    Why: on a CPU the flash kernel's backward costs about as much per call whatever the
    rows' width (benchmarks/attention_backward.py), while training batches are groups of
    short rows; there the scores fit in memory and the textbook backward (recompute P,
    dV = PᵀdO, dS = P∘(dP − rowsum(dO∘O))) is a handful of batched matmuls. Grouped heads
    are never repeated: each K/V head's query heads are stacked as rows, so dK and dV sum
    over them in the matmul itself."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        if torch.is_autocast_enabled(q.device.type):  # as SDPA casts under autocast
            dt = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                           enable_gqa=q.shape[1] != k.shape[1])
        ctx.save_for_backward(q, k, v, o)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o = ctx.saved_tensors
        do = do.to(o.dtype)  # the gradients go back in it; autograd casts them to the inputs'
        b, heads, length, dim = q.shape
        groups = k.shape[1]
        rows = heads // groups * length  # a K/V head's query rows, stacked
        qg, dog = q.reshape(b, groups, rows, dim), do.reshape(b, groups, rows, dim)
        # the scores and dP in fp32 (as flash accumulates them): dS = P∘(dP − rowsum(P∘dP))
        # cancels, and dP rounded to bf16 would lose LESS's per-example gradients' agreement
        s = torch.matmul(qg.float(), k.float().transpose(-1, -2)).view(
            b, groups, -1, length, length)
        future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu_(1)
        p = torch.softmax(s.mul_(ctx.scale).masked_fill_(future, float("-inf")), -1)
        dv = torch.matmul(p.to(q.dtype).view(b, groups, rows, length).transpose(-1, -2), dog)
        dp = torch.matmul(dog.float(), v.float().transpose(-1, -2)).view_as(p)
        delta = (do * o).sum(-1, dtype=torch.float32).view(b, groups, -1, length, 1)
        ds = dp.sub_(delta).mul_(p).to(q.dtype).view(b, groups, rows, length)
        dq = torch.matmul(ds, k).mul_(ctx.scale).view(b, heads, length, dim)
        dk = torch.matmul(ds.transpose(-1, -2), qg).mul_(ctx.scale)
        return dq, dk, dv, None
