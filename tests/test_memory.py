"""Memory-aware batches (issue 22): token budgets from the model's shape, the LoRA rank and
free device memory for scoring and training, shown on Llama-3.1-8B's architecture on the
meta device with a GPU's free memory faked; a step split to fit trains the same; models
load straight into their runtime's dtype."""

import copy
import itertools

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_less_device import llama_8b_on_meta

from ccds import Example
from ccds.models import (
    ModelShape,
    Runtime,
    add_lora,
    batch_budget,
    causal_lm,
    head_rows,
    pick_runtime,
)
from ccds.train import TrainConfig, fit_memory, train

GPU = Runtime(torch.device("cuda"), torch.bfloat16)


def _fake_gpu(monkeypatch, free: float):
    """What torch.cuda reports on a GPU with `free` bytes free and nothing cached."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (int(free), int(free)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 0)


def test_cpu_keeps_its_default():
    model, _ = llama_8b_on_meta(8)
    rt = pick_runtime(device="cpu", dtype="fp32")
    assert batch_budget(model, rt) == 8192
    assert batch_budget(model, rt, default=1000, backward=True) == 1000


def test_8b_budgets_fit_80_gb_and_follow_model_rank_and_checkpointing(monkeypatch):
    """At 8B on an 80 GB GPU: scoring fits far more tokens than training, checkpointing
    frees room for several times more, a wider LoRA leaves less, a known response share
    more, and each budget is the largest (in steps of 64) whose estimate stays within 80% of
    free memory."""
    model, n_lora = llama_8b_on_meta(8)
    weights = 2 * sum(p.numel() for p in model.parameters())  # bf16 frozen weights
    free = 80e9 - weights
    _fake_gpu(monkeypatch, free)
    shape = ModelShape.of(model)
    score = batch_budget(model, GPU)
    plain = batch_budget(model, GPU, backward=True)
    ckpt = batch_budget(model, GPU, backward=True, checkpointing=True)
    for tokens, kw, fixed in ((score, {}, 0), (plain, {"backward": True}, 12 * n_lora),
                              (ckpt, {"backward": True, "checkpointing": True}, 12 * n_lora)):
        assert tokens % 64 == 0 and shape.batch_bytes(tokens, 2, **kw) + fixed <= 0.8 * free
        assert tokens == 1 << 17 or shape.batch_bytes(tokens + 64, 2, **kw) + fixed > 0.8 * free
    assert plain >= 1024  # the old 4096-token default would not hold at 8B
    # scoring's head is a fixed chunk, not 10·vocab bytes per token: it reaches the cap
    assert score == 1 << 17 > 8 * plain
    assert batch_budget(model, GPU, backward=True, response_share=0.3) > plain
    assert ckpt > 3 * plain  # then the head, on every response token at once, dominates
    wide, _ = llama_8b_on_meta(256)
    assert batch_budget(wide, GPU, backward=True) < plain
    _fake_gpu(monkeypatch, 141e9 - weights)
    assert batch_budget(model, GPU, backward=True) > plain
    _fake_gpu(monkeypatch, 1e6)
    assert batch_budget(model, GPU) == batch_budget(model, GPU, backward=True) == 1


def test_fp32_budget_is_smaller_than_bf16(monkeypatch):
    model, _ = llama_8b_on_meta(8)
    _fake_gpu(monkeypatch, 60e9)
    fp32 = Runtime(torch.device("cuda"), None)
    assert batch_budget(model, fp32, backward=True) < batch_budget(model, GPU, backward=True)


def test_fit_memory_cuts_rows_in_order():
    lengths = np.array([10, 50, 30, 200, 40, 60, 20])
    batches = [np.array([0, 1, 2, 4, 5, 6]), np.array([3])]
    assert [b.tolist() for b in fit_memory(batches, lengths, None)] == [b.tolist()
                                                                        for b in batches]
    cut = fit_memory(batches, lengths, 130)  # 60 long: two rows per chunk
    assert [b.tolist() for b in cut] == [[0, 1], [2, 4], [5, 6], [3]]  # 200 alone, over
    assert np.concatenate(cut).tolist() == np.concatenate(batches).tolist()


def _examples(n=24):
    return [Example(f"e{i}", f"Say the word number {i % 5} twice{'!' * (i % 7)}.",
                    f"word{i % 5} word{i % 5}") for i in range(n)]


def test_micro_tokens_split_trains_the_same(tiny_model_dir, tmp_path):
    """Cutting each micro-batch into chunks of a few rows gives the same losses and adapter
    (the gradients add up; each chunk is padded to its own longest row, which moves the last
    bits, and Adam's normalised step magnifies those in near-zero gradient entries, hence
    the adapter's relative tolerance), and the split is an execution setting."""
    from ccds.models import load_causal_lm

    runs = {}
    for micro in (None, 64):
        model, tok, _ = load_causal_lm(str(tiny_model_dir))
        cfg = TrainConfig(epochs=2, lr=1e-2, batch_tokens=512, max_batch=8, micro_tokens=micro,
                          measure_flops=False, warmup_ratio=0.1, dtype="fp32")
        runs[micro] = train(_examples(), cfg, model=model, tokenizer=tok,
                            out=tmp_path / str(micro), progress=None)
    assert np.allclose(runs[None].losses, runs[64].losses, rtol=1e-5, atol=1e-6)
    assert runs[None].tokens == runs[64].tokens
    a, b = (load_file(str(tmp_path / str(m) / "adapter" / "adapter_model.safetensors"))
            for m in (None, 64))
    assert all(float((a[k] - b[k]).norm() / a[k].norm()) < 1e-3 for k in a)
    assert "micro_tokens" in TrainConfig.EXECUTION


def test_train_loads_frozen_weights_in_the_runtime_dtype(tiny_model_dir, monkeypatch):
    """train() without a model loads it through its runtime: frozen weights in bf16 from
    the start (never an fp32 copy of a 7B model in host memory), fp32 for full fine-tuning."""
    import ccds.train as tr

    seen = []
    real = tr.load_causal_lm

    def spy(name, **kw):
        seen.append(kw.get("runtime"))
        model, tok, ref = real(name, **kw)
        seen.append({p.dtype for p in model.parameters()})
        return model, tok, ref

    monkeypatch.setattr(tr, "load_causal_lm", spy)
    base = dict(model=str(tiny_model_dir), epochs=1, measure_flops=False, device="cpu")
    train(_examples(4), TrainConfig(**base, dtype="bf16"), progress=None)
    assert seen[0].autocast == torch.bfloat16 and seen[1] == {torch.bfloat16}
    seen.clear()
    train(_examples(4), TrainConfig(**base, dtype="bf16", lora=False), progress=None)
    assert seen[0].autocast is None and seen[1] == {torch.float32}


def test_a_pass_rebuilds_its_model_on_the_runtime(tiny_model_dir):
    """A scoring pass shipped to another process loads its model through the runtime it
    runs on (bf16 weights there from the start), not in fp32 on the host."""
    import pickle
    from functools import partial

    from ccds.score.ppl import SequenceStats

    p = pickle.loads(pickle.dumps(SequenceStats(partial(causal_lm, str(tiny_model_dir)))))
    p.setup(Runtime(torch.device("cpu"), torch.bfloat16))
    assert {x.dtype for x in p.model.parameters()} == {torch.bfloat16}


def test_scoring_asks_for_a_budget_only_when_none_is_given(tiny, monkeypatch):
    import ccds.lm as lm
    from ccds.tokenize import encode

    model, tok, _ = tiny
    asked = []
    monkeypatch.setattr(lm, "batch_budget", lambda m, rt, **kw: asked.append(rt) or 32)
    enc = encode(_examples(6), tok, 64)
    rt = pick_runtime(device="cpu", dtype="fp32")
    a = lm.score_sequences(model, enc, tok.pad_token_id, rt)
    assert asked == [rt]
    b = lm.score_sequences(model, enc, tok.pad_token_id, rt, max_tokens=4096)
    assert asked == [rt]
    assert np.allclose(a["nll_sum"], b["nll_sum"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["ppl", "s2l"])
def test_scoring_batch_tokens_default_to_memory(method):
    from ccds.score import get_method

    assert get_method(method).params.batch_tokens is None


# -- the estimates against a measured peak ------------------------------------------------

def _peak_bytes(fn) -> int:
    """The most bytes torch's CPU allocator held while `fn` ran, above what it held before:
    from the profiler's allocation events, so the same on any OS and malloc (a resident
    set also sees the allocator's caching and fragmentation)."""
    import itertools

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    ev = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in ev), initial=0))


