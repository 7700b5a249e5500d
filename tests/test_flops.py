"""The ledger's analytic counts agree with FlopCounterMode (spec §2): on the real SmolLM2,
and on tiny random-init models of the families whose architecture departs from Llama's."""

import numpy as np
import pytest
import torch

from ccds import Example
from ccds.flops import (
    FlopCounter,
    Ledger,
    Meter,
    forward_flops,
    generation_flops,
    lora_step_flops,
    paper_flops,
)
from ccds.lm import response_nll
from ccds.models import add_lora, param_counts
from ccds.tokenize import Batch, collate, encode
from ccds.train import TrainConfig


def _batch(tok, n=4, words=40):
    ex = [Example(f"e{i}", " ".join(f"word{i}{j}" for j in range(words)), f"answer {i} " * 8)
          for i in range(n)]
    enc = encode(ex, tok, 512)
    return collate(enc, np.arange(n), tok.pad_token_id)


def test_param_counts_smollm2(smollm2):
    model, _, _ = smollm2
    p = param_counts(model)
    assert p["total"] == 134_515_008
    assert p["embedding"] == p["head"] == 49152 * 576  # tied LM head
    assert p["non_embedding"] == p["total"] - p["embedding"]
    assert (p["n_layer"], p["d_model"]) == (30, 576)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_forward_analytic_matches_measured(smollm2, attn):
    model, tok, _ = smollm2
    model.set_attn_implementation(attn)
    batch = _batch(tok)
    with Meter("fwd", "selection", param_counts(model)) as m, torch.no_grad():
        response_nll(model, batch)
        m.forward(batch)
    s = m.stage
    assert s.measured_flops > 0
    assert abs(s.analytic_flops / s.measured_flops - 1) < 0.05
    # the paper's convention leaves out attention and counts the head on no token
    assert s.paper_flops == paper_flops(param_counts(model), s.tokens, training=False)
    model.set_attn_implementation("sdpa")


def test_lora_step_analytic_matches_measured(smollm2):
    model, tok, _ = smollm2
    peft_model = add_lora(model, TrainConfig())
    try:
        p = param_counts(peft_model)
        assert p["lora"] == 30 * 16 * 2 * (576 + 576) + 30 * 16 * 2 * (576 + 192)
        batch = _batch(tok)
        with Meter("step", "training", p) as m:
            nll, n = response_nll(peft_model, batch, suffix=True)
            (nll.sum() / n.sum()).backward()
            m.lora_step(batch)
        s = m.stage
        assert abs(s.analytic_flops / s.measured_flops - 1) < 0.05
        # LoRA ≈ 4·N·T + 6·N_lora·T: well under full fine-tuning's 6·N·T
        assert s.analytic_flops < 0.8 * 6 * (p["non_embedding"] + p["head"]) * s.tokens
    finally:
        peft_model.unload()


def test_formulas_scale_linearly():
    p = {"non_embedding": 100, "active": 100, "head": 10, "lora": 1, "n_layer": 2,
         "d_model": 4, "d_attn": 4}
    from ccds.flops import Work

    w1, w2 = Work(), Work()
    w1.add([8], head_tokens=3, padded=8)
    w2.add([8, 8], head_tokens=6, padded=16)
    assert forward_flops(p, w2) == 2 * forward_flops(p, w1)
    assert lora_step_flops(p, w2) == 2 * lora_step_flops(p, w1)
    assert forward_flops(p, w1) == 2 * 101 * 8 + 2 * 10 * 3 + 4 * 2 * 4 * 64


def test_ledger_totals_and_roundtrip():
    led = Ledger()
    with Meter("a", "selection", measure=False) as m:
        m.add(5.0)
    led.add(m.stage)
    with Meter("b", "training", measure=False) as m:
        m.add(7.0, paper=9.0)
    led.add(m.stage)
    d = led.to_dict()
    assert d["totals"]["selection"]["analytic_flops"] == 5.0
    assert d["totals"]["training"]["paper_flops"] == 9.0
    assert Ledger.from_dict(d).total() == 12.0
    assert m.stage.wall_s >= 0 and m.stage.peak_mem_mb > 0


# -- beyond Llama: tiny random-init models of other families (no weights needed) ----------

def _tiny(family: str, experts: str | None = None, **kw):
    """A 4-layer causal LM of a transformers family, eager attention as for measuring; the
    sequences below (64 tokens) are longer than the sliding windows."""
    import transformers

    cfg = getattr(transformers, family)(hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=256,
                                        max_position_embeddings=256, **kw)
    torch.manual_seed(0)
    extra = {"experts_implementation": experts} if experts else {}
    return transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", **extra).eval().requires_grad_(False)


