"""LESS: gradient-based selection (Xia et al. 2024) as the CCDS paper runs it (spec §3).

1. Warmup: LoRA-train the selection model on a seeded 5% of the pool for 4 epochs, keeping a
   checkpoint with its AdamW moments after each epoch.
2. Per checkpoint, per-example LoRA gradients, computed for a whole batch from one backward
   pass: each LoRA matrix is a Linear layer, so example b's weight gradient is
   Σ_t grad_out[b,t]ᵀ · input[b,t], an einsum over the activations and output gradients that
   hooks capture. Pool examples use the Adam update direction m'/sqrt(v' + ε) built from the
   checkpoint's moments; validation examples use the plain gradient.
3. A seeded Rademacher projection to k dimensions on the gradients' device, its signs a
   counter-based hash of (seed, row, column) generated in row chunks (the same matrix on
   any device), then L2 normalisation.
4. score = Σ_ckpt w_ckpt · mean over a subtask's V of <ĝ_x, ĝ_v>, max over subtasks, with
   w_ckpt the checkpoint epoch's mean learning rate normalised to sum to 1.
"""

from __future__ import annotations

import math
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from .. import decoder
from ..flops import Ledger, encoded_work, lora_step_flops
from ..io import atomic_path, bar, locked, read_json, stable_hash, write_json
from ..lm import own_kernels, response_nll
from ..models import (
    ModelShape,
    add_lora,
    cache_dir,
    causal_lm,
    counts_without_weights,
    fit_tokens,
    free_bytes,
    load_causal_lm,
    param_counts,
    resolve,
)
from ..tokenize import Encoded, collate, encode, length_batches, to_device
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
SIGN_CACHE_BYTES = 1 << 30  # the projection keeps its sign blocks (fp32 or packed bits) up to this


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
        None, ge=1, description="tokens per gradient batch; default 512 on a CPU, on a GPU "
        "the most that fits in its free memory (gradient_batch_tokens)")
    project_every: int = Field(256, ge=1, description="examples projected together")
    reduce: Reduce = "max"


class LESS(Method):
    name = "less"
    Params = LESSParams

    def fingerprint(self) -> str:
        """The model's, and the projection's version: scores and pool features computed
        with another matrix are never reused."""
        return f"{resolve(self.params.model).fingerprint}/{RademacherProjection.version}"

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
        model, tok, _ = load_causal_lm(p.model, runtime=ctx.runtime)
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

    def batch_tokens(self, runtime, model=None) -> int:
        """Small batches on a CPU: an example's matmuls are already large there, and a
        bigger batch's activations outgrow the caches, slowing the backward's elementwise
        kernels (benchmarks/results/speed_lm.md times LESS at both budgets). A GPU wants
        many examples per call, as many as its free memory holds for `model` (the LoRA
        model being differentiated); what the caching allocator holds unused counts as free."""
        p = self.params
        if p.batch_tokens is not None:
            return p.batch_tokens
        if runtime.device.type == "cpu":
            return 512
        if runtime.device.type != "cuda":
            return 8192
        if model is None:
            raise ValueError("LESS's GPU batch size depends on the model: pass it")
        free = free_bytes(runtime.device)
        n_lora = sum(x.numel() for x in model.parameters() if x.requires_grad)
        return gradient_batch_tokens(free, ModelShape.of(model), n_lora,
                                     held_rows=p.project_every, proj_dim=p.proj_dim,
                                     act_bytes=4 if runtime.autocast is None else 2,
                                     max_len=p.max_len)

    def features(self, model, enc: Encoded, tok, names: list[str], proj: RademacherProjection,
                 moments: dict[str, tuple[torch.Tensor, torch.Tensor]] | None, runtime,
                 meter, desc: str | None = None) -> np.ndarray:
        """Projected, L2-normalised per-example gradient features (Adam-shaped if moments).
        Rows wait for the projection in one [project_every, N_lora] buffer, so each chunk of
        R meets them all in one matmul; a batch that would overflow it flushes it first."""
        out = np.zeros((len(enc), proj.k), dtype=np.float32)
        cap = min(self.params.project_every, len(enc))
        buf: torch.Tensor | None = None  # on the compute device
        held: list[np.ndarray] = []
        m = 0  # rows in buf
        b = bar(len(enc), desc, unit="ex")

        def project(rows: np.ndarray, x: torch.Tensor) -> None:
            z = proj(x)
            meter.add(2.0 * len(rows) * proj.n * proj.k)
            out[rows] = F.normalize(z, dim=1).cpu().numpy()

        def flush() -> None:
            nonlocal m
            if held:
                project(np.concatenate(held), buf[:m])
                held.clear()
                m = 0

        kernels = own_kernels(model, runtime)
        for index in length_batches(enc.lengths, self.batch_tokens(runtime, model)):
            batch = collate(enc, index, tok.pad_token_id).to(runtime.device)
            g = per_example_grads(model, batch, names, runtime, kernels)
            meter.lora_step(batch)
            if moments is not None:
                g = adam_direction(g, names, moments)
            if m + len(index) > cap:
                flush()
            if len(index) > cap:  # more rows than project_every: projected on their own
                project(index, g)
            else:
                if buf is None:
                    buf = g.new_empty(cap, g.shape[1])
                buf[m:m + len(index)] = g
                held.append(index)
                m += len(index)
            del g  # the next batch's gradients take its place
            b.update(len(index))
        flush()
        b.close()
        return out


