"""The committed study (issue 7): its report and RESULTS.md are what the committed run store
gives, so no figure in them can have been edited by hand."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np

from ccds.analyse.fit import fit_methods
from ccds.analyse.frontier import group
from ccds.analyse.runs import analyze, load_points
from ccds.store import Store
from ccds.sweep import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_study_config_is_the_full_design():
    cfg = load_config(ROOT / "experiments" / "study.yaml")
    assert {m.name for m in cfg.methods} == {"random", "bm25", "embed", "ppl", "less", "s2l",
                                             "cascade", "dsir"}
    assert cfg.fractions == [0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
    dsir = next(m for m in cfg.methods if m.name == "dsir")  # issue 23: at least these
    assert {0.025, 0.05, 0.1} <= set(cfg.fractions_for(dsir))
    assert cfg.targets == ["mmlu", "bbh", "gsm8k"]
    assert len(next(m for m in cfg.methods if m.name == "random").seeds) >= 2


def assert_close(a, b, where="fits.json", rtol=1e-4, atol=1e-6):
    """Equal structure, equal flags and strings, numbers within a tolerance: another CPU's BLAS
    moves a converged fit in its 6th digit (seen: −0.043907 vs −0.0439069), while any real
    change (an edited run, a changed fit) moves it by far more than 1e-4."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}", rtol, atol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{where}[{i}]", rtol, atol)
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=rtol, abs_tol=atol) or (math.isnan(a) and
                                                                   math.isnan(b)), (where, a, b)
    else:
        assert a == b, (where, a, b)


def test_committed_report_and_results_regenerate_from_the_run_store(tmp_path, monkeypatch):
    analyze(ROOT / "study", tmp_path, bootstrap=200)
    committed = ROOT / "study" / "report"
    assert_close(json.loads((tmp_path / "fits.json").read_text()),
                 json.loads((committed / "fits.json").read_text()))
    assert (tmp_path / "runs.csv").read_text() == (committed / "runs.csv").read_text()
    assert len((committed / "runs.csv").read_text().splitlines()) == 144 + 9 + 1  # + DSIR
    spec = importlib.util.spec_from_file_location("results", ROOT / "experiments" / "results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    monkeypatch.chdir(ROOT)  # the command line RESULTS.md names is relative to the repository
    results.main(["study/report", "--out", str(tmp_path / "RESULTS.md")])
    assert (tmp_path / "RESULTS.md").read_text() == \
        (ROOT / "experiments" / "RESULTS.md").read_text()


def test_study_intervals_do_not_move_with_the_last_bits():
    """Every P moved by 1e-9 of itself (what another CPU's summation order does to a loss)
    moves no fitted parameter or bootstrap bound by more than 1e-5 of itself, and no interval
    changes between identified and not: the old unbounded fit moved MMLU embed's λ upper bound
    from 100,176 to 82,079."""
    store = Store(ROOT / "study" / "runs.sqlite")
    runs, meta = list(store.runs()), store.meta()
    rng = np.random.default_rng(0)
    for (target, model), pts in load_points(runs, "ccds").items():
        c_full = meta[f"c_full/{model}"]["analytic"]
        zero = meta[f"zero_shot/{target}/{model}"]["perf"]
        xy = group(pts)
        moved = {m: (c, p * (1 + 1e-9 * rng.standard_normal(len(p)))) for m, (c, p) in xy.items()}
        a = fit_methods(xy, c_full, share="pbar", p0=zero, bootstrap=200)
        b = fit_methods(moved, c_full, share="pbar", p0=zero, bootstrap=200)
        for m in a:
            assert a[m].bootstrap == b[m].bootstrap, (target, m)
            assert_close(a[m].lam, b[m].lam, f"{target}/{m}", rtol=1e-5)
            assert_close(a[m].intervals, b[m].intervals, f"{target}/{m}", rtol=1e-5)


def test_committed_study_resumes_without_recomputing(shared_data, tmp_path):
    """Every run of experiments/study.yaml is found in the committed store under the key the
    code computes today (and every zero-shot under its key): `ccds sweep run` on it would
    recompute nothing, so refactoring the sweep has not orphaned a stored study."""
    from ccds.models import pick_runtime, resolve
    from ccds.score.base import examples_hash
    from ccds.sweep import _data, _Model, _run_key, _zero_shot_key

    cfg = load_config(ROOT / "experiments" / "study.yaml").model_copy(update={"out": tmp_path})
    pool, targets = _data(cfg)  # the pool is built again from the shared data, as it was
    store = Store(ROOT / "study" / "runs.sqlite")
    name = cfg.models[0]
    rt = pick_runtime(cfg.train.device, cfg.train.dtype)  # bf16, pinned by the study
    m = _Model(name=name, model=None, tok=None, rt=rt, fingerprint=resolve(name).fingerprint,
               train=cfg.train.model_copy(update={"model": name, "dtype": rt.dtype_name}))
    keys = {_run_key(m, cfg=cfg, pool_hash=examples_hash(pool), target=t, spec=s, seed=seed,
                     fraction=f)
            for t in targets for s in cfg.methods for seed in s.seeds
            for f in cfg.fractions_for(s)}
    assert len(keys) == 144 + 9 and all(store.has(k) for k in keys)  # + DSIR
    meta = store.meta()
    for t in targets:
        assert meta[f"zero_shot/{t.name}/{name}"]["key"] == _zero_shot_key(m, target=t, cfg=cfg)