@pytest.fixture(scope="module")
def llama_128k():
    """A random-init 4-layer Llama (d_model 1024) with Llama 3's 128,256-entry vocabulary,
    where the head is what a per-token charge got wrong, and SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ccds.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m").path)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=1024, intermediate_size=4096,
                      num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    return model.eval().requires_grad_(False), tok


# (rows, prompt words, response words): most of the peak in the head, or in the body
SHAPES = {"head": (8, 300, 150), "body": (16, 450, 5)}
STEP_SHAPES = {"head": (4, 300, 150), "body": (8, 450, 5)}  # a backward takes longer


def _batch(tok, rows: int, prompt: int, response: int):
    from ccds.tokenize import collate, encode

    enc = encode([Example(f"e{i}", "word " * prompt, "reply " * response)
                  for i in range(rows)], tok, 1024)
    batch = collate(enc, np.arange(rows), tok.pad_token_id)
    tokens = batch.input_ids.numel()
    return enc, batch, tokens, float(batch.n_response.sum()) / tokens


@pytest.mark.parametrize("dtype,own", [("fp32", True), ("bf16", True), ("fp32", False)],
                         ids=["fp32", "bf16", "fp32-transformers"])
def test_scoring_estimate_bounds_the_measured_peak(llama_128k, dtype, own, monkeypatch):
    """Issue 31: one scoring batch's peak (after a warm-up) lies between 1/1.5 of the
    estimate and the estimate, with the head's chunk (`head_rows` positions, 64 on a CPU:
    64 MB here) the peak or the body's transients the peak (the old 10·vocab bytes per token: 5-40x it);
    through ccds's own forward and through transformers' (`own`)."""
    from ccds import decoder
    from ccds.lm import score_sequences

    model, tok = llama_128k
    assert decoder.supports(model)
    if not own:
        monkeypatch.setattr(decoder, "supports", lambda base: False)
    rt = Runtime(torch.device("cpu"), torch.bfloat16 if dtype == "bf16" else None)
    if dtype == "bf16":
        model = copy.deepcopy(model).to(torch.bfloat16)
    act = 2 if dtype == "bf16" else 4
    for shape, dims in SHAPES.items():
        enc, _, tokens, share = _batch(tok, *dims)

        def run(enc=enc, tokens=tokens):
            score_sequences(model, enc, tok.pad_token_id, rt, max_tokens=tokens)

        run()
        peak = _peak_bytes(run)
        est = ModelShape.of(model).batch_bytes(tokens, act, response_share=share,
                                               own_forward=own, head_rows=head_rows(rt.device))
        assert peak <= est <= 1.5 * peak, (shape, peak / 1e6, est / 1e6)
        # share 1.0: safe
        assert est <= ModelShape.of(model).batch_bytes(tokens, act, own_forward=own,
                                                       head_rows=head_rows(rt.device))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lora_step_estimate_bounds_the_measured_peak(llama_128k, dtype):
    """The same for a LoRA step's forward and backward (TrainConfig's adapters): the frozen
    head's chunk and its states' gradient per response token, the body's saved activations
    on every token."""
    from ccds.lm import own_kernels, response_nll

    base, tok = llama_128k
    rt = Runtime(torch.device("cpu"), torch.bfloat16 if dtype == "bf16" else None)
    base = copy.deepcopy(base).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    model = add_lora(base, TrainConfig())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    act = 2 if dtype == "bf16" else 4
    own = own_kernels(model, rt)
    assert own is not None
    for (shape, dims), kernels in itertools.product(STEP_SHAPES.items(), (None, own)):
        _, batch, tokens, share = _batch(tok, *dims)

        def step(batch=batch, kernels=kernels):  # ccds's own forward, or transformers'
            model.train()
            with rt.amp():
                nll, n = response_nll(model, batch, suffix=True, kernels=kernels)
            (nll.sum() / n.sum()).backward()

        step()
        model.zero_grad(set_to_none=True)
        peak = _peak_bytes(step)
        model.zero_grad(set_to_none=True)
        est = 4 * trainable + ModelShape.of(model).batch_bytes(
            tokens, act, backward=True, response_share=share, head_rows=head_rows(rt.device))
        assert peak <= est <= 1.5 * peak, (shape, kernels is None, peak / 1e6, est / 1e6)
