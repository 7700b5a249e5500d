"""LESS: batched per-example gradients, Adam preconditioning, projection, end to end."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ccds import Example
from ccds.lm import response_nll
from ccds.models import add_lora, pick_runtime
from ccds.score import get_method, run
from ccds.score.less import (
    RademacherProjection,
    adam_direction,
    lora_names,
    per_example_grads,
)
from ccds.tokenize import collate, encode
from ccds.train import TrainConfig

# signs of R for seed 7, k = 512: row 0's first 16, row 999's last 8, row 2000's first 8
PINNED = [[1, 1, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 1, 1, 1, 0],
          [1, 1, 1, 1, 1, 1, 1, 0]]


@pytest.fixture()
def lora_model(tiny):
    model, tok, _ = tiny
    peft = add_lora(model, TrainConfig(lora_r=4, lora_dropout=0.1))
    with torch.no_grad():  # LoRA B starts at zero; give it values so every gradient is live
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return peft, tok


@pytest.mark.parametrize("own", [True, False], ids=["ccds-forward", "transformers-forward"])
def test_batched_per_example_grads_match_one_at_a_time(lora_model, own):
    """One backward for the batch (through ccds's own forward, whose hooks see [N, ·] real
    tokens, or the model's, [B, W, ·]) against a backward per example (the model's)."""
    from ccds.lm import own_kernels

    model, tok = lora_model
    ex = [Example(f"e{i}", "word " * (2 + 4 * i), "reply " * (1 + 2 * (i % 3))) for i in range(6)]
    enc = encode(ex, tok)
    names = lora_names(model)
    rt = pick_runtime(dtype="fp32")  # exactness is an fp32 property
    kernels = own_kernels(model, rt) if own else None
    assert (kernels is not None) == own
    batched = per_example_grads(model, collate(enc, np.arange(6), tok.pad_token_id), names, rt,
                                kernels)
    assert batched.shape == (6, sum(p.numel() for n, p in model.named_parameters()
                                    if n in names))
    params = dict(model.named_parameters())
    model.eval()
    for i in range(6):
        model.zero_grad()
        nll, n = response_nll(model, collate(enc, np.array([i]), tok.pad_token_id), suffix=True)
        (nll / n).sum().backward()
        ref = torch.cat([params[nm].grad.flatten() for nm in names])
        cos = torch.nn.functional.cosine_similarity(ref, batched[i], dim=0)
        assert cos >= 0.999
        err = (ref - batched[i]).abs().max() / ref.abs().max()
        assert err < 1e-4


def test_adam_direction_formula():
    g = torch.tensor([[1.0, -2.0]])
    m, v = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 1.0])
    got = adam_direction(g, ["w"], {"w": (m, v)})
    m2 = 0.9 * m + 0.1 * g
    v2 = 0.999 * v + 0.001 * g * g
    assert torch.allclose(got, m2 / torch.sqrt(v2 + 1e-8))


def test_projection_is_seeded_chunk_invariant_and_norm_preserving():
    x = torch.randn(5, 3000)
    a = RademacherProjection(3000, 512, seed=7, chunk=1000)(x)
    b = RademacherProjection(3000, 512, seed=7, chunk=1000, cache_bytes=0)(x)
    c = RademacherProjection(3000, 512, seed=8, chunk=1000)(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    ratio = a.norm(dim=1) / x.norm(dim=1)
    assert torch.all((ratio > 0.8) & (ratio < 1.2))  # Johnson–Lindenstrauss
    # R is a function of (seed, row, column) alone: another chunking is the same matrix
    proj = RademacherProjection(3000, 512, seed=7, chunk=1000)
    other = RademacherProjection(3000, 512, seed=7, chunk=777)
    full = torch.cat([proj.block(i) for i in range(3)])
    assert torch.equal(full, torch.cat([other.block(i) for i in range(4)]))
    assert torch.allclose(other(x), a, rtol=1e-5, atol=1e-5)
    assert torch.allclose(full.abs(), torch.full_like(full, 512 ** -0.5))
    # pinned signs (tests/test_less_device.py checks them all against a numpy reference)
    assert (full[0, :16] > 0).int().tolist() == PINNED[0]
    assert (full[999, -8:] > 0).int().tolist() == PINNED[1]
    assert (full[2000, :8] > 0).int().tolist() == PINNED[2]
    # k not a multiple of 8 (or of 64): the first k columns, a short last chunk
    odd = RademacherProjection(100, 13, seed=3, chunk=40)
    assert odd.block(2).shape == (20, 13)
    wide = RademacherProjection(100, 64, seed=3, chunk=40)  # the same one word per row
    assert torch.equal(odd.block(1) > 0, wide.block(1)[:, :13] > 0)


def test_less_end_to_end_on_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    from ccds.data.synth import generate

    monkeypatch.setenv("CCDS_CACHE", str(tmp_path / "a"))
    pool, targets = generate(seed=0, n_pool=120, n_val=4, n_test=4)
    dates = next(t for t in targets if t.name == "synth-dates")  # two subtasks
    lists = next(t for t in targets if t.name == "synth-lists")

    def less():
        return get_method("less", model=str(tiny_model_dir), proj_dim=64,
                          warmup_fraction=0.1, warmup_epochs=2, lr=1e-2)

    s = run(less(), pool, dates, cache=None)
    assert s.values.shape == (120,) and np.isfinite(s.values).all()
    st = s.stage
    assert st.detail["reused_flops"] == 0
    assert st.analytic_flops == pytest.approx(less().cost(pool, dates), rel=0.05)
    assert st.measured_flops == pytest.approx(st.analytic_flops, rel=0.1)
    # a second target reuses the warmup and pool features: only V is new work, but the
    # ledger still charges LESS's full price
    other = run(less(), pool, lists, cache=None).stage
    assert other.detail["reused_flops"] > 0.8 * other.analytic_flops
    assert other.measured_flops < 0.3 * other.analytic_flops
    assert other.analytic_flops == pytest.approx(less().cost(pool, lists), rel=0.05)
    # reused features and a fresh computation elsewhere give the same scores
    assert np.allclose(run(less(), pool, dates, cache=None).values, s.values, atol=1e-6)
    monkeypatch.setenv("CCDS_CACHE", str(tmp_path / "b"))
    assert np.allclose(run(less(), pool, dates, cache=None).values, s.values, atol=1e-6)


def test_gradient_batches_are_small_on_a_cpu_and_fill_a_gpus_free_memory(lora_model,
                                                                         monkeypatch):
    """On a CPU an example's matmuls are already large and a bigger batch's activations
    outgrow the caches (benchmarks/speed_lm.py); a GPU wants as many examples per call as
    its free memory holds (issue 22), counting what the caching allocator holds unused."""
    from ccds.models import Runtime
    from ccds.score.less import ModelShape, gradient_batch_tokens

    model, _ = lora_model
    assert get_method("less").batch_tokens(pick_runtime(device="cpu", dtype="fp32")) == 512
    assert get_method("less", batch_tokens=64).batch_tokens(pick_runtime(dtype="fp32")) == 64
    gpu = Runtime(torch.device("cuda"), torch.bfloat16)
    assert get_method("less", batch_tokens=64).batch_tokens(gpu, model) == 64
    with pytest.raises(ValueError, match="model"):
        get_method("less").batch_tokens(gpu)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 1 << 30)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    got = {}
    for free in (1 << 30, 80 << 30):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d, f=free: (f, 80 << 30))
        got[free] = get_method("less", proj_dim=1024).batch_tokens(gpu, model)
        assert got[free] == gradient_batch_tokens(free + (2 << 30), ModelShape.of(model),
                                                  n_lora, held_rows=256, proj_dim=1024,
                                                  act_bytes=2, max_len=512)
    assert 512 <= got[1 << 30] < got[80 << 30] == 64 * 512  # 64 rows of max_len at most


class _Ops(TorchDispatchMode):
    """Counts aten ops by name (overload dropped)."""

    def __init__(self):
        super().__init__()
        self.n: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.n[name] = self.n.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def matmuls(self) -> int:
        return sum(v for k, v in self.n.items() if k.rstrip("_") in ("mm", "addmm", "bmm"))


def _reference(proj: RademacherProjection, parts: list[torch.Tensor]) -> torch.Tensor:
    """The projection as it ran before issue 31: one thin matmul per part per chunk."""
    out = [torch.zeros(len(p), proj.k) for p in parts]
    for c in range(proj.blocks):
        s = proj.signs(c, torch.device("cpu"))
        for o, p in zip(out, parts, strict=True):
            o.addmm_(p[:, c * proj.chunk:(c + 1) * proj.chunk], s)
    return torch.cat(out) / proj.k ** 0.5


def test_projection_is_one_matmul_per_chunk_for_all_waiting_rows():
    """Issue 31: the rows waiting for a flush meet each chunk of R in one matmul (3 parts × 3
    chunks: 3 matmuls, not 9), with the old per-part result."""
    parts = [torch.randn(r, 3000) for r in (2, 3, 1)]
    proj = RademacherProjection(3000, 512, seed=7, chunk=1000)
    with _Ops() as ops:
        got = proj(parts)
    assert ops.matmuls() == 3
    assert torch.allclose(got, _reference(proj, parts), rtol=1e-5, atol=1e-5)  # fp32 rounding
    one = torch.cat(parts)
    with _Ops() as ops:
        assert torch.equal(proj(one), got)
    assert ops.matmuls() == 3


def test_sign_chunks_are_drawn_once_across_flushes_within_the_budget(monkeypatch):
    """Chunks kept within `cache_bytes` are drawn once across calls, whether or not the
    whole matrix fits: packed bits for the first chunks that fit, or if all of it fits, its
    ±1 fp32 blocks (no per-call expansion either); the lookup table is built once."""
    import ccds.score.less as less

    drawn: list[int] = []
    real = less.sign_words
    monkeypatch.setattr(less, "sign_words",
                        lambda seed, rows, words: drawn.append(int(rows[0])) or real(seed, rows,
                                                                                    words))
    x = torch.randn(4, 3000)
    ref = RademacherProjection(3000, 512, seed=7, chunk=1000, cache_bytes=0)
    want = ref(x)
    drawn.clear()
    part = RademacherProjection(3000, 512, seed=7, chunk=1000, cache_bytes=130_000)
    for _ in range(2):
        assert torch.equal(part(x), want)
    assert sorted(drawn) == [0, 1000, 2000, 2000]  # the third chunk is over the budget
    assert (part.kept, part.dense, part.held_bytes) == (2, False, 128_000)  # 64,000 a chunk
    drawn.clear()
    dense = RademacherProjection(3000, 512, seed=7, chunk=1000)
    assert dense.dense and dense.held_bytes == 3000 * 512 * 4
    assert torch.equal(dense(x), want)
    with _Ops() as ops:
        assert torch.equal(dense(x), want)
    assert sorted(drawn) == [0, 1000, 2000] and "embedding" not in ops.n
    assert dense.signs(1, torch.device("cpu")) is dense.signs(1, torch.device("cpu"))
    assert len(dense._tables) == 1


class _Counted(RademacherProjection):
    """Records the rows of each call."""

    def __call__(self, x):
        self.calls.append(len(x))
        return super().__call__(x)


def test_features_project_each_row_once_whatever_the_flush_size(lora_model):
    """The rows wait in one buffer of `project_every` rows; a batch that would overflow it
    flushes it first, one bigger than it is projected alone: the same features either way."""
    from ccds.flops import Meter
    from ccds.models import param_counts
    from ccds.tokenize import length_batches

    model, tok = lora_model
    ex = [Example(f"e{i}", "word " * (2 + 3 * (i % 5)), "reply " * (1 + i % 4)) for i in range(11)]
    enc = encode(ex, tok)
    sizes = {len(b) for b in length_batches(enc.lengths, 256)}
    assert max(sizes) > 3  # some batch is projected alone at project_every 3
    names = lora_names(model)
    rt = pick_runtime(dtype="fp32")
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    got = {}
    for every in (1, 3, 256):
        proj = _Counted(n, 64, seed=0, chunk=500)
        proj.calls = []
        method = get_method("less", proj_dim=64, project_every=every, batch_tokens=256)
        with Meter("less", "selection", None, False, rt.device) as meter:
            meter.params = param_counts(model)
            got[every] = method.features(model, enc, tok, names, proj, None, rt, meter)
        assert sum(proj.calls) == len(ex)
        assert all(c <= every or c in sizes for c in proj.calls)
    assert proj.calls == [len(ex)]
    assert np.allclose(got[1], got[256], atol=1e-6) and np.allclose(got[3], got[256], atol=1e-6)
    assert np.allclose(np.linalg.norm(got[256], axis=1), 1, atol=1e-5)
