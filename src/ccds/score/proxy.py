"""A proxy model trained on the whole pool, and every example's loss along the way (spec §3).

S2L and its reference-model baselines all read the same two N×T float32 matrices: per-example
mean response cross-entropy and mean token probability at each of T checkpoints evenly spaced
over the proxy's training. They are memory-mapped `.npy` files under ccds's cache, keyed by the
pool and the proxy settings, filled one checkpoint column at a time so a killed run resumes,
and shared by every method that uses the same proxy.

Proxies: any causal LM (LoRA or every weight), or `scratch`: a small Llama built from a
config with a given tokenizer and trained from random init, fast enough for a CPU.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator

from ..errors import CcdsError
from ..flops import Ledger, Meter, encoded_work, forward_flops, full_step_flops, lora_step_flops
from ..io import atomic_path, locked, read_json, stable_hash, write_json
from ..lm import mean_hidden
from ..models import add_lora, cache_dir, load_causal_lm, param_counts, resolve
from ..tokenize import encode
from ..train import TrainConfig, train
from .backend import map_pool
from .base import Method, Params, apply_weights, examples_hash
from .ppl import SequenceStats

SCRATCH = "scratch"


class ProxyParams(Params):
    proxy: str = Field(SCRATCH, description="'scratch' or a causal LM (alias, hub id, dir)")
    tokenizer: str = Field("smollm2-135m", description="tokenizer of a scratch proxy")
    proxy_layers: int = Field(2, ge=1)
    proxy_hidden: int = Field(128, ge=8)
    proxy_heads: int = Field(4, ge=1)
    proxy_lora: bool = Field(False, description="LoRA instead of training every weight "
                                                "(a pretrained proxy only)")
    proxy_epochs: float = Field(3, gt=0)
    proxy_lr: float = Field(1e-3, gt=0)
    checkpoints: int = Field(12, ge=1, description="trajectory length T")
    max_len: int = Field(512, ge=8)  # TrainConfig's bound, checked here before any work
    batch_tokens: int | None = Field(
        None, ge=1, description="tokens per batch; default: 8192 on a CPU, on a GPU what "
        "its free memory holds for this model")
    execution = frozenset({"batch_tokens"})

    @field_validator("checkpoint", "early", "late", check_fields=False)
    @classmethod
    def _one_of_the_checkpoints(cls, v: int, info: ValidationInfo) -> int:
        """A subclass's checkpoint index (negative: from the end) must be one of the T, else
        it would fail only after the proxy is trained."""
        t = info.data.get("checkpoints")
        if t is not None and not -t <= v < t:
            raise ValueError(f"must index one of the {t} checkpoints: {-t}..{t - 1}")
        return v


@dataclass
class Trajectories:
    loss: np.ndarray  # [N, T] mean response cross-entropy (NaN: no response token)
    confidence: np.ndarray  # [N, T] mean response token probability
    epochs: np.ndarray  # [T] training epoch at each checkpoint
    flops: float  # analytic FLOPs that produced them (training + T forward passes)
    paper_flops: float
    reused: bool


def _train_config(p: ProxyParams) -> TrainConfig:
    return TrainConfig(model=p.proxy if p.proxy != SCRATCH else p.tokenizer,
                       lora=p.proxy != SCRATCH and p.proxy_lora, epochs=p.proxy_epochs,
                       lr=p.proxy_lr, checkpoints=p.checkpoints, max_len=p.max_len,
                       seed=p.seed, lora_dropout=0.0, save_optimizer=False)


def build_scratch(p: ProxyParams):
    """A small Llama with the tokenizer's vocabulary, seeded random init."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(resolve(p.tokenizer).path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=p.proxy_hidden,
                      intermediate_size=4 * p.proxy_hidden, num_hidden_layers=p.proxy_layers,
                      num_attention_heads=p.proxy_heads, num_key_value_heads=p.proxy_heads,
                      max_position_embeddings=max(p.max_len, 128), tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(p.seed)
    return LlamaForCausalLM(cfg).eval(), tok


def load_proxy(p: ProxyParams, runtime=None):
    """The proxy, untrained: built from scratch, or loaded (onto `runtime` if given)."""
    if p.proxy == SCRATCH:
        return build_scratch(p)
    model, tok, _ = load_causal_lm(p.proxy, runtime=runtime)
    return model, tok


