import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ccds import CcdsError, Example
from ccds.flops import Ledger
from ccds.models import load_adapter
from ccds.train import TrainConfig, lr_lambda, plan_steps, train


def _examples(n=48):
    return [Example(f"e{i}", f"Repeat the word number {i % 4}.", f"word{i % 4} word{i % 4}")
            for i in range(n)]


def _cfg(**kw):
    base = dict(epochs=3, lr=1e-2, batch_tokens=512, max_batch=8, measure_flops=False,
                warmup_ratio=0.1)
    return TrainConfig(**{**base, **kw})


def test_training_lowers_the_loss_and_records_flops(tiny, tmp_path):
    model, tok, _ = tiny
    ledger = Ledger()
    r = train(_examples(), _cfg(measure_flops=True), model=model, tokenizer=tok, out=tmp_path,
              ledger=ledger, progress=None)
    assert r.steps == len(r.losses) > 5
    assert np.mean(r.losses[-3:]) < 0.7 * np.mean(r.losses[:3])
    st = ledger.stages[0]
    assert st.kind == "training" and st.tokens == r.tokens > 0
    assert abs(st.analytic_flops / st.measured_flops - 1) < 0.1
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    saved = json.loads((tmp_path / "train.json").read_text())
    assert saved["losses"] == r.losses


def test_same_seed_same_run_different_seed_differs(tiny_model_dir):
    from ccds.models import load_causal_lm

    runs = []
    for seed in (0, 0, 1):
        model, tok, _ = load_causal_lm(str(tiny_model_dir))
        runs.append(train(_examples(), _cfg(epochs=1, seed=seed), model=model, tokenizer=tok,
                          progress=None).losses)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_checkpoints_hold_adapter_and_adam_moments(tiny, tmp_path):
    model, tok, _ = tiny
    r = train(_examples(), _cfg(epochs=4, checkpoints=4), model=model, tokenizer=tok,
              out=tmp_path, progress=None)
    assert len(r.checkpoints) == 4
    steps = [json.loads((c / "state.json").read_text())["step"] for c in r.checkpoints]
    assert steps[-1] == r.steps and steps == sorted(steps)
    state = json.loads((r.checkpoints[1] / "state.json").read_text())
    assert 0 < state["mean_lr"] <= 1e-2
    moments = load_file(str(r.checkpoints[-1] / "optimizer.safetensors"))
    names = [n for n, p in r.model.named_parameters() if p.requires_grad]
    from ccds.train import RNG_KEY

    assert ({f"{n}.exp_avg" for n in names} | {f"{n}.exp_avg_sq" for n in names} | {RNG_KEY}
            == set(moments))
    assert all((moments[f"{n}.exp_avg_sq"] >= 0).all() for n in names)
    assert state["run_key"] and len(state["losses"]) == state["step"]
    # the adapter reloads onto a fresh base model and reproduces the trained model's loss
    from ccds.lm import response_nll
    from ccds.models import load_causal_lm, pick_runtime
    from ccds.tokenize import collate, encode

    base, _, _ = load_causal_lm(tok.name_or_path)
    pick_runtime().place(base)  # as train() placed the trained model's frozen base
    reloaded = load_adapter(base, tmp_path / "adapter")
    enc = encode(_examples(4), tok)
    batch = collate(enc, np.arange(4), tok.pad_token_id)
    with torch.no_grad():
        a = response_nll(r.model.eval(), batch)[0]
        b = response_nll(reloaded, batch)[0]
    assert torch.allclose(a, b, atol=1e-5)


def test_token_budget_and_fractional_epochs(tiny):
    model, tok, _ = tiny
    from ccds.tokenize import encode

    enc = encode(_examples(), tok)
    full = plan_steps(enc, _cfg(epochs=1))
    half = plan_steps(enc, _cfg(epochs=0.5))
    assert len(half) == len(full) // 2
    budget = plan_steps(enc, _cfg(epochs=10, max_tokens=enc.n_tokens * 2))
    used = sum(int(enc.lengths[b].sum()) for g in budget for b in g)
    assert enc.n_tokens * 2 <= used < enc.n_tokens * 2 + enc.lengths.max() * 8
    r = train(_examples(), _cfg(epochs=10, max_tokens=enc.n_tokens), model=model,
              tokenizer=tok, progress=None)
    assert enc.n_tokens <= r.tokens < 2 * enc.n_tokens


def test_schedules():
    cfg = TrainConfig(warmup_ratio=0.1, schedule="linear")
    f = lr_lambda(cfg, 100)
    assert f(0) < f(9) <= 1.0 and f(99) < 0.05 and f(50) == pytest.approx(0.549, abs=0.01)
    g = lr_lambda(TrainConfig(warmup_ratio=0.0, schedule="cosine"), 100)
    assert g(0) == 1.0 and g(50) == pytest.approx(0.5) and g(100) == pytest.approx(0.0)
    assert lr_lambda(TrainConfig(warmup_ratio=0, schedule="constant"), 10)(9) == 1.0


