"""Sweeps: config validation, a run store that survives SIGKILL, and the analysis report."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml

from ccds.store import Store


def write_config(path, model, out, **over):
    cfg = {"out": str(out), "pool": "synth", "synth": {"n_pool": 100, "n_test": 6, "n_val": 4},
           "targets": ["synth-arithmetic"],
           "methods": [{"name": "random", "seeds": [0, 1]}, "bm25"],
           "fractions": [0.2, 0.5, 1.0], "models": [str(model)],
           "train": {"epochs": 1, "lr": 1e-2, "batch_tokens": 512, "lora_r": 4},
           "eval": {"generate": False}}
    cfg.update(over)
    path.write_text(yaml.safe_dump(cfg))
    return path


def rows(out):
    return {(r["method"], r["seed"], r["fraction"]): (r["perf"], r["ids"])
            for r in Store(out / "runs.sqlite").runs()}


def sweep(cfg, env=None, timeout=None):
    return subprocess.Popen([sys.executable, "-m", "ccds", "sweep", "run", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_bad_configs_are_one_line_errors(tmp_path):
    from test_cli import ccds, one_error_line

    good = write_config(tmp_path / "c.yaml", "x", tmp_path / "o")
    for field, value, needle in [("fractions", [0.1, 1.5], "fractions"),
                                 ("methods", ["nope"], "unknown method"),
                                 ("colour", "red", "colour")]:
        cfg = yaml.safe_load(good.read_text())
        cfg[field] = value
        bad = tmp_path / f"{field}.yaml"
        bad.write_text(yaml.safe_dump(cfg))
        one_error_line(ccds("sweep", "run", bad), needle)


@pytest.mark.slow
def test_killed_sweep_finishes_with_the_same_rows(tmp_path, tiny_model_dir, figure):
    env = {**os.environ, "CCDS_CACHE": str(tmp_path / "cache")}
    ref_cfg = write_config(tmp_path / "ref.yaml", tiny_model_dir, tmp_path / "ref")
    t0 = time.monotonic()
    p = sweep(ref_cfg, env)
    assert p.wait(timeout=900) == 0, p.stderr.read()
    t_ref = time.monotonic() - t0
    reference = rows(tmp_path / "ref")
    assert len(reference) == 3 * 3  # random ×2 seeds, bm25 × 3 fractions
    # at 100% random (seed 0) and bm25 (seed 0) train on the same set: trained once
    assert len(list((tmp_path / "ref" / "trained").glob("*/*/result.json"))) == 8
    assert reference["random", 0, 1.0] == reference["bm25", 0, 1.0]
    by_key = {(r["method"], r["seed"], r["fraction"]): r
              for r in Store(tmp_path / "ref" / "runs.sqlite").runs()}
    assert (by_key["random", 0, 1.0]["training_flops"]
            == by_key["bm25", 0, 1.0]["training_flops"] > 0)  # both charged

    # kill it mid-sweep, again and again, until it finishes: a moment after a restart has
    # stored a new row (into the next run's work), or after a whole sweep's time if none
    # comes. By progress, not by the clock: a restart's start-up (imports, the model) is a
    # large share of this tiny sweep, and kills at a fixed time could all land before it
    cfg = write_config(tmp_path / "k.yaml", tiny_model_dir, tmp_path / "k")
    kills, stored = 0, [0]
    rng = random.Random(0)
    for _ in range(8):
        p = sweep(cfg, env)
        deadline = time.monotonic() + max(5.0, t_ref)
        while p.poll() is None and time.monotonic() < deadline:
            store = tmp_path / "k" / "runs.sqlite"  # the sweep's to create, not the test's
            if store.exists() and len(rows(tmp_path / "k")) > stored[-1]:
                time.sleep(rng.uniform(0, 0.5))
                break
            time.sleep(0.1)
        if p.poll() is not None:
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        got = rows(tmp_path / "k")
        assert all(got[k] == reference[k] for k in got)  # every stored row is a whole one
        stored.append(len(got))
    p = sweep(cfg, env)
    assert p.wait(timeout=900) == 0, p.stderr.read()
    # killed mid-sweep (rows stored, some left) and resumed; trained adapters kept across
    # kills make later restarts quicker, so the last kill may land after the last row
    figure("sweep: SIGKILLs survived (rows stored at each)", f"{kills} {stored[1:]}")
    assert kills >= 2 and any(0 < n < 9 for n in stored), (kills, stored)
    assert rows(tmp_path / "k") == reference
    before = (tmp_path / "k" / "runs.sqlite").stat().st_size
    p = sweep(cfg, env)  # nothing left to do
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0 and "P=" not in out
    assert len(rows(tmp_path / "k")) == 9
    assert (tmp_path / "k" / "runs.sqlite").stat().st_size == before

    from test_cli import ccds

    r = ccds("analyze", tmp_path / "ref", "--bootstrap", "20")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "ref" / "report" / "fits.json").read_text())
    g = report["groups"][0]
    assert set(g["fits"]) == {"random", "bm25"}
    # P0 is the untrained model's measured performance, recorded once per (target, model)
    zero = Store(tmp_path / "ref" / "runs.sqlite").meta()["zero_shot/synth-arithmetic/" +
                                                         str(tiny_model_dir)]
    assert g["zero_shot"] == zero["perf"] < 0 and zero["eval"]["n"] == 6
    assert all(f["p0"] == zero["perf"] for f in g["fits"].values())
    killed = Store(tmp_path / "k" / "runs.sqlite").meta()["zero_shot/synth-arithmetic/" +
                                                          str(tiny_model_dir)]
    # the same measurement in another process: equal FLOPs, P to bf16 rounding (oneDNN's bf16
    # kernels round differently from process to process on AMX CPUs: seen 3e-6 and 1.7e-5 of
    # P; bf16 keeps 8 bits, so a mean NLL agrees to ~1e-3 at worst, and a different model or
    # target would move it by far more)
    assert killed["flops"] == zero["flops"]
    assert killed["perf"] == pytest.approx(zero["perf"], rel=1e-3)
    for name in ("report.html", "report.md", "runs.csv"):
        assert (tmp_path / "ref" / "report" / name).stat().st_size > 200
    assert any(f.endswith("-frontier.png") for f in os.listdir(tmp_path / "ref" / "report"))
    with open(tmp_path / "ref" / "report" / "runs.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert all(float(r["training_s"]) > 0 and float(r["evaluation_s"]) > 0 for r in table)
    # bm25 at 100% trains the set random seed 0 trained: the saved adapter, flagged as such
    assert [(r["method"], r["fraction"]) for r in table if r["training_reused"] == "1"] == \
        [("bm25", "1.0")]
    assert g["overlap"]["0.2"]["methods"] == ["bm25", "random"]
    r = ccds("plan", "--budget", str(g["c_full"] * 0.5), "--train-model", "1e6",
             "--selection-model", "1e6", "--pool-tokens", "1e4", "--fits",
             tmp_path / "ref" / "report" / "fits.json")
    assert r.returncode == 0 and "Use " in r.stdout, r.stderr
    # pilot: the two smallest fractions, fitted with one rate per method, then a plan
    r = ccds("plan", "--pilot", ref_cfg, "--budget", str(g["c_full"] * 0.3))
    assert r.returncode == 0 and "Use " in r.stdout, r.stderr
    assert len(list(Store(tmp_path / "ref" / "pilot" / "runs.sqlite").runs())) == 3 * 2


@pytest.mark.data
def test_sweep_builds_its_pool_from_shared_data(tmp_path, shared_data):
    from ccds.sweep import SweepConfig, _data

    cfg = SweepConfig(out=tmp_path, pool="build", build={"gsm8k": 30, "alpaca": 20},
                      targets=["gsm8k", "mmlu:anatomy,virology"],
                      n_test={"gsm8k": 5, "mmlu:anatomy,virology": 3}, methods=["random"],
                      fractions=[0.5])
    pool, targets = _data(cfg)
    assert [len(t.test) for t in targets] == [5, 6]  # MMLU's cap is per subject
    assert sorted({e.source.split("/")[0] for e in pool}) == ["alpaca", "gsm8k"]
    assert len(pool) == 50
    val = {e.prompt for t in targets for e in t.val}
    assert not any(e.prompt in val for e in pool)  # V's copies are not in the pool
    again, _ = _data(cfg)  # built once, then read back
    assert [e.id for e in again] == [e.id for e in pool]
    assert len(list(tmp_path.glob("pool-*.jsonl"))) == 1


def test_resolved_dtype_is_part_of_every_key(tmp_path, tiny_model_dir, monkeypatch):
    """`auto` means bf16 on one machine and fp32 on another: a sweep resumed elsewhere must
    not count the other dtype's rows as done, nor reuse its adapters or model scores."""
    from ccds.sweep import load_config, run_sweep

    monkeypatch.setenv("CCDS_CACHE", str(tmp_path / "cache"))
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "s",
                                   methods=["random"], fractions=[0.2],
                                   synth={"n_pool": 30, "n_test": 4, "n_val": 4}))
    for dtype, n in (("fp32", 1), ("bf16", 2), ("fp32", 2)):
        monkeypatch.setenv("CCDS_DTYPE", dtype)
        run_sweep(cfg, log=lambda _: None)
        got = list(Store(tmp_path / "s" / "runs.sqlite").runs())
        assert sorted(r["dtype"] for r in got) == sorted(["fp32", "bf16"][:n])
    assert len(list((tmp_path / "s" / "trained").glob("*/*/result.json"))) == 2
    meta = Store(tmp_path / "s" / "runs.sqlite").meta()
    assert len([k for k in meta if k.startswith("zero_shot/")]) == 1  # re-measured per dtype


