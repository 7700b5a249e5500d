"""DSIR: the stable hash, the streamed passes (shards merge by addition), seeded Gumbel
resampling against plain top-k, Laplace smoothing, the length filter, bad parameters, the
CLI, and agreement with p-lambda's `data-selection` on a real pool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ccds import CcdsError, Example, Target
from ccds.data.formats import write_examples
from ccds.data.sources import save_target
from ccds.data.synth import generate
from ccds.score import Context, dsir, get_method, run
from ccds.score.base import Backend
from ccds.select import select

ROOT = Path(__file__).resolve().parents[1]
CTX = Context(progress=False)


@pytest.fixture(scope="module")
def synth():
    pool, targets = generate(seed=0, n_pool=400, n_test=5)
    return pool, next(t for t in targets if t.name == "synth-arithmetic")


def scores(pool, target, ctx=CTX, **params) -> np.ndarray:
    return run(get_method("dsir", **params), pool, target, ctx=ctx, cache=None).values


def test_hash_is_stable_across_processes_and_machines():
    """Fixed values (SHA-256 mod B, the reference's hash), whatever PYTHONHASHSEED is."""
    assert [dsir.bucket(g, 10_000) for g in ("the", "hello world", "über straße", "=")] == [
        8288, 1529, 9697, 2739]
    code = ("from ccds.score.dsir import bucket; "
            "print([bucket(g, 10_000) for g in ('the', 'hello world', 'x y')])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout
            for seed in ("1", "2")}
    assert outs == {f"{[8288, 1529, dsir.bucket('x y', 10_000)]}\n"}


def test_featurisation_by_hand():
    """Lowercased word/punctuation runs; every unigram and bigram counted in its bucket."""
    assert dsir.words("Good muffins cost $3.88\nin New-York.") == [
        "good", "muffins", "cost", "$", "3", ".", "88", "in", "new", "-", "york", "."]
    # Unicode word characters as nltk's tokenizer (the `regex` engine) has them: combining
    # marks stay inside a word, superscripts are not word characters
    tricky = "नमस्ते x³ ½ a_b e\u0301t\u00e9 👍\u200d"
    assert dsir.words(tricky) == ["नमस्ते", "x", "³", "½", "a_b", "e\u0301t\u00e9", "👍",
                                  "\u200d"]
    try:
        from nltk.tokenize import WordPunctTokenizer
    except ImportError:
        pass
    else:
        assert dsir.words(tricky) == WordPunctTokenizer().tokenize(tricky.lower())
    e = Example("a", "A b", "a.")
    f = dsir.Featuriser(buckets=97)
    grams = ["a", "b", "a", ".", "a b", "b a", "a ."]
    expected = np.bincount([dsir.bucket(g, 97) for g in grams], minlength=97)
    assert np.array_equal(f.counts([e]), expected)
    ids, rows, lengths = f.occurrences([e, Example("b", "", "x")])
    assert sorted(ids[rows == 0]) == sorted(dsir.bucket(g, 97) for g in grams)
    assert lengths.tolist() == [4, 1] and dsir.ngram_count(4, 2) == 7
    assert dsir.Featuriser(buckets=97, text="prompt").counts([e]).sum() == 3  # a, b, "a b"


def test_log_weights_by_hand():
    """log w = Σ count · (log p_target − log p_raw), ε = 1e-8 inside each log."""
    pool = [Example("p0", "apple pie", "yes"), Example("p1", "zebra", "no"),
            Example("p2", "apple", "no")]
    target = Target("t", [Example("v", "apple pie", "yes")], [])
    f = dsir.Featuriser()
    raw, tgt = f.counts(pool), f.counts(target.val)
    ratio = np.log(tgt / tgt.sum() + 1e-8) - np.log(raw / raw.sum() + 1e-8)
    expected = [f.counts([e]) @ ratio for e in pool]
    got = scores(pool, target, resample="topk", min_length=0)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[0] > got[2] > got[1]


def test_shards_merge_to_one_pass(synth):
    """Bucket counts of shards add up to the counts of the whole pool; scoring in small
    shards and chunks gives the same scores, and the same cache key."""
    pool, target = synth
    f = dsir.Featuriser(chunk=7)
    whole = dsir.Featuriser().counts(pool)
    assert np.array_equal(sum(f.counts(pool[lo:lo + 33]) for lo in range(0, len(pool), 33)),
                          whole)
    one = scores(pool, target)
    small = get_method("dsir", shard_size=50)
    chunked = Context(progress=False, backend=Backend(chunk=64))
    assert np.array_equal(run(small, pool, target, ctx=chunked, cache=None).values, one)
    assert small.key(pool, target) == get_method("dsir").key(pool, target)


def test_seeded_gumbel_against_top_k(synth):
    """Gumbel scores are log w plus the seed's Gumbel draws: the same seed gives the same
    scores (in a fresh memo too), another seed others; top-k is log w whatever the seed."""
    pool, target = synth
    a = scores(pool, target, seed=1, min_length=0)
    dsir._MEMO.clear()
    assert np.array_equal(scores(pool, target, seed=1, min_length=0), a)
    assert not np.array_equal(scores(pool, target, seed=2, min_length=0), a)
    logw = scores(pool, target, resample="topk", min_length=0)
    assert np.array_equal(scores(pool, target, resample="topk", seed=2, min_length=0), logw)
    np.testing.assert_allclose(a - logw, np.random.default_rng(1).gumbel(size=len(pool)),
                               atol=1e-9)


def test_gumbel_top_k_samples_in_proportion_to_w():
    """argmax of log w + Gumbel noise picks i with probability w_i / Σw (the property that
    makes the top k a sample without replacement ∝ w)."""
    logw = np.log([0.1, 0.2, 0.3, 0.4])
    rng = np.random.default_rng(0)
    picks = np.argmax(logw + rng.gumbel(size=(20_000, 4)), axis=1)
    np.testing.assert_allclose(np.bincount(picks) / 20_000, [0.1, 0.2, 0.3, 0.4], atol=0.015)


def test_laplace_smoothing():
    """α is added to every target bucket count; large α tends to a uniform target."""
    raw, tgt = np.array([5, 3, 2, 0]), np.array([4, 0, 1, 0])
    np.testing.assert_allclose(dsir.log_ratio(raw, tgt, 0.5),
                               np.log((tgt + 0.5) / 7 + 1e-8) - np.log(raw / 10 + 1e-8))
    unsmoothed = dsir.log_ratio(raw, tgt)
    assert unsmoothed[1] == pytest.approx(np.log(1e-8) - np.log(0.3 + 1e-8))
    flat = dsir.log_ratio(raw, tgt, 1e9)
    np.testing.assert_allclose(flat[:3], np.log(0.25) - np.log(raw[:3] / 10), rtol=1e-6)
    pool = [Example("p0", "apple pie", "yes"), Example("p1", "zebra crossing", "no")]
    target = Target("t", [Example("v", "apple pie", "yes")], [])
    plain = scores(pool, target, resample="topk", min_length=0)
    smooth = scores(pool, target, resample="topk", min_length=0, smoothing=1.0)
    assert plain[1] < -50 < smooth[1]  # unseen n-grams no longer cost ~ log ε each


def test_short_examples_rank_after_longer_ones(synth):
    pool, target = synth
    lengths = np.array([len(dsir.words(f"{e.prompt}\n{e.response}")) for e in pool])
    cut = int(np.median(lengths))
    for resample in ("gumbel", "topk"):
        s = scores(pool, target, resample=resample, min_length=cut)
        free = scores(pool, target, resample=resample, min_length=0)
        short = lengths < cut
        assert s[short].max() < s[~short].min()
        for group in (short, ~short):  # the order within each group is kept
            assert np.array_equal(np.argsort(s[group]), np.argsort(free[group]))
    # all short (or none): the plain scores
    assert np.array_equal(scores(pool, target, min_length=10**6),
                          scores(pool, target, min_length=0))


def test_bad_parameters_fail_before_any_work(monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("featurised before the parameters were checked")

    monkeypatch.setattr(dsir, "words", no_work)
    for bad, field in (({"resample": "gumble"}, "resample"), ({"buckets": 0}, "buckets"),
                       ({"smoothing": -1}, "smoothing"), ({"text": "response"}, "text"),
                       ({"ngrams": 0}, "ngrams"), ({"min_length": -1}, "min_length"),
                       ({"bucket": 5}, "bucket")):
        with pytest.raises(CcdsError, match=f"bad parameter {field} for method 'dsir'"):
            get_method("dsir", **bad)


def test_cost_is_the_metered_arithmetic(synth):
    """No model: 2 FLOPs per n-gram occurrence, the same before running and when metered."""
    pool, target = synth
    m = get_method("dsir", resample="topk", min_length=0)
    s = run(m, pool, target, ctx=CTX, cache=None)
    f = dsir.Featuriser()
    assert m.cost(pool, target) == 2.0 * sum(f.occurrences([e])[0].size for e in pool)
    assert s.stage.analytic_flops == m.cost(pool, target) == s.stage.measured_flops


def test_cli_scores_and_selects_with_dsir(synth, tmp_path, monkeypatch):
    """`ccds score --method dsir --target ...` end to end; a bad --param is one line, exit 2."""
    import contextlib
    import io

    from ccds.cli import main
    from ccds.score import read_scores

    def ccds(*args) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as e:
                return e.code or 0, out.getvalue(), err.getvalue()
        return 0, out.getvalue(), err.getvalue()

    monkeypatch.setenv("CCDS_CACHE", str(tmp_path / "cache"))
    pool, target = synth
    write_examples(pool, tmp_path / "pool.jsonl")
    save_target(target, tmp_path / "target")
    args = ["--pool", tmp_path / "pool.jsonl", "--method", "dsir", "--target",
            tmp_path / "target", "--param", "min_length=0", "--seed", "3"]
    code, out, err = ccds("score", *args, "--out", tmp_path / "s.parquet")
    assert code == 0 and "dsir: scored 400 examples" in out, err
    got = read_scores(tmp_path / "s.parquet")
    assert got.method == "dsir"
    np.testing.assert_allclose(got.values, scores(pool, target, seed=3, min_length=0))
    code, out, err = ccds("select", *args, "--fraction", "0.1", "--out", tmp_path / "sub.jsonl")
    assert code == 0 and "selected 40 of 400" in out, err
    code, out, err = ccds("score", *args, "--param", "resample=gumble", "--out",
                          tmp_path / "t.parquet")
    assert code == 2 and err.count("\n") == 1 and "bad parameter resample" in err, err


@pytest.mark.slow
def test_ray_backend_gives_the_local_scores(synth, tmp_path):
    """Both passes on a local Ray cluster (pass 1 as tasks over shards, pass 2 on actors):
    the local scores, byte for byte, and the same metered FLOPs."""
    pytest.importorskip("ray")
    import json
    import textwrap

    pool, target = synth
    write_examples(pool, tmp_path / "pool.jsonl")
    save_target(target, tmp_path / "target")
    script = textwrap.dedent(f"""
        import json, numpy as np
        from ccds.data.formats import load_examples
        from ccds.data.sources import load_target_folder
        from ccds.flops import Meter
        from ccds.score import Context, get_method
        from ccds.score.base import Backend
        pool = load_examples({str(tmp_path / "pool.jsonl")!r})
        target = load_target_folder({str(tmp_path / "target")!r})
        out = {{}}
        for kind in ("local", "ray"):
            ctx = Context(progress=False, backend=Backend(kind=kind, shard_size=100,
                                                          work={str(tmp_path / "w")!r}))
            meter = Meter("dsir", "selection", None, True)
            with meter:
                s = get_method("dsir", shard_size=150).score(pool, target, ctx, meter)
            out[kind] = [s.tolist(), meter.stage.analytic_flops, meter.stage.measured_flops]
        print(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_ADDRESS": "local", "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 2}),
                "RAY_USAGE_STATS_ENABLED": "0", "CCDS_CACHE": str(tmp_path / "cache")})
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(list((tmp_path / "w").rglob("out-*.npy"))) == 4  # pass 2: 4 shards on Ray
    assert out["ray"][0] == out["local"][0]
    assert out["ray"][1] == out["local"][1] == out["local"][2] > 0
    assert out["ray"][2] == pytest.approx(out["local"][2])


@pytest.mark.data
def test_agrees_with_data_selection_on_a_real_pool(shared_data, tmp_path):
    """Issue 23's check against p-lambda's implementation: Spearman ≥ 0.99 of the log
    importance weights and ≥ 95% overlap of the top 5%, by log w and as each selects."""
    pytest.importorskip("data_selection")
    pytest.importorskip("nltk")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from dsir import compare

    from ccds.data.sources import load_alpaca, load_gsm8k, load_target

    gsm8k = load_target("gsm8k", shared_data)
    held_out = {e.id for e in gsm8k.val}  # V is 8 train examples: not in the pool
    pool = load_alpaca(shared_data) + [e for e in load_gsm8k(shared_data)[:2000]
                                       if e.id not in held_out]
    for target in (load_target("mmlu", shared_data), gsm8k):
        row = compare(pool, target, tmp_path / target.name)
        assert row["spearman"] >= 0.99, row
        assert row["overlap_logw"] >= 0.95 and row["overlap_selected"] >= 0.95, row
    # with the defaults (Gumbel, 100 tokens at least) it is targeted: GSM8K's top 5% is
    # mostly GSM8K where the pool is 29% GSM8K
    top = select(scores(pool, gsm8k, seed=0), fraction=0.05)
    assert np.mean([pool[i].source == "gsm8k" for i in top]) > 0.8
