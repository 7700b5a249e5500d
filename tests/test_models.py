import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ccds import CcdsError, models
from ccds.models import cpu_prefers_bf16, pick_runtime, resolve


def test_embedded_aliases_resolve_offline():
    smol = resolve("smollm2-135m")
    assert (Path(smol.path) / "model.safetensors").exists()
    assert len(smol.fingerprint) == 64  # sha256 of the GGUF
    mini = resolve("minilm")
    assert (Path(mini.path) / "config.json").exists()


def test_unknown_models_fail_with_a_clear_message(tmp_path):
    with pytest.raises(CcdsError, match="unknown model 'not a model'"):
        resolve("not a model")
    with pytest.raises(CcdsError, match="no config.json"):
        resolve(str(tmp_path))
    ref = resolve("org/some-model")  # a hub id: resolved lazily, loaded by transformers
    assert ref.path == "org/some-model"


def test_local_dir_fingerprint_tracks_content(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    a = resolve(str(copy)).fingerprint
    cfg = copy / "config.json"
    cfg.write_text(cfg.read_text().replace('"hidden_act"', '"hidden_act" ', 1))
    assert resolve(str(copy)).fingerprint != a


def test_runtime_choice(monkeypatch):
    rt = pick_runtime()
    want = torch.bfloat16 if cpu_prefers_bf16() else None
    if not torch.cuda.is_available():
        assert rt.device.type == "cpu" and rt.autocast == want
    monkeypatch.setenv("CCDS_DTYPE", "bf16")
    assert pick_runtime().autocast == torch.bfloat16
    monkeypatch.setenv("CCDS_DTYPE", "fp32")
    assert pick_runtime().autocast is None
    monkeypatch.setenv("CCDS_DTYPE", "fp8")
    with pytest.raises(CcdsError, match="unknown dtype"):
        pick_runtime()


def test_cpu_dtype_is_measured_once_and_cached(monkeypatch, tmp_path):
    """`auto` picks bf16 only where its matmul is measured 1.25x fp32's, and a machine keeps
    its answer (read from the cache, not re-measured)."""
    monkeypatch.setenv("CCDS_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    rates = {torch.float32: 330.0, torch.bfloat16: 168.0}  # AVX512-BF16 without AMX
    calls = []

    def measured():
        calls.append(1)
        return dict(rates)

    monkeypatch.setattr(models, "_matmul_gflops", measured)
    assert cpu_prefers_bf16() is False and len(calls) == 1
    [cached] = (tmp_path / "cpu-dtype").glob("*.json")
    assert '"bf16_gflops": 168.0' in cached.read_text()
    rates[torch.bfloat16] = 418.0  # a faster bf16 now would not flip the recorded choice
    assert cpu_prefers_bf16() is False and len(calls) == 1
    cached.unlink()
    assert cpu_prefers_bf16() is True and len(calls) == 2
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)  # emulated bf16
    assert cpu_prefers_bf16() is False and len(calls) == 2
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("CCDS_CACHE", str(blocker))  # unwritable: measured once per process
    assert cpu_prefers_bf16() is True and cpu_prefers_bf16() is True and len(calls) == 3


def test_cpu_dtype_measurement_is_real():
    rate = models._matmul_gflops(256, 0.05)
    assert rate[torch.float32] > 1 and rate[torch.bfloat16] > 0.1


def test_smollm2_loads_with_chat_template(smollm2):
    model, tok, ref = smollm2
    assert ref.name == "smollm2-135m"
    assert tok.chat_template and tok.pad_token_id is not None
    assert model.config.num_hidden_layers == 30 and not model.training


def test_place_casts_frozen_weights_before_it_moves_them(tiny_model_dir):
    """Every tensor lands on the device once, already in its final dtype: frozen weights as
    bf16, never as an fp32 copy cast there (a 7B model's 28 GB spike on the GPU). The meta
    device stands in for the GPU; a function mode sees each `.to` that lands on it."""
    from collections import Counter
    from types import SimpleNamespace

    from torch.overrides import TorchFunctionMode

    from ccds.models import Runtime, add_lora, load_causal_lm

    class Landings(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen: Counter = Counter()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.Tensor.to and out is not args[0] and out.device.type == "meta":
                self.seen[out.dtype, out.numel()] += 1
            return out

    base, _, _ = load_causal_lm(str(tiny_model_dir))
    lora = SimpleNamespace(lora_r=4, lora_alpha=8.0, lora_dropout=0.0,
                           target_modules=["q_proj", "v_proj"], seed=0)
    model = add_lora(base, lora)
    with Landings() as spy:
        Runtime(torch.device("meta"), torch.bfloat16).place(model)
    final = [*model.parameters(), *model.buffers()]
    assert spy.seen == Counter((t.dtype, t.numel()) for t in final)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


@pytest.mark.parametrize("family,kw,want", [
    ("MistralConfig", {"sliding_window": 8}, (8, 4)),  # every layer
    ("Gemma3TextConfig", {"sliding_window": 16, "layer_types": ["sliding_attention"] * 3
                          + ["full_attention"]}, (16, 3)),
    ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
     (8, 2)),
    ("LlamaConfig", {}, (0, 0)),
])
def test_cache_windows_read_either_kwargs_shape(monkeypatch, family, kw, want):
    """transformers 5.2x gives the KV cache's kwargs per layer; earlier 5.x (the GPU image's
    5.17) one dict shared by every layer, with the window whenever any layer slides."""
    import transformers
    import transformers.cache_utils as cu

    cfg = getattr(transformers, family)(hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=256, **kw)
    assert models._cache_windows(cfg) == want
    real = cu.get_layer_types_and_kwargs

    def shared(c):  # what 5.17 returns: the types and one dict
        types, per_layer = real(c)
        return types, dict(next((k for k in per_layer if k), {}))

    monkeypatch.setattr(cu, "get_layer_types_and_kwargs", shared)
    assert isinstance(shared(cfg)[1], dict)
    assert models._cache_windows(cfg) == want


_REUSE = """
import resource, sys, torch
from ccds import models
if sys.argv[1] == "keep":
    assert models.keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
seen = []
for _ in range(8):  # a batch's temporaries: three of 20 MB at once, touched, then freed
    before = faults()
    xs = [torch.empty(5 << 20).fill_(1.0) for _ in range(3)]
    del xs
    seen.append(faults() - before)
print(max(seen[4:]))  # the first batches fault the heap's new pages in anyway
"""


@pytest.mark.skipif(not models._glibc(), reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
    """After `keep_freed_memory`, three 20 MB blocks freed together and allocated again
    come back from the heap once it has grown. As glibc comes, its trim threshold (twice
    its last mmap threshold) hands them back, and each round faults them in again."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD"))}
    kept = subprocess.run([sys.executable, "-c", _REUSE, "keep"], env=env, check=True,
                          capture_output=True, text=True)
    pages = (20 << 20) // resource.getpagesize()
    assert int(kept.stdout.split()[-1]) < pages // 10


def test_a_tuned_allocator_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    models.keep_freed_memory.cache_clear()
    try:
        assert not models.keep_freed_memory()
    finally:
        models.keep_freed_memory.cache_clear()