class PoolGradients(ModelPass):
    """Per example: its projected Adam-shaped gradient feature at one warmup checkpoint."""

    def __init__(self, method: LESS, model, tok, names, proj, moments):
        super().__init__(partial(causal_lm, method.params.model, method.warmup_config()),
                         model, tok, lora=True)
        self.method, self.names, self.proj, self.moments = method, names, proj, moments

    def __getstate__(self) -> dict:  # shipped on the CPU, wherever this process computes
        return {**super().__getstate__(),
                "moments": {n: (m.cpu(), v.cpu()) for n, (m, v) in self.moments.items()}}

    def setup(self, runtime) -> None:
        """The moments go where the gradients are computed, once per checkpoint (here or
        on a Ray actor), not once per batch."""
        super().setup(runtime)
        d = runtime.device
        self.moments = {n: (m.to(d), v.to(d)) for n, (m, v) in self.moments.items()}

    def __call__(self, examples, runtime, meter, progress=None) -> np.ndarray:
        meter.params = meter.params or param_counts(self.model)
        enc = encode(examples, self.tok, self.method.params.max_len)
        return self.method.features(self.model, enc, self.tok, self.names, self.proj,
                                    self.moments, runtime, meter, progress)


# -- per-example gradients ----------------------------------------------------------------