def test_empty_subset_is_a_user_error(tiny):
    model, tok, _ = tiny
    with pytest.raises(CcdsError, match="empty"):
        train([], _cfg(), model=model, tokenizer=tok)


@pytest.mark.slow
def test_real_smollm2_lora_learns_a_task(smollm2):
    """Real model, real LoRA: a few steps on a fixed-format task cut its loss. On a copy:
    training stores the frozen weights in its autocast dtype, which would leave the shared
    fp32 model in bf16 for the tests after this one."""
    import copy

    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    ex = [Example(f"r{i}", f"What is {i} plus {i}?", f"{i} + {i} = {2 * i}. The answer is "
                  f"{2 * i}.") for i in range(24)]
    r = train(ex, TrainConfig(epochs=2, lr=1e-3, batch_tokens=256, measure_flops=False),
              model=model, tokenizer=tok, progress=None)
    try:
        assert r.steps >= 8
        assert np.mean(r.losses[-3:]) < 0.8 * np.mean(r.losses[:3])
    finally:
        r.model.unload()


def test_two_process_data_parallel_matches_one_process(tiny_model_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo, via accelerate) makes the same updates."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from ccds.data.formats import write_examples

    data = tmp_path / "data.jsonl"
    write_examples(_examples(40), data)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("epochs: 2\nlr: 0.01\nbatch_tokens: 256\nmax_batch: 4\ngrad_accum: 2\n"
                   "lora_dropout: 0.0\nwarmup_ratio: 0.1\ndtype: fp32\n")
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() and not shutil.which("torchrun"):
        pytest.skip("torchrun not installed")
    args = ["-m", "ccds.cli", "train", "--data", str(data), "--model", str(tiny_model_dir),
            "--config", str(cfg)]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600)
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", *args,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads((tmp_path / "one" / "train.json").read_text())
    b = json.loads((tmp_path / "two" / "train.json").read_text())
    assert b["stage"]["detail"]["processes"] == 2
    assert np.allclose(a["losses"], b["losses"], atol=1e-4)
    assert a["stage"]["analytic_flops"] == b["stage"]["analytic_flops"]
    assert a["stage"]["tokens"] == b["stage"]["tokens"]


def test_resume_in_process_is_bit_identical(tiny_model_dir, tmp_path):
    """Training stopped after a checkpoint and started again ends with the same adapter."""
    from ccds.models import load_causal_lm

    cfg = _cfg(epochs=2, checkpoints=4, dtype="fp32", lora_dropout=0.1)
    model, tok, _ = load_causal_lm(str(tiny_model_dir))
    ref = train(_examples(), cfg, model=model, tokenizer=tok, out=tmp_path / "ref", progress=None)
    # a run that "died" after its second checkpoint: keep only checkpoints 1-2 of the reference
    import shutil

    cks = sorted((tmp_path / "ref").glob("checkpoint-*"))
    for ck in cks[:2]:
        shutil.copytree(ck, tmp_path / "k" / ck.name)
    model, tok, _ = load_causal_lm(str(tiny_model_dir))
    again = train(_examples(), cfg, model=model, tokenizer=tok, out=tmp_path / "k", progress=None)
    assert again.stage.detail["resumed_at_step"] == json.loads(
        (cks[1] / "state.json").read_text())["step"] > 0
    assert again.losses == ref.losses and again.tokens == ref.tokens
    a = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "k" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.stage.analytic_flops == ref.stage.analytic_flops
    # every checkpoint is reported, with the mean LR of its own steps (LESS weights by it)
    assert [c.name for c in again.checkpoints] == [c.name for c in ref.checkpoints]
    lr = [[json.loads((c / "state.json").read_text())["mean_lr"] for c in r.checkpoints]
          for r in (ref, again)]
    assert lr[0] == lr[1]
    # another run's checkpoints (different seed) are never picked up
    model, tok, _ = load_causal_lm(str(tiny_model_dir))
    other = train(_examples(), cfg.model_copy(update={"seed": 1}), model=model, tokenizer=tok,
                  out=tmp_path / "k", progress=None)
    assert other.stage.detail["resumed_at_step"] == 0


@pytest.mark.slow
def test_sigkilled_training_resumes_to_the_same_adapter(tiny_model_dir, tmp_path, figure):
    """`ccds train` killed with SIGKILL at random moments, again and again, then run to the
    end: the adapter equals an uninterrupted run's, bit for bit."""
    import os
    import subprocess
    import sys

    from conftest import kill_until_done

    from ccds.data.formats import write_examples

    write_examples(_examples(240), tmp_path / "pool.jsonl")

    def start(out):
        return subprocess.Popen(
            [sys.executable, "-m", "ccds", "train", "--data", str(tmp_path / "pool.jsonl"),
             "--out", str(out), "--model", str(tiny_model_dir), "--epochs", "3", "--lr", "0.01",
             "--checkpoints", "12", "--dtype", "fp32"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "CCDS_PROGRESS": "0"})

    p = start(tmp_path / "ref")
    assert p.wait(timeout=600) == 0, p.stderr.read()

    def saved():
        return len(list((tmp_path / "k").glob("checkpoint-*")))

    p, seen = kill_until_done(lambda: start(tmp_path / "k"), saved)
    assert p.returncode == 0, p.stderr.read()
    figure("training: SIGKILLs survived (checkpoints saved at each, of 12)",
           f"{len(seen)} {seen}")
    assert sum(s < 12 for s in seen) >= 3 and seen == sorted(seen), seen
    a = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "k" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref, got = (json.loads((tmp_path / d / "train.json").read_text()) for d in ("ref", "k"))
    assert got["losses"] == ref["losses"]
    assert got["stage"]["analytic_flops"] == ref["stage"]["analytic_flops"]


