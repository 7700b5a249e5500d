"""What the ray backend relies on, without Ray: a pass pickled with a live (trained) model
rebuilds the same model in another process, and carries weights, not modules."""

from __future__ import annotations

import pickle
from functools import partial

import numpy as np
import pytest
import torch

from ccds.data.synth import generate
from ccds.flops import Meter
from ccds.models import add_lora, causal_lm, load_causal_lm, pick_runtime
from ccds.score.base import Backend
from ccds.score.ppl import SequenceStats
from ccds.train import TrainConfig


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_pickled_pass_rebuilds_the_trained_model(tiny_model_dir, lora):
    pool, _ = generate(seed=0, n_pool=20, n_val=2, n_test=2)
    rt = pick_runtime(dtype="fp32")
    cfg = TrainConfig(model=str(tiny_model_dir), lora_r=4) if lora else None
    model, tok = causal_lm(str(tiny_model_dir), cfg)
    with torch.no_grad():  # "training": move the weights the pass must carry
        for name, p in model.named_parameters():
            if not lora or "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    live = SequenceStats(partial(causal_lm, str(tiny_model_dir), cfg), model, tok, lora=lora)
    live.setup(rt)
    want = live(pool, rt, Meter("a", "selection"))

    blob = pickle.dumps(live)
    assert len(blob) < 3 * sum(p.numel() * 4 for p in model.parameters())  # no module inside
    shipped = pickle.loads(blob)
    assert shipped.model is None and shipped.weights is not None
    shipped.setup(rt)
    got = shipped(pool, rt, Meter("b", "selection"))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert live.model is model  # pickling left the live pass alone


def test_untrained_pass_ships_only_its_loader(tiny_model_dir):
    p = SequenceStats(partial(causal_lm, str(tiny_model_dir)))
    assert len(pickle.dumps(p)) < 10_000


def test_lora_weights_do_not_fit_a_different_adapter(tiny_model_dir):
    model, tok, _ = load_causal_lm(str(tiny_model_dir))
    lora = add_lora(model, TrainConfig(model=str(tiny_model_dir), lora_r=4))
    p = pickle.loads(pickle.dumps(SequenceStats(
        partial(causal_lm, str(tiny_model_dir), TrainConfig(model=str(tiny_model_dir), lora_r=8)),
        lora, tok, lora=True)))
    with pytest.raises(RuntimeError):
        p.setup(pick_runtime(dtype="fp32"))


def test_backend_config_rejects_unknown_keys():
    with pytest.raises(ValueError):
        Backend(kind="ray", actors=3)
    with pytest.raises(ValueError):
        Backend(kind="spark")


def test_local_chunks_give_the_same_rows(tiny_model_dir):
    from ccds.score import Context
    from ccds.score.backend import map_pool

    pool, _ = generate(seed=1, n_pool=30, n_val=2, n_test=2)
    rt = pick_runtime(dtype="fp32")
    rows = {}
    for chunk in (7, 1000):
        ctx = Context(runtime=rt, progress=False, backend=Backend(chunk=chunk))
        meter = Meter("m", "selection")
        rows[chunk] = map_pool(SequenceStats(partial(causal_lm, str(tiny_model_dir))), pool,
                               ctx, meter, key="k")
        rows[chunk, "flops"] = meter.stage.analytic_flops
    np.testing.assert_allclose(rows[7], rows[1000], rtol=1e-5)
    assert rows[7, "flops"] == rows[1000, "flops"]
