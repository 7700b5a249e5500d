"""S2L: balanced sampling, trajectories, clustering, and the reference-model baselines."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccds.score import get_method, run
from ccds.score.facility import lazy_greedy, plain_greedy
from ccds.score.s2l import balanced_order, balanced_sample, kmeans


def test_balanced_sample_takes_small_clusters_whole_and_splits_the_rest():
    labels = np.array([0] * 2 + [1] * 3 + [2] * 10 + [3] * 10)
    got = balanced_sample(labels, 13, seed=0)
    counts = np.bincount(labels[got], minlength=4)
    # visit 0 (2 ≤ 13/4: whole), 1 (3 ≤ 11/3: whole), 2 takes floor(8/2) = 4, 3 takes 4
    assert counts.tolist() == [2, 3, 4, 4]
    assert len(got) == 13 and len(set(got.tolist())) == 13
    assert np.array_equal(got, balanced_sample(labels, 13, seed=0))  # deterministic
    assert not np.array_equal(got, balanced_sample(labels, 13, seed=1))


def test_balanced_sample_floors_and_carries_the_remainder_to_larger_clusters():
    labels = np.repeat(np.arange(4), 3)
    assert np.bincount(labels[balanced_sample(labels, 6, 0)]).tolist() == [1, 1, 2, 2]
    labels = np.array([0] * 5 + [1] * 5 + [2])  # cluster 2 is the smallest: visited first
    assert np.bincount(labels[balanced_sample(labels, 6, 0)]).tolist() == [2, 3, 1]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=1, max_size=60), st.integers(0, 3))
def test_every_prefix_of_the_order_is_the_balanced_sample(labels, seed):
    labels = np.array(labels)
    order = balanced_order(labels, seed)
    assert sorted(order.tolist()) == list(range(len(labels)))
    for budget in range(len(labels) + 1):
        assert np.array_equal(np.sort(order[:budget]), balanced_sample(labels, budget, seed))


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_kmeans_is_seeded_and_finds_separated_groups(backend):
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 10, (5, 12))
    x = np.concatenate([c + rng.normal(0, 0.1, (40, 12)) for c in centers])
    a = kmeans(x, 5, seed=3, backend=backend)
    assert np.array_equal(a, kmeans(x, 5, seed=3, backend=backend))
    for g in range(5):  # every true group is one cluster
        assert len(set(a[g * 40:(g + 1) * 40].tolist())) == 1
    assert len(set(a.tolist())) == 5
    assert len(set(kmeans(x[:3], 5, seed=0, backend=backend).tolist())) <= 3


def test_lazy_greedy_matches_plain_greedy():
    e = np.random.default_rng(1).normal(size=(300, 16))
    order, evals = lazy_greedy(e, 40)
    assert np.array_equal(order, plain_greedy(e, 40))
    assert evals < 40 * 300 / 4  # lazy: far fewer gain evaluations than plain greedy


PROXY = {"proxy_hidden": 32, "proxy_layers": 1, "proxy_heads": 2, "checkpoints": 4,
         "proxy_epochs": 2, "proxy_lr": 3e-3}


@pytest.fixture(scope="module")
def proxy_cache(tmp_path_factory):
    """One cache for the module: the proxy is trained once and read by every method."""
    return tmp_path_factory.mktemp("proxy-cache")


@pytest.fixture()
def synth_pool(proxy_cache, monkeypatch):
    from ccds.data.synth import generate

    monkeypatch.setenv("CCDS_CACHE", str(proxy_cache))
    pool, _ = generate(seed=0, n_pool=160, n_val=4, n_test=4)
    return pool


def test_trajectories_match_one_example_at_a_time(synth_pool, tiny_model_dir):
    import torch

    from ccds.lm import response_nll
    from ccds.score import Context
    from ccds.score.proxy import ProxyParams, _checkpoint, _trained, trajectories
    from ccds.tokenize import collate, encode

    p = ProxyParams(tokenizer=str(tiny_model_dir), **PROXY)
    ctx = Context(progress=False)
    traj = trajectories(p, synth_pool, ctx)
    assert traj.loss.shape == (160, 4) and np.isfinite(traj.loss).all()
    assert np.all(np.diff(traj.epochs) > 0) and traj.epochs[-1] == pytest.approx(2)
    assert traj.loss[:, -1].mean() < traj.loss[:, 0].mean()  # the proxy learned something
    root, model, tok, info = _trained(p, synth_pool, ctx)
    enc = encode(synth_pool, tok, p.max_len)
    for c in (0, 3):  # the checkpoints kept after the trajectories are filled
        _checkpoint(root, info, model, c, lora=False)
        for i in (0, 7, 101):
            with torch.no_grad():
                nll, n = response_nll(model, collate(enc, np.array([i]), tok.pad_token_id))
            assert traj.loss[i, c] == pytest.approx(float(nll[0] / n[0]), rel=1e-4)
    again = trajectories(p, synth_pool, ctx)  # from the cache: same numbers, flagged
    assert again.reused and np.array_equal(again.loss, traj.loss)


@pytest.mark.parametrize("name", ["s2l", "learnability", "least_confidence", "mid_ppl",
                                  "facility_location"])
def test_reference_methods_end_to_end(name, synth_pool, tiny_model_dir, tmp_path,
                                      monkeypatch):
    params = {"tokenizer": str(tiny_model_dir), **PROXY}
    if name == "s2l":
        params["k"] = 8
    m = get_method(name, **params)
    s = run(m, synth_pool, None, cache=None)
    assert s.values.shape == (160,) and np.isfinite(s.values).all()
    assert s.stage.analytic_flops == pytest.approx(m.cost(synth_pool, None), rel=0.1)
    if not s.stage.detail.get("proxy", {}).get("reused"):  # measured only what ran here
        assert s.stage.measured_flops == pytest.approx(s.stage.analytic_flops, rel=0.1)
    if name == "s2l":  # a fresh proxy elsewhere gives the same selection: deterministic
        monkeypatch.setenv("CCDS_CACHE", str(tmp_path / "fresh"))
        again = run(get_method(name, **params), synth_pool, None, cache=None)
        assert not again.stage.detail["proxy"]["reused"]
        assert again.stage.measured_flops == pytest.approx(again.stage.analytic_flops,
                                                           rel=0.1)
        assert np.array_equal(again.values, s.values)


def test_s2l_samples_clusters_evenly(synth_pool, tiny_model_dir):
    from ccds.score import Context
    from ccds.score.proxy import ProxyParams, trajectories
    from ccds.select import select

    m = get_method("s2l", tokenizer=str(tiny_model_dir), k=8, **PROXY)
    idx = select(run(m, synth_pool, None, cache=None).values, count=40)
    traj = trajectories(ProxyParams(tokenizer=str(tiny_model_dir), **PROXY), synth_pool,
                        Context(progress=False))
    labels = kmeans(traj.loss, 8, seed=0, iters=m.params.kmeans_iters)
    assert np.array_equal(np.sort(idx), balanced_sample(labels, 40, seed=0))


def test_curriculum_is_random_subset_in_easy_to_hard_order(synth_pool, tiny_model_dir):
    from ccds.score import Context
    from ccds.score.proxy import ProxyParams, trajectories
    from ccds.select import select

    m = get_method("curriculum", tokenizer=str(tiny_model_dir), **PROXY)
    assert m.order == "given"
    idx = select(run(m, synth_pool, None, cache=None).values, count=30)
    rand = select(run(get_method("random"), synth_pool, None, cache=None).values, count=30)
    assert np.array_equal(np.sort(idx), np.sort(rand))  # the same subset as random
    ordered = m.train_order(synth_pool, idx, Context(progress=False))
    conf = trajectories(ProxyParams(tokenizer=str(tiny_model_dir), **PROXY), synth_pool,
                        Context(progress=False)).confidence[:, -1]
    assert np.all(np.diff(conf[ordered]) <= 0)


def test_trainer_keeps_a_given_order():
    from ccds.tokenize import ordered_batches

    lengths = np.array([5, 9, 3, 3, 8, 2])
    batches = ordered_batches(lengths, max_tokens=18, max_batch=3)
    assert np.array_equal(np.concatenate(batches), np.arange(6))
    assert all(lengths[b].max() * len(b) <= 18 for b in batches)


def test_s2l_and_curriculum_from_the_cli(synth_pool, tiny_model_dir, tmp_path):
    from test_cli import ccds

    from ccds.data.formats import write_examples

    write_examples(synth_pool, tmp_path / "pool.jsonl")
    proxy = [x for k, v in {"tokenizer": str(tiny_model_dir), **PROXY}.items()
             for x in ("--param", f"{k}={v}")]
    r = ccds("select", "--pool", tmp_path / "pool.jsonl", "--method", "s2l", "--param", "k=6",
             *proxy, "--fraction", "0.25", "--out", tmp_path / "s2l.jsonl")
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "s2l.jsonl").read_text().splitlines()) == 40
    r = ccds("select", "--pool", tmp_path / "pool.jsonl", "--method", "curriculum", *proxy,
             "--count", "20", "--out", tmp_path / "cur.jsonl")
    assert r.returncode == 0 and "--order given" in r.stdout, r.stderr


def test_select_from_curriculum_scores_writes_the_curriculum_order(synth_pool, tiny_model_dir,
                                                                    tmp_path):
    """`select --scores` applies the method's training order, as selecting without them does."""
    from test_cli import ccds

    from ccds.data.formats import load_examples, write_examples

    pool = tmp_path / "pool.jsonl"
    write_examples(synth_pool, pool)
    proxy = [x for k, v in {"tokenizer": str(tiny_model_dir), **PROXY}.items()
             for x in ("--param", f"{k}={v}")]
    r = ccds("score", "--pool", pool, "--method", "curriculum", *proxy, "--out",
             tmp_path / "s.parquet")
    assert r.returncode == 0, r.stderr
    ids = {}
    for name, extra in (("direct", ["--method", "curriculum"]),
                        ("scores", ["--scores", tmp_path / "s.parquet"])):
        r = ccds("select", "--pool", pool, *extra, *proxy, "--count", "20", "--out",
                 tmp_path / f"{name}.jsonl")
        assert r.returncode == 0 and "--order given" in r.stdout, r.stderr
        ids[name] = [e.id for e in load_examples(tmp_path / f"{name}.jsonl")]
    assert ids["scores"] == ids["direct"]


