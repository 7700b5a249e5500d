"""The Ray backend's actor, built directly in this process (no cluster): it resolves the dtype
the user asked for on its own device, reports it, and counts op by op only its first batches
over all its shards (issue 31). Skips when ray is not installed."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

pytest.importorskip("ray")

from ccds import models  # noqa: E402
from ccds.data.synth import generate  # noqa: E402
from ccds.errors import CcdsError  # noqa: E402
from ccds.flops import SAMPLED_BATCHES, FlopCounter, Meter, Sample  # noqa: E402
from ccds.models import causal_lm, pick_runtime  # noqa: E402
from ccds.score import on_ray  # noqa: E402
from ccds.score.base import Pass  # noqa: E402
from ccds.score.ppl import SequenceStats  # noqa: E402

MEASURED = on_ray.STATS.index("measured_flops")


class _Rows(Pass):
    """A pass that loads nothing: one zero per example."""

    def __call__(self, examples, runtime, meter, progress=None):
        return np.zeros((len(examples), 1))


def _batch(examples, lo: int = 0) -> dict[str, np.ndarray]:
    return {"row": np.arange(lo, lo + len(examples)),
            **{k: np.array([getattr(e, k) for e in examples])
               for k in ("id", "prompt", "response", "source")}}


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the actor sets its own


def test_workers_resolve_auto_on_their_own_device(monkeypatch, one_thread):
    """A CPU head without bf16 resolves `auto` to fp32; its GPU workers were handed that
    and loaded the model in fp32. They get `auto` and pick bf16; a forced dtype stays."""
    monkeypatch.delenv("CCDS_DTYPE", raising=False)
    monkeypatch.setattr(models, "cpu_prefers_bf16", lambda: False)
    driver = pick_runtime()
    assert (driver.device.type, driver.dtype_name) == ("cpu", "fp32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 0)
    actor = on_ray._Actor(_Rows(), on_ray._asked(driver), True, 1)
    assert (actor.runtime.device.type, actor.runtime.dtype_name) == ("cuda", "bf16")
    assert actor.sample.size == SAMPLED_BATCHES
    out = actor(_batch(generate(seed=0, n_pool=3)[0]))
    assert out["dtype"].tolist() == ["bf16"] * 3  # what the driver records and compares
    forced = on_ray._Actor(_Rows(), on_ray._asked(pick_runtime(dtype="fp32")), True, 1)
    assert forced.runtime.dtype_name == "fp32"
    monkeypatch.setenv("CCDS_DTYPE", "fp16")  # the driver's environment forces it too
    assert on_ray._asked(pick_runtime()) == "fp16"


def test_workers_that_disagree_on_the_dtype_stop_the_pass(tmp_path):
    assert on_ray._one_dtype(set(), tmp_path) is None
    assert on_ray._one_dtype({"bf16"}, tmp_path) == "bf16"
    with pytest.raises(CcdsError, match=r"resolved the dtype differently \(bf16, fp16\)"):
        on_ray._one_dtype({"bf16", "fp16"}, tmp_path)


def test_an_actor_counts_its_first_batches_over_all_shards(tiny_model_dir, monkeypatch,
                                                           one_thread):
    """Off the CPU each shard's meter restarted the sample: every shard's first batches
    went through the Python hook. The actor's sample now spans its shards: only its first
    `size` batches are counted, later shards count nothing and are charged at the sample's
    ratio, and the measured total stays within 5% of a full count."""
    pool = generate(seed=0, n_pool=24)[0]
    shards = [pool[lo:lo + 8] for lo in range(0, 24, 8)]
    p = SequenceStats(partial(causal_lm, str(tiny_model_dir)), max_len=128, batch_tokens=256)
    done = {"batches": 0}
    ops: dict[int, int] = {}  # batches reported before an op -> ops the hook saw
    hook, batch = FlopCounter.__torch_dispatch__, Meter._batch

    def counting(self, func, types, args=(), kwargs=None):
        ops[done["batches"]] = ops.get(done["batches"], 0) + 1
        return hook(self, func, types, args, kwargs)

    def reported(self, analytic):
        done["batches"] += 1
        return batch(self, analytic)

    monkeypatch.setattr(FlopCounter, "__torch_dispatch__", counting)
    monkeypatch.setattr(Meter, "_batch", reported)
    runs = {}
    for size in (None, "two shards"):  # a full count (the CPU's), then a sample
        if size is not None:  # one batch more than the first shard has
            size = runs[None][2][0] + 1
        actor = on_ray._Actor(p, "fp32", True, 1)
        actor.sample = Sample(size)
        done["batches"] = 0
        ops.clear()
        outs, ends = [], []
        for i, s in enumerate(shards):
            outs.append(actor(_batch(s, lo=8 * i)))
            ends.append(done["batches"])
        runs[size] = (outs, dict(ops), ends, actor.sample)
    (full, _, ends, _), (sampled, seen, ends_sampled, sample) = runs[None], runs[size]
    assert ends == ends_sampled and ends[0] < size < ends[1]  # the sample spans two shards
    assert sample.batches == size
    assert sorted(seen) == list(range(size))  # ops of the sample's batches only, none after
    for a, b in zip(full, sampled, strict=True):
        np.testing.assert_allclose(a["x"], b["x"], rtol=1e-6)
    total = [sum(o["stats"][0, MEASURED] for o in outs) for outs in (full, sampled)]
    assert abs(total[1] / total[0] - 1) < 0.05
