"""LESS on the compute device (issue 22), checked on a CPU: the `meta` device stands for a
GPU (it refuses to meet CPU tensors, as CUDA does); the projection's matrix against a
plain numpy reference of its hash, bit for bit, and its statistics against a numpy
Rademacher matrix; the GPU batch budget for a real 8B model. The tests marked `cuda` run
where a GPU is: CPU and GPU give the same matrix and features, and the memory estimate
bounds the measured peak."""

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ccds import Example
from ccds.models import Runtime, add_lora, load_causal_lm
from ccds.score import get_method, less
from ccds.score.less import (
    ModelShape,
    PoolGradients,
    RademacherProjection,
    gradient_batch_tokens,
    gradient_memory,
    lora_names,
    sign_words,
)
from ccds.train import TrainConfig

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
META = Runtime(torch.device("meta"), None)


def reference_signs(seed: int, n: int, k: int) -> np.ndarray:
    """√k·R from its definition, one entry at a time in numpy's wrapping uint64: entry (i, j)
    is bit j mod 64 of splitmix64's output number i·⌈k/64⌉ + j div 64 for `seed`."""
    u = np.uint64
    i, j = np.meshgrid(np.arange(n, dtype=u), np.arange(k, dtype=u), indexing="ij")
    with np.errstate(over="ignore"):
        z = u(seed) + (i * u(-(-k // 64)) + j // u(64) + u(1)) * u(0x9E3779B97F4A7C15)
        z = (z ^ (z >> u(30))) * u(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> u(27))) * u(0x94D049BB133111EB)
        z = z ^ (z >> u(31))
    return np.where((z >> (j % u(64))) & u(1), 1.0, -1.0).astype(np.float32)


def test_sign_words_are_splitmix64():
    """Vigna's splitmix64.c seeded with 1234567 gives these first outputs."""
    words = sign_words(1234567, torch.tensor([0]), 5).numpy().view(np.uint64)[0]
    assert words.tolist() == [6457827717110365317, 3203168211198807973, 9817491932198370423,
                              4593380528125082431, 16408922859458223821]


@pytest.mark.parametrize(("n", "k", "chunk", "seed"), [(300, 200, 64, 0), (130, 64, 1000, 12345),
                                                      (77, 13, 10, 2**40)])
def test_chunked_signs_match_the_plain_reference_bit_for_bit(n, k, chunk, seed):
    proj = RademacherProjection(n, k, seed, chunk=chunk)
    got = torch.cat([proj.signs(c, torch.device("cpu")) for c in range(-(-n // chunk))])
    assert np.array_equal(got.numpy(), reference_signs(seed, n, k))
    x = torch.randn(3, n)
    ref = x.double() @ torch.from_numpy(reference_signs(seed, n, k)).double() / np.sqrt(k)
    assert torch.allclose(proj(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_projection_statistics_match_a_numpy_rademacher_matrix():
    """Entries ±1 with mean ~0; <Px, Py> estimates <x, y> without bias, with the spread of
    an i.i.d. Rademacher matrix drawn by numpy (what LESS used before), which the theory
    gives as sqrt((|x|²|y|² + <x,y>²) / k)."""
    n, k, pairs = 2048, 256, 400
    signs = torch.cat([RademacherProjection(n, k, seed=1, chunk=512).signs(c, torch.device(
        "cpu")) for c in range(4)])
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(signs.mean().item()) < 0.005  # n·k = 524k signs: sd 0.0014
    assert abs(signs[:, :64].mean(0)).max() < 0.1  # every column balanced (sd 0.022)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(pairs, n, generator=g, dtype=torch.float64)
    y = 0.5 * x + torch.randn(pairs, n, generator=g, dtype=torch.float64)
    x, y = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    true = (x * y).sum(1)
    theory = torch.sqrt((1 + true**2) / k)

    def errors(project):
        px, py = project(x), project(y)
        return ((px * py).sum(1) - true) / theory  # ~ mean 0, sd 1

    ours = errors(lambda v: RademacherProjection(n, k, seed=3)(v).double())
    dense = torch.from_numpy(np.random.default_rng(3).integers(0, 2, (n, k)) * 2.0 - 1)
    numpy = errors(lambda v: v @ dense / np.sqrt(k))
    for e in (ours, numpy):  # 400 pairs: the mean's sd is 0.05, the sd's about 0.035
        assert abs(e.mean().item()) < 0.2 and 0.8 < e.std().item() < 1.2
    assert abs(ours.std().item() - numpy.std().item()) < 0.25


def test_projection_runs_on_the_gradients_device():
    proj = RademacherProjection(300, 64, seed=0, chunk=128)
    z = proj([torch.empty(3, 300, device="meta"), torch.empty(2, 300, device="meta")])
    assert z.device.type == "meta" and z.shape == (5, 64)


class SpyProjection(RademacherProjection):
    """Projects, notes the devices of its input blocks and output, returns CPU zeros."""

    devices: list[list[str]] = []

    def __call__(self, x):
        z = super().__call__(x)
        self.devices.append([p.device.type for p in x] + [z.device.type])
        return torch.zeros(z.shape)  # meta tensors hold no values to copy back


def test_moments_and_projection_on_the_gradients_device(tiny_model_dir, monkeypatch):
    """Defects 1 and 3: the AdamW moments (loaded on the CPU) go to the compute device in
    `setup`, once per checkpoint, locally and on a Ray actor (the pass pickled); each batch's
    gradients stay there and are projected there. Per-example gradients on `meta` stand in
    for the real ones (a forward on `meta` has no lengths to read)."""
    method = get_method("less", model=str(tiny_model_dir), proj_dim=16, project_every=4)
    model, tok, _ = load_causal_lm(str(tiny_model_dir))
    model = add_lora(model, method.warmup_config())
    names = lora_names(model)
    params = dict(model.named_parameters())
    moments = {n: (torch.zeros_like(params[n]), torch.ones_like(params[n])) for n in names}
    n = sum(params[x].numel() for x in names)
    projected = SpyProjection.devices
    def grads(model, batch, names, runtime, kernels=None):
        assert batch.input_ids.device.type == "meta"
        return torch.empty(batch.input_ids.shape[0], n, device="meta")

    monkeypatch.setattr(less, "per_example_grads", grads)
    meter = SimpleNamespace(params={"lora": n}, add=lambda *a: None,
                            lora_step=lambda *a, **k: None)
    examples = [Example(f"e{i}", "word " * (2 + i), "reply") for i in range(6)]
    local = PoolGradients(method, model, tok, names, SpyProjection(n, 16, seed=0), moments)
    shipped = pickle.loads(pickle.dumps(local))  # before `local` moves the model to meta
    for p in (shipped, local):
        projected.clear()
        p.setup(META)
        assert {t.device.type for mv in p.moments.values() for t in mv} == {"meta"}
        assert p(examples, META, meter).shape == (6, 16)
        assert projected and all(set(d) == {"meta"} for d in projected)
    assert all(m.device.type == "cpu" for m, _ in moments.values())  # the caller's stay


def llama_8b_on_meta(lora_r: int):
    """Llama-3.1-8B's architecture (its transformers config), on the meta device, with
    LESS's LoRA: exact shapes and LoRA parameter count, no weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=131072, rope_theta=500000.0,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        model = add_lora(LlamaForCausalLM(cfg), TrainConfig(lora_r=lora_r))
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_8b_gradient_batch_fits_80_gb():
    """Issue 22, defect 4: the old GPU default of 8192 tokens does not fit LESS at 8B on an
    80 GB GPU; the budget from free memory does, and still takes a full-length example."""
    model, n_lora = llama_8b_on_meta(8)
    shape = ModelShape.of(model)
    # trainable widths per layer: LoRA A on q/k/v/o (inputs 4096, outputs 8), B (8 -> q/o
    # 4096, k/v 1024)
    assert shape == ModelShape(32, 4096, 14336, 128256, 4 * 4096 + 4 * 8,
                               4 * 8 + 2 * 4096 + 2 * 1024)
    weights = 2 * sum(p.numel() for p in model.parameters())  # bf16
    free = 80e9 - weights
    kw = dict(held_rows=256, proj_dim=8192)
    tokens = gradient_batch_tokens(free, shape, n_lora, **kw)
    assert gradient_memory(tokens, shape, n_lora, **kw) <= 0.8 * free
    assert gradient_memory(tokens + 64, shape, n_lora, **kw) > 0.8 * free  # the largest
    assert 512 <= tokens < 8192 and tokens % 64 == 0
    assert gradient_memory(8192, shape, n_lora, **kw) > free
    # more LoRA rank or more rows held: less room for activations; more memory: more room
    _, n_wide = llama_8b_on_meta(64)
    assert gradient_batch_tokens(free, shape, n_wide, **kw) < tokens
    assert gradient_batch_tokens(free, shape, n_lora, held_rows=1024, proj_dim=8192) < tokens
    assert gradient_batch_tokens(141e9 - weights, shape, n_lora, **kw) > tokens
    assert gradient_batch_tokens(1e9, shape, n_lora, **kw) == 1  # nothing fits: one example


@cuda
def test_cpu_and_gpu_give_the_same_matrix_and_features():
    proj = RademacherProjection(20000, 8192, seed=5, chunk=4096)
    for c in range(5):
        assert torch.equal(proj.signs(c, torch.device("cuda")).cpu(),
                           proj.signs(c, torch.device("cpu")))
    x = torch.randn(16, 20000)
    got = proj(x.cuda()).cpu()
    assert torch.allclose(got, proj(x), rtol=1e-4, atol=1e-5)


@cuda
def test_gradient_memory_bounds_the_measured_peak():
    """The estimate LESS's GPU batch budget rests on is an upper bound of what a gradient
    pass allocates (a 4-layer Llama, long examples, bf16)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ccds.flops import Meter
    from ccds.models import param_counts, resolve
    from ccds.tokenize import encode

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m").path)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=4096,
                      num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                      pad_token_id=tok.pad_token_id)
    rt = Runtime(torch.device("cuda"), torch.bfloat16)
    model = rt.place(add_lora(LlamaForCausalLM(cfg), TrainConfig(lora_r=8)))
    names = lora_names(model)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    method = get_method("less", batch_tokens=4096, proj_dim=8192, project_every=64)
    proj = RademacherProjection(n_lora, 8192, seed=0)
    examples = [Example(f"e{i}", "word " * 300, "reply " * 150) for i in range(64)]
    enc = encode(examples, tok, 512)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with Meter("less", "selection", None, False, rt.device) as meter:
        meter.params = param_counts(model)
        method.features(model, enc, tok, names, proj, None, rt, meter)
    peak = torch.cuda.max_memory_allocated() - base
    bound = gradient_memory(4096, ModelShape.of(model), n_lora, held_rows=64, proj_dim=8192)
    assert peak <= bound, (peak, bound)
