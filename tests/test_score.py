"""Selection methods: the interface, the cache, random, BM25 and embeddings."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from ccds import CcdsError, Example, Target
from ccds.data.synth import generate
from ccds.flops import Ledger
from ccds.score import REGISTRY, get_method, run
from ccds.score.bm25 import tokenize
from ccds.select import select


@pytest.fixture(scope="module")
def synth():
    return generate(seed=0, n_pool=1500, n_test=10)


def test_registry_and_bad_params():
    assert {"random", "bm25", "embed"} <= set(REGISTRY)
    with pytest.raises(CcdsError, match="unknown selection method"):
        get_method("nope")
    with pytest.raises(CcdsError, match="bad parameter k1"):
        get_method("bm25", k1="high")
    with pytest.raises(CcdsError, match="bad parameter"):
        get_method("random", sede=3)


def test_random_is_seeded_and_uniform(synth):
    pool, _ = synth
    a = run(get_method("random", seed=1), pool, cache=None).values
    b = run(get_method("random", seed=1), pool, cache=None).values
    c = run(get_method("random", seed=2), pool, cache=None).values
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert get_method("random").cost(pool, None) == 0


def test_scores_are_cached_by_content(synth, tmp_path):
    pool, targets = synth
    ledger = Ledger()
    m = get_method("bm25")
    first = run(m, pool, targets[0], cache=tmp_path, ledger=ledger)
    again = run(get_method("bm25"), pool, targets[0], cache=tmp_path, ledger=ledger)
    assert not first.cached and again.cached
    assert np.array_equal(first.values, again.values) and len(ledger.stages) == 2
    other = run(get_method("bm25", k1=1.2), pool, targets[0], cache=tmp_path)
    assert not other.cached  # parameters are part of the key
    changed = [Example(e.id, e.prompt + " x", e.response, e.source) for e in pool]
    assert not run(m, changed, targets[0], cache=tmp_path).cached  # so is the pool content
    # a corrupt cache file is recomputed, never trusted
    for path in tmp_path.glob("bm25-*.parquet"):
        path.write_bytes(b"garbage")
    assert not run(get_method("bm25"), pool, targets[0], cache=tmp_path).cached


def test_model_scores_are_keyed_by_the_dtype_they_ran_in(synth, tiny_model_dir):
    """bf16 and fp32 scores differ in their last digits, and `auto` is bf16 on one machine
    and fp32 on another: a model-based method's cache key names the dtype; BM25's does not
    need to."""
    from ccds.models import pick_runtime
    from ccds.score import Context

    pool, targets = synth
    fp32, bf16 = (Context(runtime=pick_runtime(dtype=d)) for d in ("fp32", "bf16"))
    for name, params in (("ppl", {"model": str(tiny_model_dir)}),
                         ("s2l", {"proxy": str(tiny_model_dir)})):
        m = get_method(name, **params)
        assert m.key(pool, targets[0], fp32) != m.key(pool, targets[0], bf16)
    bm25 = get_method("bm25")
    assert bm25.key(pool, targets[0], fp32) == bm25.key(pool, targets[0], bf16)


@pytest.mark.data
def test_bm25_agrees_with_rank_bm25_on_real_data(shared_data):
    from rank_bm25 import BM25Okapi

    from ccds.data.sources import load_alpaca, load_target

    pool = load_alpaca(shared_data)[:2000]
    target = load_target("mmlu:high_school_biology,college_medicine", shared_data)
    ours = run(get_method("bm25"), pool, target, cache=None).values
    ref = BM25Okapi([tokenize(e.prompt) for e in pool])
    per_subtask = []
    for idx in target.val_by_subtask().values():
        per_subtask.append(np.mean([ref.get_scores(tokenize(f"{target.val[i].prompt} "
                                                            f"{target.val[i].response}"))
                                    for i in idx], axis=0))
    reference = np.mean(per_subtask, axis=0)
    assert spearmanr(ours, reference).statistic >= 0.999
    assert np.allclose(ours, reference)
    # the two-pass sharded mode gives the same scores, and shares the cache entry
    sharded = get_method("bm25", shard_size=300)
    assert np.allclose(run(sharded, pool, target, cache=None).values, ours, rtol=1e-12)
    assert sharded.key(pool, target) == get_method("bm25").key(pool, target)


@pytest.mark.parametrize("method", ["bm25", "embed"])
def test_targeted_methods_find_the_target_family(synth, method):
    """On the synthetic pool, a targeted top 10% is mostly the target's task family, where
    random gets ~7%; and the analytic cost matches what was measured."""
    pool, targets = synth
    target = next(t for t in targets if t.name == "synth-arithmetic")
    m = get_method(method)
    s = run(m, pool, target, cache=None)
    top = select(s.values, fraction=0.1)
    family = np.mean([pool[i].source.endswith("arithmetic") for i in top])
    assert family > 0.6
    assert s.stage.analytic_flops == pytest.approx(m.cost(pool, target), rel=0.01)
    # embed: FlopCounterMode's count; bm25: its sparse products, counted where they run
    assert s.stage.measured_flops > 0
    assert s.stage.analytic_flops == pytest.approx(s.stage.measured_flops, rel=0.1)


def test_subtasks_mean_or_max():
    pool = [Example("a", "apple banana", "x"), Example("b", "cherry date", "x"),
            Example("c", "apple cherry", "x"), Example("d", "zebra", "x")]
    pool += [Example(f"f{i}", f"filler {i}", "x") for i in range(6)]  # rare words, idf > 0
    val = [Example("v1", "apple", "", "s1"), Example("v2", "cherry", "", "s2")]
    t = Target("t", val, val)
    mean = run(get_method("bm25", query="prompt"), pool, t, cache=None).values
    mx = run(get_method("bm25", query="prompt", reduce="max"), pool, t, cache=None).values
    assert mean[2] > mean[0] and mean[2] > mean[1]  # matches both subtasks
    assert mx[3] == 0 and mean[3] == 0
    assert mx[0] == pytest.approx(2 * mean[0])  # one subtask matched, other 0


def test_middle_third_first():
    from ccds.score.ppl import middle_third_first

    values = np.arange(30, dtype=float)
    s = middle_third_first(values, seed=0)
    top = set(np.argsort(-s)[:10].tolist())
    assert top == set(range(10, 20))
    assert not np.array_equal(np.argsort(-s)[:10], np.arange(10, 20))  # shuffled within


def test_ppl_variants_and_cost(tiny_model_dir, synth):
    pool, targets = synth
    pool = pool[:60]
    model = str(tiny_model_dir)
    got = {}
    for variant in ("low", "high", "least_confidence", "mid"):
        m = get_method("ppl", model=model, variant=variant)
        s = run(m, pool, cache=None)
        got[variant] = s.values
        assert s.stage.analytic_flops == pytest.approx(m.cost(pool, None), rel=1e-9)
        assert s.stage.measured_flops == pytest.approx(s.stage.analytic_flops, rel=0.1)
    assert np.array_equal(np.argsort(got["low"]), np.argsort(-got["high"]))
    m = get_method("ppl", model=model, variant="low", train_on_val=True, val_epochs=2)
    s = run(m, pool, targets[0], cache=None)
    assert m.needs_target
    plain = get_method("ppl", model=model, variant="low").cost(pool, None)
    assert s.stage.analytic_flops > plain  # training the scorer on V is charged
    assert s.stage.analytic_flops == pytest.approx(m.cost(pool, targets[0]), rel=0.05)
    assert not np.array_equal(s.values, got["low"])


def test_cascade_ranks_the_kept_fraction_by_the_expensive_method(synth):
    pool, targets = synth
    target = targets[0]
    cheap = run(get_method("bm25"), pool, target, cache=None).values
    m = get_method("cascade", cheap="bm25", expensive="embed", keep=0.2)
    s = run(m, pool, target, cache=None)
    kept = set(select(cheap, fraction=0.2).tolist())
    assert set(select(s.values, fraction=0.2).tolist()) == kept  # the cheap filter holds
    embed_cost = get_method("embed").cost(pool, target)
    assert m.cost(pool, target) == pytest.approx(get_method("bm25").cost(pool, target)
                                                 + 0.2 * embed_cost)
    # the expensive scorer saw only the kept fifth: its share of the measured work is small
    assert s.stage.analytic_flops < 0.3 * embed_cost
    top = select(s.values, fraction=0.05)
    assert np.mean([pool[i].source.endswith("arithmetic") for i in top]) > 0.6


def test_same_selection_across_runs_and_batch_sizes(tiny_model_dir, synth):
    """Same config and seed: byte-identical scores. How the work is cut (BM25's shard size)
    leaves BM25's selection identical, its math being exact. A neural scorer's batch size or
    chunk changes the fp32 summation order, so scores agree to ~1e-6 and only near-ties
    can swap: the selections overlap almost entirely."""
    from ccds.models import pick_runtime
    from ccds.score import Context
    from ccds.score.base import Backend

    pool, targets = synth
    pool, target = pool[:300], targets[0]
    fp32 = pick_runtime(dtype="fp32")

    def chosen(name, ctx=None, **params):
        s = run(get_method(name, **params), pool, target, ctx=ctx or Context(runtime=fp32,
                progress=False), cache=None).values
        return s, [set(select(s, fraction=f).tolist()) for f in (0.05, 0.1, 0.25, 0.5)]

    a, sel_a = chosen("ppl", model=str(tiny_model_dir), variant="low")
    b, _ = chosen("ppl", model=str(tiny_model_dir), variant="low")
    assert a.tobytes() == b.tobytes()
    assert chosen("bm25", shard_size=41)[1] == chosen("bm25")[1]
    ppl = {"model": str(tiny_model_dir), "variant": "low"}
    chunked = Context(runtime=fp32, progress=False, backend=Backend(chunk=37))
    for x, y in ((chosen("ppl", batch_tokens=256, **ppl), (a, sel_a)),
                 (chosen("ppl", chunked, **ppl), (a, sel_a)),
                 (chosen("embed", batch_size=8), chosen("embed", batch_size=64))):
        np.testing.assert_allclose(x[0], y[0], rtol=1e-5, atol=1e-6)
        for s1, s2 in zip(x[1], y[1], strict=True):
            assert len(s1 & s2) >= 0.95 * len(s1)