def test_composition_and_purity(tmp_path):
    from test_cli import ccds

    from ccds import Example
    from ccds.data.composition import cluster_purity, composition, group
    from ccds.data.formats import write_examples

    assert group("bigbench/arithmetic/3_digit") == "bigbench"
    assert group("bigbench/arithmetic/3_digit", 2) == "bigbench/arithmetic"
    pool = [Example(f"e{i}", "p", "r", source=["gsm8k", "alpaca", "bigbench/x"][i % 3])
            for i in range(30)]
    sub = [e for e in pool if e.source == "gsm8k"][:5] + [pool[1]]
    comp = composition(pool, {"mine": sub})
    assert comp["pool"]["gsm8k"] == pytest.approx(1 / 3)
    assert comp["subsets"]["mine"]["gsm8k"] == pytest.approx(5 / 6)
    assert comp["subsets"]["mine"]["bigbench"] == 0
    labels = np.arange(30) % 3
    assert cluster_purity(labels, [e.source for e in pool]) == 1.0
    assert cluster_purity(np.zeros(30), [e.source for e in pool]) == pytest.approx(1 / 3)
    write_examples(pool, tmp_path / "pool.jsonl")
    write_examples(sub, tmp_path / "sub.jsonl")
    r = ccds("data", "compare", "--pool", tmp_path / "pool.jsonl", "--subset",
             f"mine={tmp_path / 'sub.jsonl'}", "--out", tmp_path / "comp.png")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "comp.png").stat().st_size > 1000 and "83.3%" in r.stdout