def proxy_counts(p: ProxyParams) -> dict[str, int]:
    model, _ = load_proxy(p) if p.proxy == SCRATCH else (None, None)
    if model is not None:
        return param_counts(model)
    from ..models import counts_without_weights

    return counts_without_weights(p.proxy, _train_config(p) if p.proxy_lora else None)


def cost(p: ProxyParams, pool, passes: int | None = None, head: bool = True) -> float:
    """Proxy training over the pool for `proxy_epochs`, then `passes` forward passes over it
    (default: one per checkpoint), with or without the LM head."""
    from transformers import AutoTokenizer

    name = p.tokenizer if p.proxy == SCRATCH else p.proxy
    tok = AutoTokenizer.from_pretrained(resolve(name).path)
    counts = proxy_counts(p)
    step = lora_step_flops if p.proxy != SCRATCH and p.proxy_lora else full_step_flops
    enc = encode(pool, tok, p.max_len)
    fwd = encoded_work(enc)
    fwd.head_tokens *= head
    return (step(counts, encoded_work(enc, suffix=True)) * p.proxy_epochs
            + (p.checkpoints if passes is None else passes) * forward_flops(counts, fwd))


def key(p: ProxyParams, pool, dtype: str) -> str:
    fields = set(ProxyParams.model_fields) - set(p.execution)
    settings = p.model_dump(include=fields)
    return stable_hash(settings, fingerprint(p), dtype, examples_hash(pool))


def fingerprint(p: ProxyParams) -> str:
    return resolve(p.tokenizer if p.proxy == SCRATCH else p.proxy).fingerprint


def _trained(p: ProxyParams, pool, ctx):
    """(cache folder, proxy model, tokenizer, training record), training the proxy once."""
    root = cache_dir() / "proxy" / key(p, pool, ctx.runtime.dtype_name)
    root.mkdir(parents=True, exist_ok=True)
    model, tok = load_proxy(p, ctx.runtime)
    ctx.runtime.place(model)
    done = root / "trained.json"
    lora = p.proxy != SCRATCH and p.proxy_lora
    with locked(root / "lock"):
        reused = done.exists()
        if not reused:  # train.tmp: a killed LoRA proxy resumes from its last checkpoint
            ledger = Ledger()
            tmp = root / "train.tmp"
            res = train(pool, _train_config(p), model=model, tokenizer=tok,
                        runtime=ctx.runtime, ledger=ledger, out=tmp,
                        progress="proxy: train" if ctx.progress else None)
            epochs = [read_json(c / "state.json")["epoch"] for c in res.checkpoints]
            shutil.rmtree(root / "train", ignore_errors=True)
            tmp.rename(root / "train")
            st = ledger.stages[0]
            write_json(done, {"checkpoints": [c.name for c in res.checkpoints],
                              "epochs": epochs, "flops": st.analytic_flops,
                              "paper_flops": st.paper_flops,
                              "measured_flops": st.measured_flops, "wall_s": st.wall_s,
                              "final_loss": res.losses[-1]})
            model = res.model
    if reused and lora:
        model = add_lora(model, _train_config(p))
    return root, model, tok, {**read_json(done), "reused": reused}


def _checkpoint(root: Path, info: dict, model, c: int, lora: bool) -> None:
    path = root / "train" / info["checkpoints"][c]
    if not path.exists():
        raise RuntimeError(f"proxy checkpoint {path} was removed; delete {root} to retrain")
    _load_weights(model, path, lora)


