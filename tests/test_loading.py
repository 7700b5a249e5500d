"""Loading a model for a runtime: straight onto its device, in the dtype its frozen weights
are stored in, without an fp32 copy on the way (issue 22: a 7B model loaded as 28 GB of fp32
on the host, then moved to the GPU before being cast)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ccds.models import Runtime, add_lora, load_causal_lm

META_BF16 = Runtime(torch.device("meta"), torch.bfloat16)
LORA = SimpleNamespace(lora_r=4, lora_alpha=8.0, lora_dropout=0.0,
                       target_modules=["q_proj", "v_proj"], seed=0)


def _where(model) -> set[tuple[str, torch.dtype]]:
    return {(p.device.type, p.dtype) for p in model.parameters()}


@pytest.mark.parametrize("name", ["tiny", "smollm2-135m"])  # a folder; the embedded GGUF
def test_load_goes_straight_to_the_runtime_device_in_its_dtype(name, tiny_model_dir):
    """On the meta device nothing is read: had the weights gone anywhere else first, or in
    fp32, they would not arrive as bf16 on meta."""
    model, tok, ref = load_causal_lm(str(tiny_model_dir) if name == "tiny" else name,
                                     runtime=META_BF16)
    assert _where(model) == {("meta", torch.bfloat16)}
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token_id is not None


def test_load_without_runtime_or_autocast_is_fp32(tiny_model_dir):
    """No runtime: fp32 on the CPU as before. A runtime without autocast (what full
    fine-tuning passes for its fp32 masters): fp32 on its device."""
    assert _where(load_causal_lm(str(tiny_model_dir))[0]) == {("cpu", torch.float32)}
    masters = Runtime(torch.device("meta"), None)
    assert _where(load_causal_lm(str(tiny_model_dir), runtime=masters)[0]) == {
        ("meta", torch.float32)}


def test_lora_on_a_bf16_base_is_fp32_and_place_keeps_it(tiny_model_dir):
    """peft puts a new adapter in its base layer's dtype and then back in fp32: the weights
    being trained stay fp32 masters on a base loaded in bf16."""
    rt = Runtime(torch.device("cpu"), torch.bfloat16)
    base, _, _ = load_causal_lm(str(tiny_model_dir), runtime=rt)
    model = rt.place(add_lora(base, LORA))
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}


def _mid_llama(out: Path) -> int:
    """A ~44M-parameter random-init Llama saved in bf16 (with SmolLM2's tokenizer, whose
    vocabulary sets most of the size); returns its size in fp32 bytes."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ccds.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m").path)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1536,
                      num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return 4 * sum(p.numel() for p in model.parameters())


# Peak RSS growth of one load in a fresh process: imports and the tokenizer are paid by a
# first load onto the meta device, then the peak is reset (clear_refs) before the real one.
CHILD = """
import sys
from pathlib import Path
import torch
from ccds.models import Runtime, load_causal_lm

def kb(field):
    line = next(s for s in open("/proc/self/status") if s.startswith(field))
    return int(line.split()[1]) * 1024

path, dtype = sys.argv[1], {"bf16": torch.bfloat16, "fp32": None}[sys.argv[2]]
load_causal_lm(path, runtime=Runtime(torch.device("meta"), torch.bfloat16))
Path("/proc/self/clear_refs").write_text("5")
base = kb("VmRSS")
model, _, _ = load_causal_lm(path, runtime=Runtime(torch.device("cpu"), dtype))
print(kb("VmHWM") - base, ",".join(sorted({str(p.dtype) for p in model.parameters()})))
"""


def _load_peak(path: Path, dtype: str) -> int:
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    peak, dtypes = r.stdout.split()[-2:]
    assert dtypes == {"bf16": "torch.bfloat16", "fp32": "torch.float32"}[dtype]
    return int(peak)


def test_bf16_load_never_holds_an_fp32_copy(tmp_path):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak RSS cannot be reset here (no /proc/self/clear_refs)")
    fp32_bytes = _mid_llama(tmp_path)
    peak = _load_peak(tmp_path, "bf16")
    assert peak < fp32_bytes, f"peak RSS grew {peak / 1e6:.0f} MB"
    # the control: the measurement does see an fp32 load's copy
    assert _load_peak(tmp_path, "fp32") >= fp32_bytes
