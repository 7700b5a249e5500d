"""`sweep.run_pilot`, the library side of `ccds plan --pilot`."""

import json

from test_sweep import write_config

from ccds.store import Store


def test_pilot_runs_the_two_smallest_fractions_and_fits_them(tmp_path, tiny_model_dir,
                                                             monkeypatch):
    from ccds.sweep import load_config, run_pilot

    monkeypatch.setenv("CCDS_CACHE", str(tmp_path / "cache"))
    path = write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "s",
                        fractions=[1.0, 0.5, 0.2], synth={"n_pool": 30, "n_test": 4, "n_val": 4})
    cfg = load_config(path)
    lines = []
    pilot = run_pilot(cfg, log=lines.append)

    store = Store(tmp_path / "s" / "pilot" / "runs.sqlite")
    assert sorted({r["fraction"] for r in store.runs()}) == [0.2, 0.5]
    assert len(lines) == len(list(store.runs())) == 3 * 2  # random ×2 seeds, bm25
    assert not (tmp_path / "s" / "runs.sqlite").exists()  # the sweep's own store untouched
    assert pilot.fits == tmp_path / "s" / "pilot" / "report" / "fits.json"
    assert json.loads(pilot.fits.read_text())["share"] == "pbar_p0"
    meta = store.meta()[f"c_full/{tiny_model_dir}"]
    n = meta["params"]["non_embedding"]
    assert (pilot.train_params, pilot.selection_params, pilot.pool_tokens) == \
        (n, n, meta["pool_tokens"])
    assert (cfg.fractions, cfg.out) == ([0.2, 0.5, 1.0], tmp_path / "s")  # not mutated
