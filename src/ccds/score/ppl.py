"""The perplexity family: score each pool example by its response perplexity under a
causal LM (default SmolLM2-135M).

Variants (spec §3): `low` puts the lowest perplexity first, `high` the highest, `mid` the
middle third first ("Middle Perplexity", Marion et al. 2023; CCDS splits the sorted pool
into thirds and shuffles within each), and `least_confidence` the lowest mean token
probability first. With `train_on_val` the scorer is first LoRA-trained on V (CCDS: 25
epochs), and that training is charged to the selection.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import numpy as np
from pydantic import Field

from ..flops import Ledger, encoded_work, forward_flops, lora_step_flops
from ..models import causal_lm, counts_without_weights, load_causal_lm, resolve
from ..tokenize import encode
from ..train import TrainConfig, train
from .backend import map_pool
from .base import Method, ModelPass, Params


class PPLParams(Params):
    execution = frozenset({"batch_tokens"})
    model: str = "smollm2-135m"
    variant: Literal["low", "mid", "high", "least_confidence"] = "mid"
    train_on_val: bool = False
    val_epochs: float = Field(25, gt=0)
    val_lr: float = Field(1e-4, gt=0)
    max_len: int = Field(512, ge=8)  # TrainConfig's bound, checked here before any work
    batch_tokens: int | None = Field(
        None, ge=1, description="tokens per batch; default: 8192 on a CPU, on a GPU what "
        "its free memory holds for this model")


class PPL(Method):
    name = "ppl"
    Params = PPLParams

    @property
    def needs_target(self) -> bool:  # only a scorer trained on V reads the target
        return self.params.train_on_val

    def fingerprint(self) -> str:
        return resolve(self.params.model).fingerprint

    def _val_config(self) -> TrainConfig:
        return TrainConfig(model=self.params.model, epochs=self.params.val_epochs,
                           lr=self.params.val_lr, max_len=self.params.max_len,
                           seed=self.params.seed)

    def cost(self, pool, target) -> float:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve(self.params.model).path)
        total = forward_flops(counts_without_weights(self.params.model),
                              encoded_work(encode(pool, tok, self.params.max_len)))
        if self.params.train_on_val and target is not None:
            cfg = self._val_config()
            counts = counts_without_weights(self.params.model, cfg)
            val = encoded_work(encode(target.val, tok, cfg.max_len), suffix=True)
            total += lora_step_flops(counts, val) * cfg.epochs
        return total

    def score(self, pool, target, ctx, meter) -> np.ndarray:
        p = self.params
        model = tok = None
        if p.train_on_val:  # here, before the pool pass (which may run elsewhere)
            model, tok, _ = load_causal_lm(p.model, runtime=ctx.runtime)
            ctx.runtime.place(model)
            ledger = Ledger()
            model = train(target.val, self._val_config(), model=model, tokenizer=tok,
                          runtime=ctx.runtime, ledger=ledger,
                          progress="ppl: train scorer on V" if ctx.progress else None).model
            meter.add(ledger.stages[0].analytic_flops, ledger.stages[0].paper_flops)
        load = partial(causal_lm, p.model, self._val_config() if p.train_on_val else None)
        stats = map_pool(SequenceStats(load, model, tok, lora=p.train_on_val,
                                       max_len=p.max_len, batch_tokens=p.batch_tokens),
                         pool, ctx, meter, key=self.key(pool, target, ctx), desc="ppl")
        nll_sum, n_tokens, prob_sum = stats.T
        n = np.maximum(n_tokens, 1)
        ppl = np.exp(nll_sum / n)
        v = p.variant
        if v == "low":
            return -ppl
        if v == "high":
            return ppl
        if v == "least_confidence":
            return -(prob_sum / n)
        return middle_third_first(ppl, self.params.seed)


def middle_third_first(values: np.ndarray, seed: int) -> np.ndarray:
    """Scores that rank the middle third of `values` first, then the outer thirds; seeded
    shuffling within each group (as CCDS shuffles within thirds)."""
    n = len(values)
    order = np.argsort(values, kind="stable")
    third = np.empty(n, dtype=np.int64)
    third[order] = np.minimum(np.arange(n) * 3 // max(n, 1), 2)
    u = np.random.default_rng(seed).random(n)
    return np.where(third == 1, 2.0, 1.0) + u


class SequenceStats(ModelPass):
    """Per example: response NLL sum, token count and token-probability sum (the
    perplexity family; S2L's loss trajectories)."""

    def __init__(self, load, model=None, tok=None, *, lora: bool = False, max_len: int = 512,
                 batch_tokens: int | None = None):
        super().__init__(load, model, tok, lora=lora)
        self.max_len, self.batch_tokens = max_len, batch_tokens

    def __call__(self, examples, runtime, meter, progress=None) -> np.ndarray:
        from ..lm import score_sequences
        from ..models import param_counts

        meter.params = meter.params or param_counts(self.model)
        s = score_sequences(self.model, encode(examples, self.tok, self.max_len),
                            self.tok.pad_token_id, runtime, max_tokens=self.batch_tokens,
                            meter=meter, progress=progress)
        return np.stack([s["nll_sum"], s["n_tokens"], s["prob_sum"]], axis=1)