def _varied(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [Example(f"v{i}", "Say " + " ".join(["word"] * int(rng.integers(1, 30))) + ".",
                    " ".join(["ok"] * int(rng.integers(1, 40)))) for i in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_a_flops_cap_stops_before_the_step_that_would_pass_it(tiny, seed):
    """Over random pools, batch shapes and caps: the planned steps fit the cap, and the next
    step of the uncapped plan would not have."""
    from ccds.models import param_counts
    from ccds.tokenize import encode
    from ccds.train import step_flops

    model, tok, _ = tiny

    rng = np.random.default_rng(seed)
    enc = encode(_varied(int(rng.integers(5, 60)), seed), tok)
    cfg = _cfg(epochs=float(rng.uniform(0.5, 3)), batch_tokens=int(rng.integers(64, 600)),
               grad_accum=int(rng.integers(1, 3)))
    counts = param_counts(model)
    free = plan_steps(enc, cfg, counts)
    costs = [step_flops(enc, g, counts, padded=True) for g in free]
    assert all(step_flops(enc, g, counts) <= c for g, c in zip(free, costs, strict=True))
    cap = float(rng.uniform(costs[0], sum(costs) * 1.2))
    capped = plan_steps(enc, cfg.model_copy(update={"max_flops": cap}), counts)
    spent = sum(costs[:len(capped)])
    same = [[x.tolist() for x in g] for g in free[:len(capped)]]
    assert [[x.tolist() for x in g] for g in capped] == same and spent <= cap
    assert len(capped) == len(free) or spent + costs[len(capped)] > cap


def test_training_under_a_flops_cap_charges_no_more_than_it(tiny):
    """The ledger's analytic charge equals what was planned before loading anything and
    stays under the cap, and so does the measured count (it sees the padding the cap prices);
    a cap below one step is one clear error."""
    from ccds.tokenize import encode
    from ccds.train import planned_flops

    model, tok, ref = tiny
    cfg = _cfg(epochs=2, measure_flops=True, model=str(ref.path))
    whole = planned_flops(_varied(), cfg, tok)
    cap = whole * 0.37
    ledger = Ledger()
    r = train(_varied(), cfg.model_copy(update={"max_flops": cap}), model=model,
              tokenizer=tok, ledger=ledger, progress=None)
    st = ledger.stages[0]
    assert st.analytic_flops <= cap
    assert st.analytic_flops == pytest.approx(
        planned_flops(_varied(), cfg.model_copy(update={"max_flops": cap}), tok), rel=1e-12)
    assert 0 < r.steps < len(plan_steps(encode(_varied(), tok), cfg))
    assert abs(st.measured_flops / st.analytic_flops - 1) < 0.05
    assert st.measured_flops <= cap
    with pytest.raises(CcdsError, match="buys no step"):
        train(_varied(), cfg.model_copy(update={"max_flops": 1.0}), model=model,
              tokenizer=tok, progress=None)


def test_full_finetuning_that_cannot_fit_is_refused_before_loading(monkeypatch, tiny_model_dir):
    """16 bytes a parameter (fp32 weights, gradients, AdamW moments) checked against the
    device's free memory before anything loads; where it fits, nothing is said."""
    import ccds.train as tr
    from ccds.models import Runtime

    monkeypatch.setattr(tr, "free_bytes", lambda device: 1e5)
    monkeypatch.setattr(tr, "load_causal_lm", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(CcdsError, match="full fine-tuning .* needs about") as e:
        train(_examples(), _cfg(lora=False, model=str(tiny_model_dir)), progress=None)
    assert "lora: true" in e.value.fix
    monkeypatch.setattr(tr, "free_bytes", lambda device: 1e12)
    tr.check_full_fits(_cfg(lora=False, model=str(tiny_model_dir)), Runtime(torch.device("cpu"), None))


def test_checkpoints_keep_the_cuda_generator_on_cuda(monkeypatch):
    """Dropout draws on the GPU: a resumed CUDA run restores that generator too."""
    from ccds.train import CUDA_RNG_KEY, RNG_KEY, restore_rng, rng_states

    seen = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: seen.update(cuda=s))
    states = rng_states(torch.device("cuda"))
    assert set(states) == {RNG_KEY, CUDA_RNG_KEY}
    assert set(rng_states(torch.device("cpu"))) == {RNG_KEY}
    restore_rng(states, torch.device("cuda"))
    assert seen["cuda"].tolist() == [7]
