"""Training at GPU scale, shown on the CPU: gradient checkpointing, fp16 with a GradScaler,
the attention choice, and multi-process steps in which every process does real work."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ccds import CcdsError, Example
from ccds.models import Runtime, load_causal_lm
from ccds.train import TrainConfig, checkpointing, plan_steps, split_step, train


def _examples(n=24):
    return [Example(f"e{i}", f"Repeat the word number {i % 4}.", f"word{i % 4} word{i % 4}")
            for i in range(n)]


def _cfg(**kw):
    base = dict(epochs=2, lr=1e-2, batch_tokens=512, max_batch=8, measure_flops=False,
                warmup_ratio=0.1, dtype="fp32")
    return TrainConfig(**{**base, **kw})


def _layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


# -- multi-process steps ------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("grad_accum", [1, 2, 3])
def test_split_step_gives_every_process_work(world, grad_accum):
    """Every process gets a micro-batch whenever the step has at least `world` sequences;
    together they hold exactly the step's sequences, none twice."""
    rng = np.random.default_rng(world * 10 + grad_accum)
    lengths = rng.integers(5, 300, size=200)

    class Enc:  # what plan_steps reads
        pass

    enc = Enc()
    enc.lengths = lengths
    steps = plan_steps(enc, TrainConfig(batch_tokens=600, max_batch=8, grad_accum=grad_accum,
                                         epochs=2))
    for group in steps:
        ranks = split_step(group, lengths, world)
        assert len(ranks) == world
        got = np.sort(np.concatenate([b for r in ranks for b in r]))
        assert np.array_equal(got, np.sort(np.concatenate(group)))
        n = sum(len(b) for b in group)
        assert sum(bool(r) for r in ranks) == min(world, n)
        assert all(len(b) for r in ranks for b in r)  # no empty micro-batch
    one = split_step(steps[0], lengths, 1)  # one process: the step as planned
    assert len(one) == 1 and len(one[0]) == len(steps[0])
    assert all(a is b for a, b in zip(one[0], steps[0], strict=True))


def test_split_step_balances_tokens():
    lengths = np.array([100] * 4 + [10] * 4)
    group = [np.array([0, 1]), np.array([4, 5]), np.array([2, 3]), np.array([6, 7])]
    load = [sum(len(b) * lengths[b].max() for b in r) for r in split_step(group, lengths, 2)]
    assert load == [220, 220]  # dealt in turn: 400 and 40


