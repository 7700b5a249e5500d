import json

import pytest

from ccds.demo import DemoConfig, run_demo
from ccds.train import TrainConfig


@pytest.mark.slow
def test_demo_runs_the_whole_loop_on_real_smollm2(tmp_path):
    cfg = DemoConfig(out=tmp_path, n_pool=200, n_test=6, n_test_others=4, fraction=0.1,
                     methods=["random", "bm25"],
                     train=TrainConfig(epochs=1, lr=3e-4, measure_flops=False))
    report = run_demo(cfg)
    for f in ("report.json", "report.md", "demo.png", "runs/bm25/subset.jsonl",
              "runs/bm25/adapter/adapter_model.safetensors", "runs/random/ledger.json",
              "data/pool.jsonl", "data/targets/synth-arithmetic/target.json"):
        assert (tmp_path / f).exists(), f
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [r["method"] for r in saved["runs"]] == ["random", "bm25"]
    for run in report["runs"]:  # every method on the same budget, never over it
        totals = run["ledger"]["totals"]
        assert totals["training"]["analytic_flops"] > 0 and totals["evaluation"]["wall_s"] > 0
        assert (totals["selection"]["analytic_flops"] + totals["training"]["analytic_flops"]
                <= report["budget"])
        assert run["selected"] > 20  # twice the cost of 10% buys more than 10% of the pool
    assert report["run"]["charged"] <= report["budget"]  # and ccds run spends the same budget
    assert (tmp_path / "run" / "report.md").exists()
    bm25, rand = report["runs"][1], report["runs"][0]
    assert bm25["on_target"] > rand["on_target"]  # BM25 finds the target's task family
    md = (tmp_path / "report.md").read_text()
    assert "| bm25 |" in md and "| ccds run: " in md and "ccds run** on the same budget" in md
