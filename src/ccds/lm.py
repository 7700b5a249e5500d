"""Causal-LM passes shared by training, evaluation and every loss-based scorer.

Batches are left-padded (see tokenize.collate), so every row's response occupies the last
columns. The LM head — a fifth of SmolLM2's forward FLOPs — is applied only at the positions
whose next token is scored: the decoder's hidden states are gathered there first. Models
whose head does more than a projection (soft-capping, scaling) and DDP-wrapped models go
through the model's own forward instead, asking for logits at the last k positions only
(`logits_to_keep`); both paths give the same numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from . import decoder
from .models import Runtime, batch_budget, cpu_matmul_gflops, head_rows, plain_head
from .tokenize import Batch, Encoded, collate, length_batches, to_device, token_batches


def response_logprobs(model, batch: Batch, suffix: bool = False,
                      kernels: decoder.Kernels | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the response tokens: ([B, k] values, [B, k] bool mask).

    The valid columns of a row are its last `n_response` ones, minus the closing
    end-of-turn tokens unless `suffix` (training learns to stop; scoring judges the
    answer itself). Gradients flow when enabled. The scored positions come from the
    batch's host counts and are gathered by index, so the pass never waits on the device.
    """
    k, flat = batch.scored(suffix)
    rows, width = batch.input_ids.shape
    device = batch.input_ids.device
    # position p of row r predicts token p + 1: flat column c of [B, k] is p = width - k - 1 + c
    where = (flat // k) * width + (width - k - 1) + flat % k
    at, flat = to_device(where, device), to_device(flat, device)
    targets = batch.input_ids.reshape(-1).index_select(0, at + 1)
    mask = torch.zeros(rows * k, dtype=torch.bool, device=device).index_fill_(0, flat, True)
    base = plain_head(model)
    if base is not None:  # the head at the scored positions only
        hidden = _decoder_states(base, batch, kernels, where)
        values = _token_logprobs(base.get_output_embeddings(), hidden, targets)
    else:  # the model's own forward, logits at the k positions before the last token
        keep = torch.arange(width - k - 1, width - 1, device=device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, logits_to_keep=keep,
                       use_cache=False).logits
        logits = logits.reshape(rows * k, -1).index_select(0, flat)
        values = -F.cross_entropy(logits.float(), targets, reduction="none")
    lp = torch.zeros(rows * k, dtype=torch.float32, device=device)
    return lp.index_copy(0, flat, values.float()).view(rows, k), mask.view(rows, k)


def _token_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor,
                    rows: int | None = None) -> torch.Tensor:
    """log p(target) for each row of `hidden`, `rows` positions at a time (None:
    `head_rows`). A frozen, bias-free linear head (LoRA, scoring) goes through `_FrozenHead`,
    which never holds [N, vocab] logits, with or without gradients. Any other head is called
    as it is: chunked without gradients, all rows at once with them (its logits, fp32
    log-softmax and their gradients held for the backward)."""
    rows = rows or head_rows(hidden.device)
    if (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
            and not (head._forward_hooks or head._forward_pre_hooks)):
        if torch.is_grad_enabled() and hidden.requires_grad:
            return _FrozenHead.apply(hidden, head.weight, targets, rows)
        return _head_chunks(hidden, head.weight, targets, rows, grad=False)[0]
    step = max(len(hidden), 1) if torch.is_grad_enabled() else rows
    parts = [-F.cross_entropy(head(hidden[i:i + step]).float(), targets[i:i + step],
                              reduction="none") for i in range(0, len(hidden), step)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def _head_chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 rows: int, *, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(target) per row [N] fp32, and with `grad` its gradient w.r.t. each row's hidden
    state [N, d]: W[target] − softmax(z)·W, in hidden's dtype), `rows` rows at a time.
    Logits come in the matmul's dtype (bf16 under autocast) and are normalised in fp32,
    as `F.cross_entropy(head(h).float())` computes them."""
    out = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if grad else None
    for i in range(0, len(hidden), rows):
        t = targets[i:i + rows, None]
        z = F.linear(hidden[i:i + rows], weight)
        lsm = torch.log_softmax(z.float(), -1)
        out[i:i + rows] = lsm.gather(1, t)[:, 0]
        if dh is not None:  # d log p(t) / dz = onehot(t) − softmax(z)
            p = lsm.exp_().scatter_add_(1, t, lsm.new_full(t.shape, -1.0))
            dh[i:i + rows] = torch.mm(p.to(z.dtype), weight.to(z.dtype)).neg_()
        del z, lsm  # before the next chunk's: one chunk's logits held at a time
    return out, dh


class _FrozenHead(torch.autograd.Function):
    """`_head_chunks` as an autograd op. The gradient of a row's log p(target) w.r.t. its
    hidden state does not depend on what is downstream, so the forward computes it chunk by
    chunk ([N, d], the size of the hidden states) and the backward only scales it by each
    row's incoming gradient: the head's FLOPs of a plain backward, none of its memory."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows):
        out, dh = _head_chunks(hidden, weight, targets, rows, grad=True)
        ctx.save_for_backward(dh)
        return out

    @staticmethod
    def backward(ctx, g):
        (dh,) = ctx.saved_tensors
        return (g[:, None] * dh).to(dh.dtype), None, None, None


def _decoder_states(base, batch: Batch, kernels: decoder.Kernels | None,
                    at: np.ndarray) -> torch.Tensor:
    """[len(at), d]: the decoder's last hidden states at `at`, positions in the batch's
    flat [B·W] left-padded layout (real tokens only), through `decoder.states` with
    `kernels`, else (None) the model's own forward; one gather, no copy of the rest."""
    if kernels is not None:
        hidden = decoder.states(base, batch, kernels)
        at = decoder.positions(batch)[at]
    else:
        hidden = base.get_decoder()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            position_ids=batch.position_ids, use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
    return hidden.index_select(0, to_device(torch.from_numpy(at), hidden.device))


class _Pass(NamedTuple):
    """A no-grad pass's plan: its batches (index arrays into the Encoded) and forward."""

    batches: list[np.ndarray]
    kernels: decoder.Kernels | None  # None: the model's own forward


def _no_grad_pass(model, enc: Encoded, runtime: Runtime, max_tokens: int | None) -> _Pass:
    """How a no-grad pass over `enc` runs. Where `decoder.states` serves the model: batches
    packed by real tokens (padding is free there; on a CPU half the usual default, so the
    elementwise work stays nearer the caches: benchmarks/speed_lm.py), its kernels compiled
    when `decoder.compile_pays` for this pass's predicted eager time. Else the model's own
    forward over similar-length batches with little padding."""
    base = plain_head(model)
    if base is None or not decoder.supports(base):
        return _Pass(length_batches(enc.lengths, max_tokens or batch_budget(model, runtime)),
                     None)
    seconds = None
    flops = 2 * sum(p.numel() for p in model.parameters()) * int(enc.lengths.sum())
    if (decoder.compile_setting() == "auto" and runtime.device.type == "cpu"
            and flops > decoder.NEVER_PAYS_BELOW):
        rate = cpu_matmul_gflops()["fp32" if runtime.autocast is None else "bf16"]
        seconds = flops / (rate * 1e9 * decoder.EAGER_SHARE)
    budget = max_tokens or batch_budget(model, runtime, default=4096)
    return _Pass(token_batches(enc.lengths, budget), own_kernels(model, runtime, seconds))


def own_kernels(model, runtime: Runtime, seconds: float | None = None
                ) -> decoder.Kernels | None:
    """The kernels `decoder.states` runs `model` with for a pass predicted to take
    `seconds` eager (None: unknown, so eager unless CCDS_COMPILE=on), or None where it does
    not serve the model (its own forward then: other architectures, wrapped models, a head
    that is more than a projection)."""
    base = plain_head(model)
    if base is None or not decoder.supports(base):
        return None
    return decoder.kernels_for(seconds, runtime.device, runtime.autocast or torch.float32)


def response_nll(model, batch: Batch, suffix: bool = False,
                 kernels: decoder.Kernels | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token NLL per row, response tokens per row)."""
    lp, mask = response_logprobs(model, batch, suffix, kernels)
    return -lp.sum(1), mask.sum(1)


@torch.no_grad()
def score_sequences(model, enc: Encoded, pad_id: int, runtime: Runtime, *,
                    max_tokens: int | None = None, progress: str | None = None,
                    meter=None) -> dict[str, np.ndarray]:
    """Per-sequence response statistics in input order: NLL sum, token count, and the sum
    of token probabilities (least-confidence scoring needs the mean probability).
    `max_tokens` per batch; None: as many as free device memory holds (`batch_budget`), as
    in `mean_hidden` and `option_logprobs`."""
    from .io import track

    n = len(enc)
    nll = np.zeros(n, dtype=np.float64)
    prob = np.zeros(n, dtype=np.float64)
    count = np.zeros(n, dtype=np.int64)
    run = _no_grad_pass(model, enc, runtime, max_tokens)
    model.eval()
    for index in track(run.batches, progress):
        batch = collate(enc, index, pad_id).to(runtime.device)
        with runtime.amp():
            lp, mask = response_logprobs(model, batch, kernels=run.kernels)
        stats = torch.stack([-lp.sum(1), (lp.exp() * mask).sum(1)]).double().cpu().numpy()
        nll[index], prob[index] = stats
        count[index] = np.maximum(batch.response - batch.suffix, 0)  # mask.sum(1)
        if meter is not None:
            meter.forward(batch, suffix=False, packed=run.kernels is not None)
    return {"nll_sum": nll, "prob_sum": prob, "n_tokens": count}


@torch.no_grad()
def mean_hidden(model, enc: Encoded, pad_id: int, runtime: Runtime, *,
                max_tokens: int | None = None, progress: str | None = None,
                meter=None) -> np.ndarray:
    """[N, d] float32: the decoder's last hidden state averaged over each sequence's real
    tokens (no LM head), in input order — a model's own embedding of an example."""
    from .io import track

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = np.zeros((len(enc), base.config.hidden_size), dtype=np.float32)
    model.eval()
    run = _no_grad_pass(model, enc, runtime, max_tokens)
    for index in track(run.batches, progress):
        batch = collate(enc, index, pad_id).to(runtime.device)
        with runtime.amp():
            h = _decoder_states(base, batch, run.kernels, decoder.real_positions(batch))
        rows = to_device(torch.from_numpy(np.repeat(np.arange(len(index)), batch.lengths)),
                         h.device)
        sums = h.new_zeros(len(index), h.shape[1], dtype=torch.float32).index_add_(
            0, rows, h.float())
        out[index] = (sums.cpu().numpy() / np.maximum(batch.lengths, 1)[:, None])
        if meter is not None:
            meter.forward(batch, head=False, packed=run.kernels is not None)
    return out


@torch.no_grad()
def option_logprobs(model, enc: Encoded, candidates: list[np.ndarray], pad_id: int,
                    runtime: Runtime, *, max_tokens: int | None = None,
                    progress: str | None = None, meter=None) -> list[np.ndarray]:
    """For rows that score exactly one response token: the log-probability of each candidate
    token at that position. Multiple choice with one-token options (MMLU's letters) then
    costs one forward per question instead of one per option. Needs a plain LM head."""
    from .io import track

    base = plain_head(model)
    assert base is not None, "option_logprobs needs a plain LM head"
    out: list[np.ndarray] = [np.zeros(0)] * len(enc)
    model.eval()
    run = _no_grad_pass(model, enc, runtime, max_tokens)
    for index in track(run.batches, progress):
        batch = collate(enc, index, pad_id).to(runtime.device)
        with runtime.amp():
            width = batch.input_ids.shape[1]  # each row's position predicting its one token
            at = np.arange(len(index)) * width + width - 2 - batch.suffix
            h = _decoder_states(base, batch, run.kernels, at)
            logp = F.log_softmax(base.get_output_embeddings()(h).float(), dim=-1).cpu()
        for b, i in enumerate(index):
            out[i] = logp[b, torch.as_tensor(candidates[i])].double().numpy()
        if meter is not None:
            meter.forward(batch, suffix=False, packed=run.kernels is not None)
    return out