def _two_processes(tmp_path, examples, cfg_text, tiny_model_dir):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from ccds.data.formats import write_examples

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() and not shutil.which("torchrun"):
        pytest.skip("torchrun not installed")
    write_examples(examples, tmp_path / "data.jsonl")
    (tmp_path / "cfg.yaml").write_text(cfg_text)
    args = ["-m", "ccds.cli", "train", "--data", str(tmp_path / "data.jsonl"), "--model",
            str(tiny_model_dir), "--config", str(tmp_path / "cfg.yaml")]
    runs = {}
    for name, pre in (("one", [sys.executable]),
                      ("two", [str(torchrun), "--nproc_per_node", "2"])):
        p = subprocess.run([*pre, *args, "--out", str(tmp_path / name)], capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        runs[name] = json.loads((tmp_path / name / "train.json").read_text())
    return runs["one"], runs["two"]


def test_two_processes_with_grad_accum_1_split_the_work(tiny_model_dir, tmp_path):
    """grad_accum 1 on 2 processes: the same updates as one process, and the FLOPs counted
    on both together are one process's (each step's sequences are split), not twice them
    (a process without a micro-batch recomputing one). Long examples make steps of a single
    sequence, where the other process joins the all-reduce with a one-token forward."""
    long = [Example(f"l{i}", "Count: " + " ".join(map(str, range(40))),
                    " ".join(map(str, range(40, 80 + i)))) for i in range(3)]
    a, b = _two_processes(tmp_path, _examples(20) + long,
                          "epochs: 1\nlr: 0.01\nbatch_tokens: 256\nmax_batch: 4\n"
                          "grad_accum: 1\nwarmup_ratio: 0.1\ndtype: fp32\n", tiny_model_dir)
    assert b["stage"]["detail"]["processes"] == 2
    assert np.allclose(a["losses"], b["losses"], atol=1e-4)
    assert a["stage"]["tokens"] == b["stage"]["tokens"]
    assert b["stage"]["analytic_flops"] == pytest.approx(a["stage"]["analytic_flops"])
    ratio = b["stage"]["measured_flops"] / a["stage"]["measured_flops"]
    assert 0.8 < ratio < 1.1, ratio


# -- gradient checkpointing ---------------------------------------------------------------

def test_gradient_checkpointing_is_on_and_trains_the_same(tiny_model_dir, tmp_path):
    """With checkpointing each decoder layer's MLP runs twice per micro-batch (forward, then
    again in the backward: its down projection is called twice, through ccds's own forward as
    through transformers'), the losses and the adapter match a run without it, and the model
    is given back as it came."""
    runs = {}
    for ckpt in (False, True):
        model, tok, _ = load_causal_lm(str(tiny_model_dir))
        calls, seen = [0], set()

        def hook(m, args, _calls=calls, _seen=seen, _model=model):
            _calls[0] += 1
            _seen.add(checkpointing(_model))
        for layer in _layers(model):  # inside the layer: the recompute runs it again
            layer.mlp.down_proj.register_forward_pre_hook(hook)
        r = train(_examples(), _cfg(gradient_checkpointing=ckpt, lora_dropout=0.1), model=model,
                  tokenizer=tok, out=tmp_path / str(ckpt), progress=None)
        runs[ckpt] = (r, calls[0], seen)
        assert not checkpointing(r.model)  # restored
        emb = r.model.get_base_model().get_input_embeddings()
        assert not emb._forward_hooks  # the input-grad hook went with it
    (off, n_off, seen_off), (on, n_on, seen_on) = runs[False], runs[True]
    assert seen_off == {False} and seen_on == {True}
    assert n_on == 2 * n_off > 0
    assert np.allclose(off.losses, on.losses, rtol=1e-5, atol=1e-6)
    a, b = (load_file(str(tmp_path / str(c) / "adapter" / "adapter_model.safetensors"))
            for c in (False, True))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)


def test_execution_settings_keep_the_resume_key(tiny_model_dir, tmp_path):
    """A run killed with checkpointing off resumes with it on: an EXECUTION setting does not
    change what is trained, so it is not part of the run's identity."""
    assert {"gradient_checkpointing", "attn", "micro_tokens"} == TrainConfig.EXECUTION
    assert set(TrainConfig.model_fields) >= TrainConfig.EXECUTION
    model, tok, _ = load_causal_lm(str(tiny_model_dir))
    train(_examples(), _cfg(checkpoints=2), model=model, tokenizer=tok, out=tmp_path / "a",
          progress=None)
    first = min((tmp_path / "a").glob("checkpoint-*"))
    import shutil

    shutil.copytree(first, tmp_path / "b" / first.name)
    model, tok, _ = load_causal_lm(str(tiny_model_dir))
    r = train(_examples(), _cfg(checkpoints=2, gradient_checkpointing=True, attn="eager"),
              model=model, tokenizer=tok, out=tmp_path / "b", progress=None)
    assert r.stage.detail["resumed_at_step"] > 0


# -- fp16 ---------------------------------------------------------------------------------

class _Events:
    """Spies on GradScaler and on gradient clipping, in the order train() calls them."""

    def __init__(self, monkeypatch):
        self.log: list[str] = []
        self.scalers: list = []
        log, scalers = self.log, self.scalers
        clip = torch.nn.utils.clip_grad_norm_

        class Spy(torch.amp.GradScaler):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                scalers.append(self)

            def scale(self, outputs):
                log.append("scale")
                return super().scale(outputs)

            def unscale_(self, optimizer):
                log.append("unscale")
                return super().unscale_(optimizer)

            def step(self, optimizer, *a, **kw):
                log.append("step")
                return super().step(optimizer, *a, **kw)

            def update(self, *a, **kw):
                log.append("update")
                return super().update(*a, **kw)

        def spy_clip(*a, **kw):
            log.append("clip")
            return clip(*a, **kw)

        monkeypatch.setattr(torch.amp, "GradScaler", Spy)
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)


