"""The planner: within budget always, and the paper's conclusions from its own prior."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccds.errors import CcdsError
from ccds.plan import model_size, paper_prior, parse_count, plan


@settings(max_examples=200, deadline=None)
@given(st.floats(1e15, 1e21), st.floats(1e8, 1e11), st.floats(1e7, 1e11), st.floats(1e6, 1e10),
       st.integers(1, 50))
def test_never_over_budget(budget, n_train, n_sel, tokens, tasks):
    options, ruled_out = plan(budget, n_train, n_sel, tokens, paper_prior(n_train), tasks)
    assert len(options) + len(ruled_out) == 5
    for o in options:
        assert o.total <= budget * (1 + 1e-9) and 0 < o.fraction <= 1
    assert [o.predicted for o in options] == sorted((o.predicted for o in options), reverse=True)


def test_paper_prior_reproduces_the_papers_advice():
    tokens = 1e8
    # 7B trained, 7B selecting, a quarter of full training: a cheap method wins
    best = plan(1e18, 7e9, 7e9, tokens, paper_prior(7e9))[0][0]
    assert best.method in ("bm25", "embed")
    # 70B trained with a 7B selector (ratio 10): perplexity selection pays for itself
    best = plan(4e18, 70e9, 7e9, tokens, paper_prior(70e9))[0][0]
    assert best.method == "ppl"
    # LESS's selection alone exceeds a small budget: ruled out, with both numbers
    _, out = plan(1e18, 7e9, 7e9, tokens, paper_prior(7e9))
    why = dict(out)["less"]
    assert "7.56e+18" in why and "1e+18" in why


def test_plan_command(tmp_path):
    from test_cli import ccds

    r = ccds("plan", "--budget", "4e18", "--train-model", "70e9", "--selection-model", "7e9",
             "--pool-tokens", "1e8")
    assert r.returncode == 0, r.stderr
    assert "Use ppl on" in r.stdout and "runner-up" in r.stdout


@pytest.mark.parametrize("text,n", [("7B", 7e9), ("70b", 70e9), ("1.5B", 1.5e9), ("135M", 135e6),
                                    ("7e9", 7e9), ("7000000000", 7e9), ("100k", 1e5),
                                    ("1T", 1e12), (".5B", 5e8), (" 7B ", 7e9)])
def test_counts_as_people_write_them(text, n):
    assert parse_count(text) == pytest.approx(n, rel=1e-12)
    assert model_size(text) == pytest.approx(n, rel=1e-12)


@pytest.mark.parametrize("text", ["", "B", "seven", "7X", "7 B", "-7B", "1.2.3B", "nan", "inf",
                                  "7BB"])
def test_nonsense_counts_name_the_accepted_forms(text):
    with pytest.raises(CcdsError, match="7B, 70b, 1.5B, 135M, 7e9 or 7000000000"):
        parse_count(text)


@pytest.mark.parametrize("spec", ["seven", "7X"])
def test_model_size_says_a_count_or_a_model(spec):
    with pytest.raises(CcdsError) as e:
        model_size(spec)
    assert "neither a parameter count nor a known model" in str(e.value)
    assert "1.5B" in str(e.value) and "smollm2-135m" in str(e.value)


def test_plan_command_reads_sizes_as_typed():
    from test_cli import ccds

    r = ccds("plan", "--budget", "4e18", "--train-model", "70B", "--selection-model", "7b",
             "--pool-tokens", "100M")
    assert r.returncode == 0, r.stderr
    assert "training 7e+10 params, selection 7e+09, pool 1e+08 tokens" in r.stdout


def test_budget_in_gpu_hours_is_priced_like_cost():
    """`ccds plan --budget 64 --unit gpu-hours --device h100 --mfu 0.5` plans with
    64 h x 3600 s x 989 TFLOP/s x 0.5 FLOPs and prints hours beside FLOPs."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "ccds", "plan", "--budget", "64", "--train-model", "7B",
            "--selection-model", "7B", "--pool-tokens", "1e8"]
    r = subprocess.run([*args, "--unit", "gpu-hours", "--device", "h100", "--mfu", "0.5"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith(f"budget 64 GPU-hours = {64 * 3600 * 989e12 * 0.5:.3g} FLOPs on "
                            "h100 at MFU 0.5 (given)")
    assert "GPU-h" in r.stdout.splitlines()[1]
    same = subprocess.run([*args[:5], f"{64 * 3600 * 989e12 * 0.5!r}", *args[6:]],
                          capture_output=True, text=True)
    assert r.stdout.splitlines()[2].split()[:2] == same.stdout.splitlines()[2].split()[:2]
    for bad in (["--unit", "gpu-hours"], ["--mfu", "0.5"],
                ["--unit", "gpu-hours", "--device", "h100", "--mfu", "1.5"]):
        e = subprocess.run([*args, *bad], capture_output=True, text=True)
        assert e.returncode == 2 and e.stderr.count("\n") == 1, (bad, e.stderr)