def lora_names(model) -> list[str]:
    """Names of the trainable LoRA weights, in a fixed order (the feature layout)."""
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def per_example_grads(model, batch, names: list[str], runtime,
                      kernels: decoder.Kernels | None = None) -> torch.Tensor:
    """[B, N_lora] gradients of each example's mean response loss, from one backward pass
    (through `decoder.states` with `kernels`, whose layers see the batch's real tokens as
    one [N, ·] matrix, else through the model's own forward)."""
    modules = dict(model.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def fwd(mod, args, output):
            inputs[name], outputs[name] = args[0].detach(), output
        return fwd

    for n in names:
        handles.append(modules[n.removesuffix(".weight")].register_forward_hook(hook(n)))
    try:
        was_training = model.training
        model.eval()  # no dropout: a gradient per example, not per dropout mask
        with runtime.amp():
            nll, count = response_nll(model, batch, suffix=True, kernels=kernels)
            loss = (nll / count.clamp(min=1)).sum()
        # the gradients of the adapters' outputs only: no weight gradient of the whole
        # batch, which the per-example ones below replace, is ever computed
        grads = torch.autograd.grad(loss, [outputs[n] for n in names], allow_unused=True)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    at = None
    parts = []
    for n, g in zip(names, grads, strict=True):
        x = inputs[n]
        g = torch.zeros_like(outputs[n]) if g is None else g
        if x.dim() == 2:  # per real token: back to [B, W, ·], zeros at the padding
            if at is None:
                at = to_device(torch.from_numpy(decoder.real_positions(batch)), x.device)
            x, g = decoder.unflatten(x, batch, at), decoder.unflatten(g, batch, at)
        parts.append(torch.einsum("bto,bti->boi", g.float(), x.float()).flatten(1))
    return torch.cat(parts, dim=1)


def adam_direction(g: torch.Tensor, names: list[str],
                   moments: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """m' / sqrt(v' + ε) with m' = β1·m + (1−β1)·g, v' = β2·v + (1−β2)·g² (no bias fix).
    In place on two [B, N] buffers (the same operations in the same order): at 7B a batch's
    rows are gigabytes each."""
    m = torch.cat([moments[n][0].flatten() for n in names])
    v = torch.cat([moments[n][1].flatten() for n in names])
    v2 = g.mul(1 - BETA2).mul_(g).add_(BETA2 * v)
    return g.mul(1 - BETA1).add_(BETA1 * m).div_(v2.add_(EPS).sqrt_())


def load_lora(model, ckpt: Path) -> None:
    from safetensors.torch import load_file

    apply_weights(model, load_file(str(ckpt / "adapter_model.safetensors")), lora=True)


def load_moments(ckpt: Path, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from safetensors.torch import load_file

    t = load_file(str(ckpt / "optimizer.safetensors"))
    return {n: (t[f"{n}.exp_avg"], t[f"{n}.exp_avg_sq"]) for n in names}


# -- batch size from free memory ----------------------------------------------------------

def gradient_memory(tokens: int, shape: ModelShape, n_lora: int, *, held_rows: int,
                    proj_dim: int, act_bytes: int = 2, max_batch: int = 64,
                    chunk: int = 8192) -> float:
    """An upper estimate of the bytes LESS's gradient pass needs besides the loaded model,
    at `tokens` per batch, so a budget can be chosen before anything runs out of memory.

    Per token: what the backward keeps (`ModelShape.batch_bytes`, every token counted as
    a response token) and the gradients of the LoRA outputs the hooks capture. Per example
    row, N_lora fp32 values: three copies of a batch's up to `max_batch` rows (the einsum's
    parts, then the Adam direction's two buffers) and the rows waiting for the projection;
    then the moments, one chunk of the sign matrix with its bytes and gather indices, and
    what the projection keeps of the matrix (`held_bytes`)."""
    per_token = shape.batch_bytes(1, act_bytes, backward=True) \
        + shape.layers * shape.train_out * act_bytes
    rows = 4 * n_lora * (held_rows + 3 * max_batch + 2)
    kept = RademacherProjection(n_lora, proj_dim, 0, chunk).held_bytes
    return tokens * per_token + rows + 5 * chunk * proj_dim + kept


def gradient_batch_tokens(free_bytes: float, shape: ModelShape, n_lora: int, *, held_rows: int,
                          proj_dim: int, act_bytes: int = 2, max_batch: int = 64,
                          max_len: int = 512) -> int:
    """The largest per-batch token budget whose `gradient_memory` fits in the free bytes
    (`fit_tokens`), at most max_batch·max_len, beyond which a bigger budget changes no
    batch."""
    kw = dict(held_rows=held_rows, proj_dim=proj_dim, act_bytes=act_bytes,
              max_batch=max_batch)
    return fit_tokens(lambda t: gradient_memory(t, shape, n_lora, **kw), free_bytes,
                      cap=max_batch * max_len)


# -- projection ---------------------------------------------------------------------------

_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _i64(c: int) -> int:
    """The int64 with the bits of the uint64 `c` (torch's integer arithmetic is int64)."""
    c %= 1 << 64
    return c - (1 << 64) if c >= 1 << 63 else c


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> sign-extends)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def sign_words(seed: int, rows: torch.Tensor, words: int) -> torch.Tensor:
    """int64 [len(rows), words]: word w of row i is output i·words + w of splitmix64 seeded
    with `seed`, on `rows`' device. Counter-based, so any row range is generated alone, and
    int64 arithmetic wraps alike on every device: the same bits everywhere."""
    z = rows.to(torch.int64)[:, None] * words + torch.arange(words, device=rows.device)
    z.add_(1).mul_(_i64(_GOLDEN)).add_(_i64(seed))
    z.bitwise_xor_(_srl(z, 30)).mul_(_i64(_MIX1))
    z.bitwise_xor_(_srl(z, 27)).mul_(_i64(_MIX2))
    return z.bitwise_xor_(_srl(z, 31))


class RademacherProjection:
    """x @ R with R ∈ {±1/√k}^{n×k}: R[i, j] > 0 iff bit j mod 64 of `sign_words` word
    j div 64 of row i is set. The matrix is generated on the gradients' own device, a chunk
    of rows at a time, and is the same on every device, so features computed on a CPU and on
    a GPU agree. Within `cache_bytes` per device it is kept between calls: as ±1 fp32 blocks
    if the whole matrix fits (no expansion per call either), else the packed bits of as many
    chunks as fit (at 8B's 6.8M LoRA rows not all do, and the rest are drawn anew per call)."""

    #: LESS's cache keys include it: a new matrix must never meet features of an old one
    version = "splitmix64-1"

    def __init__(self, n: int, k: int, seed: int, chunk: int = 8192,
                 cache_bytes: int = SIGN_CACHE_BYTES):
        self.n, self.k, self.seed, self.chunk = n, k, seed, chunk
        self.words = -(-k // 64)
        self.blocks = -(-n // chunk)
        self.dense = n * k * 4 <= cache_bytes
        bits = n * self.words * 8
        self.kept = (self.blocks if bits <= cache_bytes
                     else cache_bytes // (chunk * self.words * 8))
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        self._tables: dict[str, torch.Tensor] = {}

    def __getstate__(self) -> dict:  # the matrix is rebuilt from the seed, not shipped
        return {**self.__dict__, "_cache": {}, "_tables": {}}

    @property
    def held_bytes(self) -> int:
        """What the cache holds per device once every chunk has been used."""
        if self.dense:
            return self.n * self.k * 4
        return min(self.n, self.kept * self.chunk) * self.words * 8

    def packed(self, c: int, device: torch.device) -> torch.Tensor:
        """uint8 [rows, 8·words]: chunk c's sign bits, byte b of a row holding columns
        8b … 8b+7, lowest bit first."""
        key = (str(device), c)
        if key in self._cache and not self.dense:
            return self._cache[key]
        lo = c * self.chunk
        rows = torch.arange(lo, min(lo + self.chunk, self.n), device=device)
        shifts = torch.arange(0, 64, 8, device=device)
        words = sign_words(self.seed, rows, self.words)
        bits = ((words[..., None] >> shifts) & 255).to(torch.uint8).flatten(1)
        if c < self.kept and not self.dense:
            self._cache[key] = bits
        return bits

    def signs(self, c: int, device: torch.device) -> torch.Tensor:
        """float32 ±1 [rows, k]: chunk c of √k·R (kept if `dense`: read only). Each byte
        looks its 8 signs up in a 256-row table: one gather instead of unpacking bits."""
        key = (str(device), c)
        if self.dense and key in self._cache:
            return self._cache[key]
        if (table := self._tables.get(key[0])) is None:
            table = self._tables[key[0]] = (torch.arange(256, device=device)[:, None]
                                            >> torch.arange(8, device=device) & 1).float() * 2 - 1
        s = F.embedding(self.packed(c, device).int(), table).flatten(1)[:, :self.k]
        if self.dense:
            self._cache[key] = s = s.contiguous()
        return s

    def block(self, c: int) -> torch.Tensor:
        """Rows of R for chunk c, on the CPU."""
        return self.signs(c, torch.device("cpu")) / math.sqrt(self.k)

    def __call__(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Project [rows, n] gradients on their device: one matmul per chunk of R for all
        rows, so each chunk is drawn and read once per call (a list is concatenated first;
        `LESS.features` fills one buffer instead)."""
        if isinstance(x, list):
            x = x[0] if len(x) == 1 else torch.cat(x)
        x = x.float()
        out = torch.zeros(len(x), self.k, device=x.device)
        for c in range(self.blocks):
            lo = c * self.chunk
            out.addmm_(x[:, lo:lo + self.chunk], self.signs(c, x.device))
        return out.div_(math.sqrt(self.k))
