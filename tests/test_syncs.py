"""Host–device synchronisations per micro-batch, counted on the CPU (issue 31).

On a GPU every read of a device value (`.item()`, `int(t)`, `.tolist()`, `.cpu()`, a boolean
mask's `nonzero`) waits for the queue to drain, so a pass that reads once per micro-batch
keeps the GPU idle between batches. The CPU has no queue, but the same calls can be counted:
`Syncs` intercepts them and attributes each to the innermost frame outside torch, so the
test counts what ccds itself asks for (transformers' own checks are reported apart).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ccds import Example
from ccds.train import TrainConfig, train

SRC = str(Path(__file__).resolve().parents[1] / "src" / "ccds")
_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
          torch.ops.aten.masked_select.default}
_MASKED = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default,
           torch.ops.aten.index_put.default}


def _caller() -> str:
    """The innermost frame outside torch: ccds's file:line, or 'other' (transformers, peft).
    AdamW reads its step counters, which live on the host on every device
    (capturable=False): 'optimizer', not a device read."""
    stack = traceback.extract_stack()[:-2]
    if any(f"{os.sep}torch{os.sep}optim{os.sep}" in f.filename for f in stack):
        return "optimizer"
    for frame in reversed(stack):
        if f"{os.sep}torch{os.sep}" in frame.filename or frame.filename == __file__:
            continue
        return f"{frame.filename}:{frame.lineno}" if frame.filename.startswith(SRC) else "other"
    return "other"


class Syncs(TorchDispatchMode):
    """Counts device reads by where they come from: the ops that copy a value to the host
    (a scalar read, nonzero, boolean indexing) and the Python-level `.cpu()`, `.numpy()`,
    `.tolist()` on tensors."""

    def __init__(self):
        super().__init__()
        self.where: Counter[str] = Counter()
        self._patched: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        masked = func in _MASKED and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()))
        if func in _READS or masked:
            self.where[_caller()] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        for name in ("cpu", "tolist"):  # numpy() of a device tensor raises: never a read
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def counted(t, *a, _original=original, **kw):
                self.where[_caller()] += 1
                return _original(t, *a, **kw)
            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    @property
    def ccds(self) -> int:
        return sum(n for k, n in self.where.items() if k.startswith(SRC))


def _examples(n=24):
    return [Example(f"e{i}", f"Repeat the word number {i % 4}.", f"word{i % 4} word{i % 4}")
            for i in range(n)]


def test_training_reads_the_device_once_per_optimizer_step(tiny):
    """Several micro-batches per step (small micro_tokens, grad_accum 2): ccds reads the
    device once per step (the step's loss), whatever the number of micro-batches."""
    model, tok, _ = tiny
    cfg = TrainConfig(epochs=1, lr=1e-3, batch_tokens=256, grad_accum=2, micro_tokens=64,
                      max_batch=8, measure_flops=False)
    syncs = Syncs()
    with syncs:
        r = train(_examples(), cfg, model=model, tokenizer=tok, progress=None)
    assert r.steps >= 2
    assert syncs.ccds <= r.steps, (dict(syncs.where), r.steps)


def test_scoring_reads_the_device_once_per_batch(tiny):
    from ccds.lm import score_sequences
    from ccds.models import pick_runtime
    from ccds.tokenize import encode, length_batches

    model, tok, _ = tiny
    enc = encode(_examples(), tok, 64)
    n_batches = len(length_batches(enc.lengths, 256))
    syncs = Syncs()
    with syncs:
        score_sequences(model, enc, tok.pad_token_id, pick_runtime(dtype="fp32"),
                        max_tokens=256)
    assert n_batches >= 3
    assert syncs.ccds <= n_batches, dict(syncs.where)


def test_the_counter_sees_what_it_should(tiny):
    """The instrument itself: each kind of read from ccds's frames is counted once."""
    t = torch.arange(4.0)
    syncs = Syncs()
    with syncs:
        _ = [t.sum().item(), t.tolist(), t.cpu(), t[t > 1], int(t.max())]
    # called from this test file, not from src/ccds: attributed to 'other'
    assert syncs.ccds == 0 and syncs.where["other"] == 5, dict(syncs.where)
    assert "torch" in sys.modules and np.isfinite(t.numpy()).all()
