"""LESS: gradient-based selection (Xia et al. 2024) as the CCDS paper runs it (spec §3).

1. Warmup: LoRA-train the selection model on a seeded 5% of the pool for 4 epochs, keeping a
   checkpoint with its AdamW moments after each epoch.
2. Per checkpoint, per-example LoRA gradients, computed for a whole batch from one backward
   pass: each LoRA matrix is a Linear layer, so example b's weight gradient is
   Σ_t grad_out[b,t]ᵀ · input[b,t], an einsum over the activations and output gradients that
   hooks capture. Pool examples use the Adam update direction m'/sqrt(v' + ε) built from the
   checkpoint's moments; validation examples use the plain gradient.
3. A seeded Rademacher projection to k dimensions, generated in row chunks from a counter-
   based seed (the same matrix on any machine), then L2 normalisation.
4. score = Σ_ckpt w_ckpt · mean over a subtask's V of <ĝ_x, ĝ_v>, max over subtasks, with
   w_ckpt the checkpoint epoch's mean learning rate normalised to sum to 1.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from ..flops import Ledger, encoded_work, lora_step_flops
from ..io import atomic_path, bar, locked, read_json, stable_hash, write_json
from ..lm import response_nll
from ..models import (
    add_lora,
    cache_dir,
    causal_lm,
    counts_without_weights,
    load_causal_lm,
    param_counts,
    resolve,
)
from ..tokenize import Encoded, collate, encode, length_batches
from ..train import TrainConfig, train
from .backend import map_pool
from .base import (
    Method,
    ModelPass,
    Params,
    Reduce,
    aggregate_subtasks,
    apply_weights,
    examples_hash,
)

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


class LESSParams(Params):
    execution = frozenset({"batch_tokens", "project_every"})
    model: str = "smollm2-135m"
    warmup_fraction: float = Field(0.05, gt=0, le=1)
    warmup_epochs: int = Field(4, ge=1)
    lr: float = Field(2e-4, gt=0)
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(32, gt=0)
    proj_dim: int = Field(8192, ge=1)
    max_len: int = Field(512, ge=8)  # TrainConfig's bound, checked here before any work
    batch_tokens: int | None = Field(
        None, ge=1, description="tokens per gradient batch; default 512 on a CPU, 8192 on a GPU")
    project_every: int = Field(256, ge=1, description="examples projected together")
    reduce: Reduce = "max"


class LESS(Method):
    name = "less"
    Params = LESSParams

    def fingerprint(self) -> str:
        return resolve(self.params.model).fingerprint

    def warmup_config(self) -> TrainConfig:
        p = self.params
        return TrainConfig(model=p.model, epochs=p.warmup_epochs, checkpoints=p.warmup_epochs,
                           lr=p.lr, lora_r=p.lora_r, lora_alpha=p.lora_alpha,
                           max_len=p.max_len, seed=p.seed, lora_dropout=0.1)

    def warmup_subset(self, pool) -> list:
        n = max(1, int(round(self.params.warmup_fraction * len(pool))))
        idx = np.sort(np.random.default_rng(self.params.seed).choice(len(pool), n,
                                                                    replace=False))
        return [pool[i] for i in idx]

    def cost(self, pool, target) -> float:
        from transformers import AutoTokenizer

        p = self.params
        cfg = self.warmup_config()
        counts = counts_without_weights(p.model, cfg)
        tok = AutoTokenizer.from_pretrained(resolve(p.model).path)
        warm = encoded_work(encode(self.warmup_subset(pool), tok, p.max_len), suffix=True)
        d = encoded_work(encode(pool, tok, p.max_len), suffix=True)
        v = encoded_work(encode(target.val, tok, p.max_len), suffix=True)
        per_ckpt = (lora_step_flops(counts, d) + lora_step_flops(counts, v)
                    + 2.0 * counts["lora"] * p.proj_dim * (len(pool) + len(target.val))
                    + 2.0 * len(pool) * len(target.subtasks) * p.proj_dim)
        return lora_step_flops(counts, warm) * cfg.epochs + per_ckpt * cfg.checkpoints

    def pool_key(self, pool, ctx) -> str:
        """Identity of the target-independent work: warmup and pool features."""
        p = self.params.model_dump(exclude={"reduce", *self.params.execution})
        return stable_hash([p, self.fingerprint(), ctx.runtime.dtype_name,
                            examples_hash(pool)])[:20]

    def score(self, pool, target, ctx, meter) -> np.ndarray:
        """Warmup and pool features depend on the pool only, so they are kept on disk and
        shared by every target (the amortisation LESS users rely on), one file per checkpoint
        so a killed run resumes. Reused work is charged again at its recorded FLOPs (the
        stage's `detail.reused` says how much), so each target's ledger shows LESS's full
        price; amortising it over tasks is the analysis' job."""
        p = self.params
        root = cache_dir() / "less" / self.pool_key(pool, ctx)
        model, tok, _ = load_causal_lm(p.model)
        ctx.runtime.place(model)
        reused = 0.0
        warm_meta = root / "warmup.json"
        with locked(root / "lock"):
            if warm_meta.exists():
                warm = read_json(warm_meta)
                model = add_lora(model, self.warmup_config())
                reused += warm["flops"]
                meter.add(warm["flops"], warm["paper_flops"])
            else:  # warmup.tmp: a killed warmup resumes from its last checkpoint
                ledger = Ledger()
                tmp = root / "warmup.tmp"
                res = train(self.warmup_subset(pool), self.warmup_config(), model=model,
                            tokenizer=tok, runtime=ctx.runtime, ledger=ledger, out=tmp,
                            progress="less: warmup" if ctx.progress else None)
                model, stage = res.model, ledger.stages[0]
                meter.add(stage.analytic_flops, stage.paper_flops)
                shutil.rmtree(root / "warmup", ignore_errors=True)
                tmp.rename(root / "warmup")
                warm = {"checkpoints": [c.name for c in res.checkpoints],
                        "flops": stage.analytic_flops, "paper_flops": stage.paper_flops}
                write_json(warm_meta, warm)
        ckpts = [root / "warmup" / c for c in warm["checkpoints"]]
        meter.params = param_counts(model)
        names = lora_names(model)
        proj = RademacherProjection(meter.params["lora"], p.proj_dim, p.seed)
        weights = np.array([read_json(c / "state.json")["mean_lr"] for c in ckpts])
        weights = weights / weights.sum()
        val_enc = encode(target.val, tok, p.max_len)
        groups = target.val_by_subtask()
        total = np.zeros((len(pool), len(groups)))
        for c, (ckpt, w) in enumerate(zip(ckpts, weights, strict=True)):
            load_lora(model, ckpt)
            val = self.features(model, val_enc, tok, names, proj, None, ctx.runtime, meter)
            centroids = np.stack([val[idx].mean(axis=0) for idx in groups.values()], 1)
            path = root / f"pool-{c}.npy"
            if path.exists() and (root / f"pool-{c}.json").exists():
                feats = np.load(path, mmap_mode="r")
                cost = read_json(root / f"pool-{c}.json")
                reused += cost["flops"]
                meter.add(cost["flops"], cost["paper_flops"])
            else:
                before = (meter.stage.analytic_flops, meter.stage.paper_flops)
                grads = PoolGradients(self, model, tok, names, proj, load_moments(ckpt, names))
                feats = map_pool(grads, pool, ctx, meter, key=f"less-{root.name}-{c}",
                                 desc=f"less: checkpoint {c + 1}/{len(ckpts)}")
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    np.save(f, feats)
                write_json(root / f"pool-{c}.json",
                           {"flops": meter.stage.analytic_flops - before[0],
                            "paper_flops": meter.stage.paper_flops - before[1]})
            total += w * (np.asarray(feats) @ centroids)
            meter.add(2.0 * feats.shape[0] * feats.shape[1] * centroids.shape[1])
        meter.stage.detail["reused_flops"] = reused
        return aggregate_subtasks(total, p.reduce)

    def batch_tokens(self, runtime) -> int:
        """Small batches on a CPU: an example's matmuls are already large there, and a
        bigger batch's activations outgrow the caches, slowing the backward's elementwise
        kernels (benchmarks/results/speed_lm.md times LESS at both budgets). A GPU wants
        many examples per call."""
        if self.params.batch_tokens is not None:
            return self.params.batch_tokens
        return 512 if runtime.device.type == "cpu" else 8192

    def features(self, model, enc: Encoded, tok, names: list[str], proj: RademacherProjection,
                 moments: dict[str, tuple[torch.Tensor, torch.Tensor]] | None, runtime,
                 meter, desc: str | None = None) -> np.ndarray:
        """Projected, L2-normalised per-example gradient features (Adam-shaped if moments)."""
        out = np.zeros((len(enc), proj.k), dtype=np.float32)
        pending: list[tuple[np.ndarray, torch.Tensor]] = []
        n_pending = 0
        b = bar(len(enc), desc, unit="ex")

        def flush():
            nonlocal n_pending
            if not pending:
                return
            rows = np.concatenate([ix for ix, _ in pending])
            g = torch.cat([x for _, x in pending])
            z = proj(g)
            meter.add(2.0 * g.shape[0] * g.shape[1] * proj.k)
            out[rows] = torch.nn.functional.normalize(z, dim=1).numpy()
            pending.clear()
            n_pending = 0

        for index in length_batches(enc.lengths, self.batch_tokens(runtime)):
            batch = collate(enc, index, tok.pad_token_id).to(runtime.device)
            g = per_example_grads(model, batch, names, runtime)
            meter.lora_step(batch)
            if moments is not None:
                g = adam_direction(g, names, moments)
            pending.append((index, g.cpu()))
            n_pending += len(index)
            b.update(len(index))
            if n_pending >= self.params.project_every:
                flush()
        flush()
        b.close()
        return out


class PoolGradients(ModelPass):
    """Per example: its projected Adam-shaped gradient feature at one warmup checkpoint."""

    def __init__(self, method: LESS, model, tok, names, proj, moments):
        super().__init__(partial(causal_lm, method.params.model, method.warmup_config()),
                         model, tok, lora=True)
        self.method, self.names, self.proj, self.moments = method, names, proj, moments

    def __call__(self, examples, runtime, meter, progress=None) -> np.ndarray:
        meter.params = meter.params or param_counts(self.model)
        enc = encode(examples, self.tok, self.method.params.max_len)
        return self.method.features(self.model, enc, self.tok, self.names, self.proj,
                                    self.moments, runtime, meter, progress)


# -- per-example gradients ----------------------------------------------------------------

def lora_names(model) -> list[str]:
    """Names of the trainable LoRA weights, in a fixed order (the feature layout)."""
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def per_example_grads(model, batch, names: list[str], runtime) -> torch.Tensor:
    """[B, N_lora] gradients of each example's mean response loss, from one backward pass."""
    modules = dict(model.named_modules())
    captured: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook(name):
        def fwd(mod, inputs, output):
            captured[name] = [inputs[0].detach()]
            output.register_hook(lambda g: captured[name].append(g.detach()))
        return fwd

    for n in names:
        handles.append(modules[n.removesuffix(".weight")].register_forward_hook(hook(n)))
    try:
        was_training = model.training
        model.eval()  # no dropout: a gradient per example, not per dropout mask
        with runtime.amp():
            nll, count = response_nll(model, batch, suffix=True)
            loss = (nll / count.clamp(min=1)).sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    parts = []
    for n in names:
        x, g = captured[n]
        parts.append(torch.einsum("bto,bti->boi", g.float(), x.float()).flatten(1))
    return torch.cat(parts, dim=1)


def adam_direction(g: torch.Tensor, names: list[str],
                   moments: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """m' / sqrt(v' + ε) with m' = β1·m + (1−β1)·g, v' = β2·v + (1−β2)·g² (no bias fix)."""
    m = torch.cat([moments[n][0].flatten() for n in names])
    v = torch.cat([moments[n][1].flatten() for n in names])
    m2 = BETA1 * m + (1 - BETA1) * g
    v2 = BETA2 * v + (1 - BETA2) * g * g
    return m2 / torch.sqrt(v2 + EPS)


def load_lora(model, ckpt: Path) -> None:
    from safetensors.torch import load_file

    apply_weights(model, load_file(str(ckpt / "adapter_model.safetensors")), lora=True)


def load_moments(ckpt: Path, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from safetensors.torch import load_file

    t = load_file(str(ckpt / "optimizer.safetensors"))
    return {n: (t[f"{n}.exp_avg"], t[f"{n}.exp_avg_sq"]) for n in names}


# -- projection ---------------------------------------------------------------------------

class RademacherProjection:
    """x @ R with R ∈ {±1/√k}^{n×k}, built chunk by chunk of rows from (seed, chunk index)
    with numpy's PCG64 and packed bits: the same matrix on any machine, never held whole
    unless it fits in `cache_bytes` of packed bits."""

    def __init__(self, n: int, k: int, seed: int, chunk: int = 8192,
                 cache_bytes: int = 1 << 30):
        self.n, self.k, self.seed, self.chunk = n, k, seed, chunk
        self._cache: dict[int, np.ndarray] | None = {} if n * k / 8 <= cache_bytes else None
        signs = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1)  # byte -> 8 signs
        self._table = torch.from_numpy(signs.astype(np.float32) * 2 - 1) / np.sqrt(k)

    def __getstate__(self) -> dict:  # the matrix is rebuilt from the seed, not shipped
        d = dict(self.__dict__)
        d["_cache"] = {} if self._cache is not None else None
        return d

    def _bits(self, c: int) -> np.ndarray:
        if self._cache is not None and c in self._cache:
            return self._cache[c]
        rows = min(self.chunk, self.n - c * self.chunk)
        rng = np.random.Generator(np.random.PCG64([self.seed, c]))
        bits = rng.integers(0, 256, size=(rows, (self.k + 7) // 8), dtype=np.uint8)
        if self._cache is not None:
            self._cache[c] = bits
        return bits

    def block(self, c: int) -> torch.Tensor:
        """Rows of R for chunk c. Each packed byte looks up its 8 signs in a 256-row table:
        one multithreaded pass instead of unpacking bits then scaling, same values."""
        bits = torch.from_numpy(self._bits(c)).int()
        return F.embedding(bits, self._table).reshape(len(bits), -1)[:, :self.k]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.k, dtype=torch.float32)
        for c in range((self.n + self.chunk - 1) // self.chunk):
            lo = c * self.chunk
            out += x[:, lo:lo + self.chunk].float() @ self.block(c)
        return out
