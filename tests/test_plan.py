"""The planner: within budget always, and the paper's conclusions from its own prior."""

from hypothesis import given, settings
from hypothesis import strategies as st

from ccds.plan import paper_prior, plan


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