def test_a_method_added_at_its_own_fractions_resumes_the_rest(tmp_path, tiny_model_dir,
                                                               monkeypatch):
    """A method with its own `fractions` runs only at those; adding it to a stored sweep
    computes only its rows (the others' keys do not move), and bad fractions are refused."""
    from ccds.sweep import MethodSpec, load_config, run_sweep

    monkeypatch.setenv("CCDS_CACHE", str(tmp_path / "cache"))
    base = dict(methods=["random"], fractions=[0.2, 1.0],
                synth={"n_pool": 30, "n_test": 4, "n_val": 4})
    run_sweep(load_config(write_config(tmp_path / "a.yaml", tiny_model_dir, tmp_path / "s",
                                       **base)), log=lambda _: None)
    before = rows(tmp_path / "s")
    more = {**base, "methods": ["random", {"name": "bm25", "fractions": [0.2]}]}
    cfg = load_config(write_config(tmp_path / "b.yaml", tiny_model_dir, tmp_path / "s", **more))
    assert cfg.fractions_for(cfg.methods[1]) == [0.2]
    assert cfg.fractions_for(cfg.methods[0]) == [0.2, 1.0]
    logged = []
    run_sweep(cfg, log=logged.append)
    after = rows(tmp_path / "s")
    assert sorted(set(after) - set(before)) == [("bm25", 0, 0.2)]
    assert all(after[k] == v for k, v in before.items())
    assert len(logged) == 1 and logged[0].startswith("[3/3] ") and " bm25 seed 0 20.0%" in \
        logged[0]
    with pytest.raises(ValueError, match="fractions"):
        MethodSpec(name="bm25", fractions=[0.0])
