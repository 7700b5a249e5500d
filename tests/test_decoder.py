"""ccds's own decoder forward (`decoder.states`) against transformers' forward, the plain
reference: the same hidden states for every architecture it serves, LoRA-wrapped models,
rows of any lengths (several attention groups, with and without padding), eager and
compiled kernels; and the passes in lm.py take it with batches packed by real tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccds import decoder
from ccds.flops import FlopCounter
from ccds.lm import mean_hidden, score_sequences
from ccds.models import add_lora, pick_runtime
from ccds.tokenize import Encoded, collate, token_batches

LENGTHS = [23, 23, 22, 17, 16, 9, 9, 31, 3, 1, 0]  # unsorted: groups with pads, without,
# alone, and an empty row


def _model(kind: str, **extra):
    import transformers as tf

    config, model = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                     "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
                     "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[kind]
    torch.manual_seed(0)
    cfg = config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 **extra)
    return model(cfg).eval().requires_grad_(False)


def _batch(lengths=LENGTHS, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, 97, n) for n in lengths]
    enc = Encoded(ids, np.array([n - min(4, max(n - 1, 0)) for n in lengths]),
                  np.zeros(len(ids), int))
    return enc, collate(enc, np.arange(len(ids)), 0)


def _agree(model, batch, kernels=decoder.EAGER, atol=2e-5):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        ref = base.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids).last_hidden_state
        got = decoder.states(base, batch, kernels)
    real = batch.attention_mask.bool()
    assert got.shape == (int(real.sum()), ref.shape[-1])  # the real tokens, row by row
    assert torch.allclose(got, ref[real], atol=atol, rtol=1e-4), (got - ref[real]).abs().max()
    padded = decoder.unflatten(got, batch)
    assert torch.equal(padded[real], got) and not padded[~real].any()  # zeros at the padding
    where = decoder.positions(batch)
    assert (where[batch.attention_mask.reshape(-1).numpy() == 0] == -1).all()
    assert torch.equal(got[where[where >= 0]], got)


@pytest.mark.parametrize("kind,extra", [
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 32}),
    ("mistral", {"sliding_window": None}),
    ("qwen2", {}),  # biases on q/k/v
], ids=["llama", "llama-bias-headdim", "mistral", "qwen2"])
def test_same_states_as_the_models_own_forward(kind, extra):
    model = _model(kind, **extra)
    assert decoder.supports(model)
    _agree(model, _batch()[1])


def _lora(model, dropout: float = 0.0, targets=("q_proj", "v_proj", "gate_proj")):
    class Lora:
        lora_r, lora_alpha, lora_dropout, seed = 4, 8, dropout, 0
        target_modules = list(targets)

    model = add_lora(model, Lora())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # a trained adapter: B is no longer zero
                p.normal_(0, 0.2)
    return model


def test_lora_layers_give_peft_numbers():
    """Adapters computed beside their base (q and v adapted, k not: one A matmul for two
    adapters; gate alone) give peft's numbers; dropout, when training, is drawn (over the
    real tokens only, so not peft's masks over the padded batch); a layer with a hook
    (LESS's capture) is called as it is."""
    _agree(_lora(_model("llama")).eval(), _batch()[1])
    model = _lora(_model("llama"), dropout=0.3).train()
    _, batch = _batch()
    base = model.get_base_model()
    with torch.no_grad():
        drawn = [torch.manual_seed(1) and decoder.states(base, batch) for _ in range(2)]
        assert torch.equal(*drawn)
        assert not torch.allclose(drawn[0], decoder.states(base.eval(), batch), atol=1e-3)
    model.eval()
    seen = []
    a = base.model.layers[1].self_attn.v_proj.lora_A["default"]
    handle = a.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    _agree(model, batch)
    handle.remove()
    assert len(seen) == 2  # the reference forward and decoder.states


def test_models_it_does_not_serve_run_their_own_forward():
    assert not decoder.supports(_model("mistral", sliding_window=8))
    assert not decoder.supports(_model("qwen2", use_sliding_window=True, sliding_window=8))
    assert not decoder.supports(_model("llama", hidden_act="gelu"))


@pytest.mark.slow
def test_compiled_kernels_give_the_eager_numbers():
    """Fused by torch.compile (inductor; a C++ compiler here), the same states to fp32
    rounding, and one compiled set serves every batch shape (dynamic shapes)."""
    model = _model("llama")
    kernels = decoder.compiled()
    for seed, lengths in enumerate([LENGTHS, [40, 38, 5], [7]]):
        _agree(model, _batch(lengths, seed)[1], kernels, atol=1e-4)


def test_token_batches_pack_real_tokens_longest_first():
    lengths = np.array([5, 300, 40, 41, 7, 200, 1, 99])
    batches = token_batches(lengths, 256, max_rows=3)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    flat = np.concatenate(batches)
    assert (np.diff(lengths[flat]) <= 0).all()  # longest first
    for b in batches:
        assert len(b) <= 3 and (lengths[b].sum() <= 256 or len(b) == 1)
    assert [len(b) for b in batches] == [1, 1, 3, 3]  # 300 alone; 200 alone (200+99>256)


def test_a_batch_of_empty_rows_gives_no_states():
    model = _model("llama")
    _, batch = _batch([0, 0])
    with torch.no_grad():
        assert decoder.states(model, batch).shape == (0, 64)


def test_a_misspelt_compile_setting_says_what_to_set(monkeypatch):
    from ccds.errors import CcdsError

    monkeypatch.setenv("CCDS_COMPILE", "true")
    with pytest.raises(CcdsError, match="auto, on or off"):
        decoder.compile_setting()


def test_compile_cost_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # an empty cache
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not decoder.compile_pays("auto", cpu, None)  # unknown: do not pay to find out
    assert not decoder.compile_pays("auto", cpu, decoder.COMPILE_SECONDS)  # saves too little
    assert decoder.compile_pays("auto", cpu, 2 * decoder.COMPILE_SECONDS / decoder.COMPILE_SAVES)
    assert not decoder.compile_pays("auto", gpu, 1e6)  # not measured there: opt in
    assert decoder.compile_pays("on", gpu, None) and not decoder.compile_pays("off", cpu, 1e6)


def test_a_cached_build_makes_compiling_pay_sooner(tmp_path, monkeypatch):
    """Once a process has compiled the kernels for a dtype into inductor's cache, later
    processes price compiling at the cached build's cost, for that dtype only."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    between = (decoder.WARM_COMPILE_SECONDS + decoder.COMPILE_SECONDS) / 2 / decoder.COMPILE_SAVES
    assert decoder.compile_seconds(bf16) == decoder.COMPILE_SECONDS
    assert not decoder.compile_pays("auto", cpu, between, bf16)
    guarded = decoder._guarded(decoder._swiglu, decoder._swiglu)  # a build that works
    for name in ("rms", "add_rms", "rope"):
        decoder._mark_built(name, bf16)
    guarded(torch.ones(2, 3, dtype=bf16), torch.ones(2, 3, dtype=bf16))  # with gradients
    assert decoder.compile_seconds(bf16) == decoder.COMPILE_SECONDS  # another graph
    with torch.no_grad():
        guarded(torch.ones(2, 3, dtype=bf16), torch.ones(2, 3, dtype=bf16))
    assert decoder.compile_seconds(bf16) == decoder.WARM_COMPILE_SECONDS
    assert decoder.compile_pays("auto", cpu, between, bf16)
    assert not decoder.compile_pays("auto", cpu, between, torch.float32)


def test_a_build_from_another_kind_of_cpu_is_not_warm(tmp_path, monkeypatch):
    """A cache directory shared across machines (a network home): a build marked on a CPU
    with other instruction sets does not make this one price compiling as cached."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    here = decoder.cpu_info()
    monkeypatch.setattr(decoder, "cpu_info", lambda: ("Other CPU", frozenset({"avx2"})))
    for name in decoder.Kernels._fields:
        decoder._mark_built(name, torch.bfloat16)
    assert decoder.compile_seconds(torch.bfloat16) == decoder.WARM_COMPILE_SECONDS
    monkeypatch.setattr(decoder, "cpu_info", lambda: here)
    assert decoder.compile_seconds(torch.bfloat16) == decoder.COMPILE_SECONDS


def test_a_failed_build_leaves_no_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    with pytest.warns(UserWarning, match="running eager"):
        decoder._guarded(broken, decoder._swiglu)(torch.ones(2), torch.ones(2))
    assert not list(tmp_path.rglob("swiglu-*"))


def test_a_counted_call_runs_eager_and_the_next_one_compiles(tmp_path, monkeypatch):
    """Under a Meter's FLOP counter (a dispatch mode) dynamo would run the call eager and
    skip the function for good: the guard runs it eager itself, and compiles after."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    calls = []

    def fast(*args):
        calls.append("fast")
        return decoder._swiglu(*args)

    run = decoder._guarded(fast, decoder._swiglu)
    with FlopCounter():
        run(torch.ones(2), torch.ones(2))
    assert calls == [] and not list(tmp_path.rglob("swiglu-*"))  # no build claimed
    run(torch.ones(2), torch.ones(2))
    assert calls == ["fast"] and list(tmp_path.rglob("swiglu-*"))


@pytest.mark.slow
def test_kernels_first_called_under_the_counter_still_compile(tmp_path, monkeypatch):
    """What the guard is for, with dynamo itself: inductor writes the build after a counted
    first call (without the guard it never does in that process)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    rms = decoder._guarded(torch.compile(decoder._rms, dynamic=True), decoder._rms)
    x, w = torch.randn(8, 16), torch.ones(16)
    with FlopCounter():
        rms(x, w, 1e-6)
    assert torch.allclose(rms(x, w, 1e-6), decoder._rms(x, w, 1e-6), atol=1e-6)
    assert list(tmp_path.rglob("*.py")), "inductor built nothing"


def test_passes_take_it_and_keep_their_numbers(monkeypatch):
    """score_sequences and mean_hidden through decoder.states (packed batches) and through
    the model's own forward (length batches): the same numbers in fp32."""
    model = _model("llama")
    enc, _ = _batch(LENGTHS[:-1])  # transformers' forward cannot take a batch of one empty row
    rt = pick_runtime(dtype="fp32")
    fast = score_sequences(model, enc, 0, rt, max_tokens=64)
    hidden = mean_hidden(model, enc, 0, rt, max_tokens=64)
    monkeypatch.setattr(decoder, "supports", lambda base: False)
    plain = score_sequences(model, enc, 0, rt, max_tokens=64)
    assert np.allclose(fast["nll_sum"], plain["nll_sum"], rtol=1e-5)
    assert (fast["n_tokens"] == plain["n_tokens"]).all()
    assert np.allclose(hidden, mean_hidden(model, enc, 0, rt, max_tokens=64), atol=1e-5)


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "checkpointing"])
def test_training_gradients_equal_the_models_own(recompute, monkeypatch):
    """A LoRA step's gradients through decoder.states (with the model's gradient
    checkpointing: each layer recomputed in the backward) and through its own forward."""
    from ccds.lm import response_nll

    model = _lora(_model("llama"), targets=["q_proj", "k_proj", "o_proj", "down_proj"]).train()
    if recompute:
        model.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
    _, batch = _batch()
    calls = []
    real = decoder.checkpoint
    monkeypatch.setattr(decoder, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    grads = []
    for kernels in (decoder.EAGER, None):
        model.zero_grad()
        nll, n = response_nll(model, batch, suffix=True, kernels=kernels)
        (nll.sum() / n.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()
                                if p.requires_grad]))
    assert grads[1].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    assert len(calls) == (3 if recompute else 0)  # each of the 3 layers recomputed