@pytest.mark.slow
def test_sigkilled_scoring_resumes_to_the_same_scores(tmp_path, figure):
    """`ccds score --method s2l` SIGKILLed at random moments (during proxy training and
    between trajectory columns), again and again, then run to the end: the scores equal an
    uninterrupted run's exactly."""
    import json
    import os
    import subprocess
    import sys

    from conftest import kill_until_done

    from ccds.data.formats import write_examples
    from ccds.data.synth import generate
    from ccds.score.base import read_scores

    write_examples(generate(seed=3, n_pool=100)[0], tmp_path / "pool.jsonl")

    def start(name):
        return subprocess.Popen(
            [sys.executable, "-m", "ccds", "score", "--pool", str(tmp_path / "pool.jsonl"),
             "--method", "s2l", "--param", "k=8", "--out", str(tmp_path / f"{name}.parquet")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "CCDS_CACHE": str(tmp_path / f"cache-{name}"),
                 "CCDS_PROGRESS": "0", "CCDS_DTYPE": "fp32"})

    p = start("ref")
    assert p.wait(timeout=600) == 0, p.stderr.read()

    def progress() -> int:
        root = tmp_path / "cache-k" / "proxy"
        cols = list(root.glob("*/columns.json"))
        try:
            done = len(json.loads(cols[0].read_text())) if cols else 0
        except ValueError:  # being replaced this instant
            done = 0
        return done + len(list(root.glob("*/train*/checkpoint-*")))

    p, seen = kill_until_done(lambda: start("k"), progress, steps=(3, 6), linger=0.2)
    assert p.returncode == 0, p.stderr.read()
    figure("scoring (S2L): SIGKILLs survived (progress at each)", f"{len(seen)} {seen}")
    assert len(seen) >= 3, seen
    ref, got = (read_scores(tmp_path / f"{n}.parquet") for n in ("ref", "k"))
    assert np.array_equal(ref.values, got.values) and ref.ids == got.ids
