"""Shared fixtures: the real embedded SmolLM2, a tiny random-init Llama with its tokenizer,
and the shared data directory (tests needing it skip cleanly when it is absent).

Reliability tests record what they survived (`figure`); the run ends with a table of those
figures, the numbers docs/reliability.md quotes."""

from __future__ import annotations

from pathlib import Path

import pytest

_FIGURES: dict[str, str] = {}


@pytest.fixture()
def figure():
    """figure(name, value): report a reliability figure at the end of the run."""
    def record(name: str, value) -> None:
        _FIGURES[name] = str(value)
    return record


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("reliability figures (docs/reliability.md)")
        for name, value in sorted(_FIGURES.items()):
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $CCDS_DATA_DIR); tests using it skip cleanly when it is absent."""
    from ccds.data.sources import default_data_dir

    p = default_data_dir()
    if p is None:
        pytest.skip("shared data not found; set CCDS_DATA_DIR")
    return p


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer, ref) of the real embedded SmolLM2-135M-Instruct."""
    from ccds.models import load_causal_lm

    return load_causal_lm("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def build_tiny_llama(out: Path, vocab_size: int | None = None) -> Path:
    """A 2-layer random-init Llama with SmolLM2's tokenizer (chat template included), saved
    in `out` (the memory benchmark uses it too). A `vocab_size` below the tokenizer's makes
    the mismatched pair of the bad-input catalogue."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ccds.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m").path)
    cfg = LlamaConfig(vocab_size=vocab_size or len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      initializer_range=0.2,  # large enough for LoRA to move the logits
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture()
def tiny(tiny_model_dir):
    from ccds.models import load_causal_lm

    return load_causal_lm(str(tiny_model_dir))


def kill_until_done(start, progress, steps: tuple[int, int] = (1, 3), seed: int = 0,
                    linger: float = 0.3):
    """Start a process, SIGKILL it a moment after `progress()` has grown by a random number
    of `steps`, and start it again, until one run finishes. Returns (the finished process,
    progress at each kill)."""
    import random
    import signal
    import time

    rng, seen = random.Random(seed), []
    while True:
        p, goal = start(), progress() + rng.randint(*steps)
        while p.poll() is None and progress() < goal:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, linger))
        if p.poll() is not None:
            return p, seen
        p.send_signal(signal.SIGKILL)
        p.wait()
        seen.append(progress())