def test_small_passes_skip_the_rate_measurement_and_run_eager(monkeypatch):
    """A pass too small for compiling to pay even on a slow CPU neither measures the matmul
    rate (0.6 s, once per machine) nor compiles; a large one asks the cost model."""
    import ccds.lm as lm

    model = _model("llama")
    enc, _ = _batch()
    rt = pick_runtime(dtype="fp32")
    monkeypatch.setenv("CCDS_COMPILE", "auto")
    monkeypatch.setattr(lm, "cpu_matmul_gflops", lambda: pytest.fail("measured"))
    assert lm._no_grad_pass(model, enc, rt, 64).kernels is decoder.EAGER
    monkeypatch.setattr(decoder, "NEVER_PAYS_BELOW", 0)
    monkeypatch.setattr(lm, "cpu_matmul_gflops", lambda: {"fp32": 1e-6, "bf16": 1e-6})
    asked = []
    monkeypatch.setattr(decoder, "kernels_for",
                        lambda s, d, dt: asked.append(s) or decoder.EAGER)
    lm._no_grad_pass(model, enc, rt, 64)
    assert asked[0] > decoder.COMPILE_SECONDS / decoder.COMPILE_SAVES  # slow: it would pay


def test_dora_layers_are_called_as_they_are():
    """DoRA rescales the adapted weight: not the base + A·B formula `_project` computes, so
    its layers run peft's own forward, and the states still agree."""
    from peft import LoraConfig

    model = add_lora(_model("llama"), LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                 target_modules=["q_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert decoder._parts(q) is None
    _agree(model.eval(), _batch()[1])


@pytest.mark.parametrize("heads,groups,width", [(4, 2, 7), (3, 3, 5), (2, 1, 1)])
def test_math_backward_gives_sdpas_gradients(heads, groups, width):
    """`_MathBackward` (the CPU training path for short rows) against SDPA's own autograd:
    grouped and plain heads, a one-token row; fp32 to rounding."""
    torch.manual_seed(0)
    qkv = [torch.randn(3, h, width, 8) for h in (heads, groups, groups)]
    grad_out = torch.randn(3, heads, width, 8)
    got = []
    for attend in (lambda q, k, v: decoder._MathBackward.apply(q, k, v, 0.3),
                   lambda q, k, v: F.scaled_dot_product_attention(
                       q, k, v, is_causal=True, scale=0.3, enable_gqa=heads != groups)):
        leaves = [t.clone().requires_grad_() for t in qkv]
        out = attend(*leaves)
        out.backward(grad_out)
        got.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*got, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
