import numpy as np
import torch

from ccds import Example
from ccds.lm import response_logprobs, score_sequences
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
