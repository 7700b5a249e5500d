"""LESS: batched per-example gradients, Adam preconditioning, projection, end to end."""

import numpy as np
import pytest
import torch

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


@pytest.fixture()
def lora_model(tiny):
    model, tok, _ = tiny
    peft = add_lora(model, TrainConfig(lora_r=4, lora_dropout=0.1))
    with torch.no_grad():  # LoRA B starts at zero; give it values so every gradient is live
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return peft, tok


def test_batched_per_example_grads_match_one_at_a_time(lora_model):
    model, tok = lora_model
    ex = [Example(f"e{i}", "word " * (2 + 4 * i), "reply " * (1 + 2 * (i % 3))) for i in range(6)]
    enc = encode(ex, tok)
    names = lora_names(model)
    rt = pick_runtime(dtype="fp32")  # exactness is an fp32 property
    batched = per_example_grads(model, collate(enc, np.arange(6), tok.pad_token_id), names, rt)
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
    # the matrix is a fixed function of (seed, chunk index) through numpy's PCG64, which is
    # the same on every platform: pin some of its signs
    proj = RademacherProjection(3000, 512, seed=7, chunk=1000)
    block = proj.block(0)
    assert torch.allclose(block.abs(), torch.full_like(block, 512 ** -0.5))
    assert (block[0, :16] > 0).int().tolist() == [1, 0, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 0]
    assert (block[999, -8:] > 0).int().tolist() == [1, 0, 0, 1, 1, 1, 0, 0]
    assert (proj.block(2)[0, :8] > 0).int().tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    # the byte lookup gives exactly the unpacked signs, also when k is not a multiple of 8
    odd = RademacherProjection(100, 13, seed=3, chunk=40)
    signs = np.unpackbits(odd._bits(1), axis=1, count=13).astype(np.float32) * 2 - 1
    assert torch.equal(odd.block(1), torch.from_numpy(signs) / np.sqrt(13))
    assert odd.block(2).shape == (20, 13)


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


def test_gradient_batches_are_small_on_a_cpu_and_large_on_a_gpu():
    """On a CPU an example's matmuls are already large and a bigger batch's activations
    outgrow the caches (benchmarks/speed_lm.py); a GPU wants many examples per call."""
    from ccds.models import Runtime

    assert get_method("less").batch_tokens(pick_runtime(device="cpu", dtype="fp32")) == 512
    assert get_method("less").batch_tokens(Runtime(torch.device("cuda"), torch.bfloat16)) == 8192
    assert get_method("less", batch_tokens=64).batch_tokens(pick_runtime(dtype="fp32")) == 64