def test_fp16_trains_with_a_grad_scaler_and_unscales_before_clipping(tiny, monkeypatch):
    """fp16 autocast (here on the CPU; on GPUs without bf16 in practice) scales the loss,
    unscales the gradients before clipping them, and lets the scaler step and update."""
    ev = _Events(monkeypatch)
    model, tok, _ = tiny
    r = train(_examples(), _cfg(dtype="fp16"), model=model, tokenizer=tok, progress=None,
              runtime=Runtime(torch.device("cpu"), torch.float16))
    assert len(ev.scalers) == 1 and ev.scalers[0].is_enabled()
    per_step = ["scale", "unscale", "clip", "step", "update"]  # one micro-batch a step
    assert ev.log == per_step * r.steps
    assert all(np.isfinite(r.losses)) and np.mean(r.losses[-2:]) < np.mean(r.losses[:2])
    # the frozen base ran in fp16, the trained LoRA weights stayed fp32
    dtypes = {p.dtype for p in r.model.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}
    assert torch.float16 in {p.dtype for p in r.model.parameters() if not p.requires_grad}


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_no_grad_scaler_without_fp16(tiny, monkeypatch, autocast):
    ev = _Events(monkeypatch)
    model, tok, _ = tiny
    r = train(_examples(8), _cfg(epochs=1), model=model, tokenizer=tok, progress=None,
              runtime=Runtime(torch.device("cpu"), autocast))
    assert ev.scalers == [] and ev.log == ["clip"] * r.steps


def test_fp16_resume_restores_the_loss_scale(tiny_model_dir, tmp_path):
    """The loss scale is part of an fp16 run's state: a resumed run ends as an uninterrupted
    one, bit for bit."""
    import shutil

    fp16 = Runtime(torch.device("cpu"), torch.float16)
    cfg = _cfg(epochs=2, checkpoints=3, dtype="fp16")
    model, tok, _ = load_causal_lm(str(tiny_model_dir))
    ref = train(_examples(), cfg, model=model, tokenizer=tok, out=tmp_path / "ref",
                progress=None, runtime=fp16)
    ck = min((tmp_path / "ref").glob("checkpoint-*"))
    assert json.loads((ck / "state.json").read_text())["scaler"]["scale"] > 0
    shutil.copytree(ck, tmp_path / "k" / ck.name)
    model, tok, _ = load_causal_lm(str(tiny_model_dir))
    again = train(_examples(), cfg, model=model, tokenizer=tok, out=tmp_path / "k",
                  progress=None, runtime=fp16)
    assert again.stage.detail["resumed_at_step"] > 0 and again.losses == ref.losses
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors"))
            for d in ("ref", "k"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- attention ----------------------------------------------------------------------------

def test_attn_choice_reaches_the_model(tiny_model_dir):
    """`attn` is the kernel the loaded model runs with; a given model runs with it during
    training and gets its own back."""
    r = train(_examples(8), _cfg(epochs=1, attn="eager", model=str(tiny_model_dir)),
              progress=None)
    assert r.model.config._attn_implementation == "eager"
    model, tok, _ = load_causal_lm(str(tiny_model_dir))
    assert model.config._attn_implementation == "sdpa"
    seen = set()
    for layer in _layers(model):
        layer.register_forward_pre_hook(
            lambda m, a: seen.add(m.self_attn.config._attn_implementation))
    r = train(_examples(8), _cfg(epochs=1, attn="eager"), model=model, tokenizer=tok,
              progress=None)
    assert seen == {"eager"}
    assert r.model.config._attn_implementation == "sdpa"


def test_flash_attention_without_flash_attn_is_a_clear_error(tiny_model_dir):
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(CcdsError, match="flash-attn"):
        train(_examples(8), _cfg(attn="flash_attention_2", model=str(tiny_model_dir)),
              progress=None)
    with pytest.raises(ValueError):
        TrainConfig(attn="flash")  # a Literal: a misspelt kernel is a config error
