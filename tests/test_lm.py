from functools import partial

import numpy as np
import pytest
import torch

from ccds import Example
from ccds.lm import _token_logprobs, response_logprobs, score_sequences
from ccds.models import pick_runtime
from ccds.tokenize import collate, encode


def _enc(tok):
    ex = [Example(f"e{i}", "word " * (3 + 5 * i), "answer " * (1 + 3 * (i % 3)))
          for i in range(7)]
    return encode(ex, tok)


def test_gathered_head_equals_the_models_own_forward(tiny):
    model, tok, _ = tiny
    enc = _enc(tok)
    batch = collate(enc, np.arange(len(enc)), tok.pad_token_id)
    with torch.no_grad():
        fast, mask = response_logprobs(model, batch)
        model.config.logit_scale = 1.0  # any head extra sends it through model.forward
        try:
            slow, mask2 = response_logprobs(model, batch)
        finally:
            del model.config.logit_scale
    assert torch.equal(mask, mask2)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_batched_scores_equal_one_at_a_time(tiny):
    """Left padding, length batching and position ids change nothing per sequence."""
    model, tok, _ = tiny
    enc = _enc(tok)
    rt = pick_runtime(dtype="fp32")  # exactness is an fp32 property
    batched = score_sequences(model, enc, tok.pad_token_id, rt, max_tokens=256)
    for i in range(len(enc)):
        one = collate(enc, np.array([i]), tok.pad_token_id)
        with torch.no_grad():
            lp, mask = response_logprobs(model, one)
        assert np.isclose(batched["nll_sum"][i], -lp.sum().item(), atol=1e-4)
        assert batched["n_tokens"][i] == mask.sum().item() == enc.response_lengths[i] - \
            enc.n_suffix[i]


def _plain_head(head, hidden, targets):
    """The reference: full logits, fp32 log-softmax, autograd through both."""
    return -torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="none")


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_frozen_head_in_chunks_gives_the_plain_heads_values_and_gradients(amp):
    """`_FrozenHead` computes the hidden states' gradient in its forward, chunk by chunk;
    any upstream weighting of the rows must give autograd's gradient of the plain head."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500, bias=False).requires_grad_(False)
    hidden, targets, g = torch.randn(37, 32), torch.randint(0, 500, (37,)), torch.randn(37)
    out = {}
    for name, fn in [("chunks", partial(_token_logprobs, rows=8)), ("plain", _plain_head)]:
        h = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            values = fn(head, h, targets)
            (values * g).sum().backward()
            with torch.no_grad():
                out[name] = values.detach(), h.grad, fn(head, hidden, targets)
    (v, grad, nograd), (pv, pgrad, _) = out["chunks"], out["plain"]
    assert v.dtype == torch.float32 and torch.equal(v, pv) and torch.equal(nograd, pv)
    tol = 1e-2 if amp else 1e-5  # bf16: the softmax rounded once before its matmul
    assert torch.allclose(grad, pgrad, rtol=tol, atol=tol * pgrad.abs().max().item())


def test_a_trainable_head_is_called_as_it_is():
    head = torch.nn.Linear(8, 50, bias=False)  # full fine-tuning: the head learns too
    hidden, targets = torch.randn(5, 8), torch.randint(0, 50, (5,))
    _token_logprobs(head, hidden, targets, rows=2).sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