def _random_batch(rows=2, length=64, response=16) -> Batch:
    ids = torch.randint(3, 256, (rows, length), generator=torch.Generator().manual_seed(0))
    return Batch(ids, torch.ones_like(ids), torch.arange(length).expand(rows, -1).contiguous(),
                 torch.full((rows,), response), torch.zeros(rows, dtype=torch.long),
                 np.arange(rows), np.full(rows, length), np.full(rows, response), np.zeros(rows, dtype=np.int64))


_GEMMA3_TYPES = ["sliding_attention"] * 3 + ["full_attention"]
FAMILIES = {  # head_dim 32 × 4 heads: attention width 128 on d_model 64
    "llama-gqa": ("LlamaConfig", None, {"head_dim": 32}),
    "gemma": ("GemmaConfig", None, {"head_dim": 32}),
    "gemma2": ("Gemma2Config", None, {"head_dim": 32, "sliding_window": 16}),
    "gemma3": ("Gemma3TextConfig", None, {"head_dim": 32, "sliding_window": 16,
                                          "layer_types": _GEMMA3_TYPES}),
    "qwen3": ("Qwen3Config", None, {"head_dim": 32}),
    # mixture-of-experts, in transformers' default grouped matmul and in its per-expert loop
    **{f"mixtral-{e}": ("MixtralConfig", e, {"num_local_experts": 4, "num_experts_per_tok": 2})
       for e in ("grouped_mm", "eager")},
    **{f"qwen2moe-{e}": ("Qwen2MoeConfig", e, {"num_experts": 4, "num_experts_per_tok": 2,
                                               "moe_intermediate_size": 32,
                                               "shared_expert_intermediate_size": 64})
       for e in ("grouped_mm", "eager")},
    "qwen3moe": ("Qwen3MoeConfig", None, {"num_experts": 4, "num_experts_per_tok": 2,
                                          "moe_intermediate_size": 32}),
}


def test_param_counts_read_the_architecture():
    p = param_counts(_tiny("MixtralConfig", num_local_experts=4, num_experts_per_tok=2))
    # 2 of the 4 experts (gate, up, down: 3·64·128 each) idle per token in each of 4 layers
    assert p["non_embedding"] - p["active"] == 4 * 2 * 3 * 64 * 128
    g = param_counts(_tiny("Gemma3TextConfig", **FAMILIES["gemma3"][2]))
    assert (g["d_model"], g["d_attn"], g["window"], g["n_window_layers"]) == (64, 128, 16, 3)
    q = param_counts(_tiny("Qwen2Config", use_sliding_window=True, sliding_window=8,
                           max_window_layers=2))
    assert (q["window"], q["n_window_layers"]) == (8, 2)  # layers from max_window_layers on
    d = param_counts(_tiny("LlamaConfig"))
    assert (d["active"], d["d_attn"], d["window"]) == (d["non_embedding"], 64, 0)


@pytest.mark.parametrize("name", FAMILIES)
def test_families_analytic_matches_measured(name):
    family, experts, kw = FAMILIES[name]
    model = _tiny(family, experts, **kw)
    batch = _random_batch()
    with Meter("fwd", "selection", param_counts(model)) as m, torch.no_grad():
        response_nll(model, batch)
        m.forward(batch)
    assert abs(m.stage.analytic_flops / m.stage.measured_flops - 1) < 0.05
    peft_model = add_lora(model, TrainConfig())
    with Meter("step", "training", param_counts(peft_model)) as m:
        nll, n = response_nll(peft_model, batch, suffix=True)
        (nll.sum() / n.sum()).backward()
        m.lora_step(batch)
    assert abs(m.stage.analytic_flops / m.stage.measured_flops - 1) < 0.05


@pytest.mark.parametrize("family,kw", [
    ("MistralConfig", {"sliding_window": 8}),  # every layer
    ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 8, "layer_types": _GEMMA3_TYPES}),
    ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),
])
def test_generation_sees_the_window(family, kw):
    """Decoding far past the window: the KV cache of a sliding layer holds `window` keys
    (the 12-token prefill is longer than the window and computes the full product)."""
    model = _tiny(family, **kw)
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with FlopCounter() as c, torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=100, min_new_tokens=100, do_sample=False,
                             pad_token_id=0)
    analytic = generation_flops(param_counts(model), [12], [out.shape[1] - 12])
    assert abs(analytic / c.total - 1) < 0.05