def trajectories(p: ProxyParams, pool, ctx, meter: Meter | None = None) -> Trajectories:
    """Train the proxy (or reuse it) and fill the loss/confidence columns still missing.
    Once all are filled only the first and last checkpoints are kept (for embeddings)."""
    root, model, tok, info = _trained(p, pool, ctx)
    lora = p.proxy != SCRATCH and p.proxy_lora
    spent = [info["flops"], info["paper_flops"]]
    n, t = len(pool), len(info["checkpoints"])
    loss = _matrix(root / "loss.npy", n, t)
    conf = _matrix(root / "confidence.npy", n, t)
    columns = root / "columns.json"
    have = read_json(columns) if columns.exists() else {}
    reused = info["reused"]  # work done before this call is charged, not measured
    for c in range(t):
        if str(c) not in have:
            _checkpoint(root, info, model, c, lora)
            m = Meter(f"proxy checkpoint {c}", "selection", param_counts(model), False)
            with m:
                stats = map_pool(SequenceStats(partial(_rebuild, p), model, tok, lora=lora,
                                               max_len=p.max_len, batch_tokens=p.batch_tokens),
                                 pool, ctx, m, key=f"proxy-{root.name}-{c}",
                                 desc=f"proxy: losses {c + 1}/{t}")
            if meter is not None:  # work done in Ray actors, which this process cannot see
                meter.measured_elsewhere(m.remote_measured)
            nll_sum, n_tokens, prob_sum = stats.T
            with np.errstate(invalid="ignore", divide="ignore"):
                loss[:, c] = nll_sum / n_tokens
                conf[:, c] = prob_sum / n_tokens
            loss.flush()
            conf.flush()
            have[str(c)] = {"flops": m.stage.analytic_flops, "paper_flops": m.stage.paper_flops}
            write_json(columns, have)  # after the flush: a listed column is on disk
        spent[0] += have[str(c)]["flops"]
        spent[1] += have[str(c)]["paper_flops"]
    for name in info["checkpoints"][1:-1]:
        shutil.rmtree(root / "train" / name, ignore_errors=True)
    if meter is not None:
        meter.add(*spent)
        meter.stage.detail["proxy"] = {"cache": str(root), "reused": reused,
                                       "train_wall_s": info["wall_s"]}
    return Trajectories(np.asarray(loss), np.asarray(conf), np.array(info["epochs"]),
                        spent[0], spent[1], reused)


def embeddings(p: ProxyParams, pool, ctx, meter: Meter, checkpoint: int = -1) -> np.ndarray:
    """[N, d] mean-pooled last hidden states of the proxy at its first (0) or last (−1)
    checkpoint; charged with the proxy's training."""
    root, model, tok, info = _trained(p, pool, ctx)
    c = checkpoint % len(info["checkpoints"])
    if c not in (0, len(info["checkpoints"]) - 1):
        raise CcdsError(f"proxy embeddings come from the first or last checkpoint, not {c}",
                        None, "use checkpoint 0 or -1")
    meter.add(info["flops"], info["paper_flops"])
    meter.stage.detail["proxy"] = {"cache": str(root), "reused": info["reused"],
                                   "train_wall_s": info["wall_s"]}
    path = root / f"embed-{c}.npy"
    if path.exists():
        cost = read_json(path.with_suffix(".json"))
        meter.add(cost["flops"], cost["paper_flops"])
        return np.load(path)
    _checkpoint(root, info, model, c, p.proxy != SCRATCH and p.proxy_lora)
    m = Meter("proxy embeddings", "selection", param_counts(model), False)
    with m:
        e = mean_hidden(model, encode(pool, tok, p.max_len), tok.pad_token_id, ctx.runtime,
                        max_tokens=p.batch_tokens, meter=m,
                        progress="proxy: embeddings" if ctx.progress else None)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, e)
    write_json(path.with_suffix(".json"),
               {"flops": m.stage.analytic_flops, "paper_flops": m.stage.paper_flops})
    meter.add(m.stage.analytic_flops, m.stage.paper_flops)
    return e


def _matrix(path: Path, n: int, t: int) -> np.memmap:
    if path.exists():
        m = np.load(path, mmap_mode="r+")
        if m.shape == (n, t) and m.dtype == np.float32:
            return m
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    m = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, t))
    m[:] = np.nan
    m.flush()
    del m
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r+")


def _load_weights(model, ckpt: Path, lora: bool) -> None:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if lora else "model.safetensors"
    try:
        apply_weights(model, load_file(str(ckpt / name)), lora)
    except RuntimeError:
        raise RuntimeError(f"proxy checkpoint {ckpt} does not match the model") from None


def _rebuild(p: ProxyParams, runtime=None):
    """The proxy as a pass in another process loads it: LoRA-wrapped if trained so."""
    model, tok = load_proxy(p, runtime)
    if p.proxy != SCRATCH and p.proxy_lora:
        model = add_lora(model, _train_config(p))
    return model, tok


class ProxyMethod(Method):
    """A method that reads the proxy's trajectories; priced as proxy training plus one
    forward per checkpoint. Subclasses set `name`, `Params` and `score`."""

    needs_target = False

    def fingerprint(self) -> str:
        return fingerprint(self.params)

    def cost(self, pool, target) -> float:
        return cost(self.params, pool)