def _or_all(sample: int | None):
    """A meter's sample: `sample` batches, or every one (None)."""
    from ccds.flops import Sample

    return Sample(None) if sample is None else sample


def test_sampled_metering_counts_the_first_batches_then_lets_go(tiny):
    """Issue 22, defect 6: a stage counts op by op only on its first batches (the hook on
    every op costs throughput and blocks CUDA graphs), then no dispatch mode is left on
    the stack; the measured total is the sample scaled by the analytic count and agrees
    with a full count (`Sample(None)`). The default sample is the same on every device."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    from ccds.flops import SAMPLED_BATCHES

    model, tok, _ = tiny
    batches = [_batch(tok, n=2 + i % 3, words=10 + 7 * i) for i in range(6)]
    modes, stages = [], {}
    for sample in (None, 2):
        with Meter("fwd", "selection", param_counts(model),
                   sample=_or_all(sample)) as m, \
                torch.no_grad():
            for b in batches:
                modes.append((sample, _get_current_dispatch_mode()))
                response_nll(model, b)
                m.forward(b)
        stages[sample] = m.stage
    full, sampled = stages[None], stages[2]
    assert all(isinstance(md, FlopCounter) for s, md in modes if s is None)
    seen = [md for s, md in modes if s == 2]
    assert all(isinstance(md, FlopCounter) for md in seen[:2]) and seen[2:] == [None] * 4
    assert sampled.detail["measured_on"]["batches"] == 2
    assert sampled.detail["measured_on"]["of"] == 6
    assert sampled.analytic_flops == full.analytic_flops
    assert abs(sampled.measured_flops / full.measured_flops - 1) < 0.05
    assert "measured_on" not in full.detail
    gpu = Meter("x", "selection", device=torch.device("cuda"))
    assert gpu.sample == SAMPLED_BATCHES == Meter("x", "selection").sample


def test_sampled_metering_with_nested_meters_and_replayed_steps(tiny):
    """A counting meter nested in a sampled one (a scorer trained on V inside a selection
    stage) counts its own ops and hands its total up unscaled, so the outer sample holds
    only the outer batches; steps replayed after a restart are charged but neither run nor
    sampled. Either mistake would move the sampled total far from the full count."""
    model, tok, _ = tiny
    batches = [_batch(tok, n=2 + i % 3, words=10 + 7 * i) for i in range(6)]
    totals = {}
    for sample in (None, 2):
        with Meter("select", "selection", param_counts(model), sample=_or_all(sample)) as outer, \
                torch.no_grad():
            for b in batches[:2]:  # already done before a restart: charged, not run
                outer.lora_step(b, ran=False)
            with Meter("inner", "training", param_counts(model), sample=_or_all(sample)) as inner:
                for b in batches:
                    response_nll(model, b)
                    inner.forward(b)
            outer.add(inner.stage.analytic_flops, inner.stage.paper_flops)
            for b in batches:
                response_nll(model, b)
                outer.forward(b)
        totals[sample] = (outer.stage.measured_flops, inner.stage.measured_flops)
    (full_outer, full_inner), (s_outer, s_inner) = totals[None], totals[2]
    assert abs(s_inner / full_inner - 1) < 0.05
    assert abs(s_outer / full_outer - 1) < 0.05
    assert full_outer == pytest.approx(2 * full_inner, rel=1e-6)  # the same batches twice


def _dispatch_calls(monkeypatch) -> dict:
    """Every FlopCounter's Python-hook calls, by counter."""
    calls: dict = {}
    hook = FlopCounter.__torch_dispatch__

    def counting(self, func, types, args=(), kwargs=None):
        calls[self] = calls.get(self, 0) + 1
        return hook(self, func, types, args, kwargs)

    monkeypatch.setattr(FlopCounter, "__torch_dispatch__", counting)
    return calls


def _counters() -> list:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return [m for m in _get_current_dispatch_mode_stack() if isinstance(m, FlopCounter)]


@pytest.mark.parametrize("measure", [True, False], ids=["measuring", "measure=False"])
def test_nested_meter_takes_the_outer_counter_off_the_stack(tiny, monkeypatch, measure):
    """Issue 31: a meter inside a counting one (LESS's warmup, train_on_val, S2L's proxy
    passes) took the outer counter's formulas off but left its hook on the dispatch stack,
    so every op went through Python for the rest of the pass (no CUDA graphs), and a
    `measure=False` inner meter was counted op by op by the outer. Now the outer hook sees
    no op while the inner runs, no counter is left once the inner sample is over, the inner
    counts exactly its sampled batches' ops, and the totals match a full count."""
    model, tok, _ = tiny
    batches = [_batch(tok, n=2 + i % 3, words=10 + 7 * i) for i in range(5)]
    calls = _dispatch_calls(monkeypatch)

    def run(outer_sample, inner_sample):
        seen = {}
        with Meter("outer", "selection", param_counts(model),
                   sample=_or_all(outer_sample)) as outer, \
                torch.no_grad():
            response_nll(model, batches[0])
            outer.forward(batches[0])
            seen["outer"] = outer._counter
            before = calls.get(outer._counter)
            with Meter("inner", "training", param_counts(model), measure,
                       sample=_or_all(inner_sample)) as inner:
                seen["inner"] = _counters()
                seen["stacks"] = []
                for b in batches:
                    response_nll(model, b)
                    inner.forward(b)
                    seen["stacks"].append(_counters())
                seen["outer_calls"] = calls.get(seen["outer"]) - before
            outer.add(inner.stage.analytic_flops, inner.stage.paper_flops)
            seen["after"] = _counters()
            for b in batches[1:]:
                response_nll(model, b)
                outer.forward(b)
        return outer.stage, inner.stage, seen

    with Meter("ref", "training", param_counts(model)) as ref, torch.no_grad():
        for b in batches[:2]:  # what the inner's sample holds, counted alone
            response_nll(model, b)
            ref.forward(b)
    ref_calls = sum(calls.values())
    calls.clear()
    full_outer, full_inner, _ = run(None, None)
    outer, inner, seen = run(None, 2)
    assert seen["outer_calls"] == 0
    (counter,) = seen["inner"]
    assert seen["stacks"][:1] == [[counter]] and seen["stacks"][1:] == [[]] * 4
    assert calls[counter] == ref_calls
    assert seen["after"] == [seen["outer"]]  # the outer counts its own batches again
    assert abs(outer.measured_flops / full_outer.measured_flops - 1) < 0.05
    if measure:
        assert inner.detail["measured_on"]["batches"] == 2
        assert abs(inner.measured_flops / full_inner.measured_flops - 1) < 0.05
    else:  # counted for the outer's total only
        assert inner.measured_flops is None and full_inner.measured_flops is None
    # the outer's own batches plus the inner's, as one count over the whole pass
    assert full_outer.measured_flops == pytest.approx(
        ref.stage.measured_flops / ref.stage.analytic_flops * full_outer.analytic_flops,
        rel=0.05)


def test_nested_meters_on_cuda_keep_the_outer_peak_and_device(monkeypatch):
    """CUDA has one peak-memory counter per device: the inner meter resets it, so the outer
    lost its peak from before the inner. A meter with no device runs on the outer's (S2L's
    proxy passes: sampled like the rest of a GPU stage, not counted op by op throughout)."""
    from ccds.flops import SAMPLED_BATCHES

    mem = {"now": 0, "peak": 0}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda d=None: mem.update(peak=mem["now"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: mem["peak"])

    def use(n):
        mem["now"] = n
        mem["peak"] = max(mem["peak"], n)

    cuda = torch.device("cuda")
    with Meter("outer", "selection", device=cuda) as outer:
        use(5 << 20)
        use(1 << 20)
        with Meter("inner", "selection", measure=False) as inner:
            assert inner.device == cuda and inner.sample == SAMPLED_BATCHES
            use(3 << 20)
            with Meter("innermost", "selection", device=cuda) as innermost:
                use(2 << 20)
            use(4 << 20)
        use(2 << 20)
    assert (outer.stage.peak_mem_mb, inner.stage.peak_mem_mb,
            innermost.stage.peak_mem_mb) == (5, 4, 3)  # a reset starts from what is held


def test_a_sample_spans_meters():
    """A Ray actor's shards: the first `size` batches over all of them are counted, later
    meters count nothing and charge their batches at the sample's ratio."""
    from ccds.flops import Sample

    sample = Sample(3)
    stages = []
    for shard in range(3):
        with Meter("shard", "selection", sample=sample) as m:
            for _ in range(2):
                x = torch.ones(4, 8) @ torch.ones(8, 16)  # 2·4·8·16 = 1024 FLOPs
                m.add(1000.0, batch=True)
                assert (_counters() == []) == (shard * 2 + _ >= 2)
                del x
        stages.append(m.stage)
    assert (sample.batches, sample.flops, sample.analytic) == (3, 3 * 1024, 3000)
    assert [s.measured_flops for s in stages] == [2048, 1024 + 1024, 2048]
    assert stages[2].detail["measured_on"] == {"batches": 0, "of": 2, "counted_flops": 0.0,
                                               "analytic_flops": 0.0}
