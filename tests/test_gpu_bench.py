"""benchmarks/gpu.py, the prepared device check of issue 22: its --smoke run goes through
every stage on the CPU (so the script cannot rot before a GPU is at hand), a failing or
overlong stage is one recorded line, and its synthetic data reach training unchanged."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu  # noqa: E402

NUMBERS = ("examples", "tokens", "wall_s", "tokens_per_s", "examples_per_s", "flops",
           "tflops_per_s", "mfu", "peak_mem_gb", "batch_tokens")


def test_smoke_run_writes_every_stage_with_numbers(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "gpu.json").exists()  # a smoke run never passes for the GPU's
    res = json.loads((tmp_path / "gpu-smoke.json").read_text())
    assert res["smoke"] and res["device"] and res["date"] and "--smoke" in res["command"]
    assert res["peak_flops"]["measured"] > 0
    model = res["models"]["tiny"]
    assert model["build"]["status"] == "ok" and model["params_total"] > 0
    assert set(model["stages"]) == set(gpu.STAGES)
    for name, stage in model["stages"].items():
        assert stage["status"] == "ok", (name, stage)
        for key in NUMBERS:
            assert math.isfinite(stage[key]) and stage[key] > 0, (name, key, stage[key])
    less = model["stages"]["less"]
    assert less["proj_dim"] == 8192 and 0 < less["projection_share"] < 1
    assert len(res["targets"]) == len(gpu.TARGETS)
    assert all(t["value"] is not None and t["pass"] is not None for t in res["targets"])
    check = res["checks"]["projection_cpu_vs_device"]
    assert check["status"] == "ok" and check["same"]
    md = (tmp_path / "gpu-smoke.md").read_text()
    for stage in gpu.STAGES:
        assert f"| tiny | {stage} | ok |" in md
    assert "## Targets" in md and "Smoke run" in md and "Not measured" not in md


@pytest.fixture()
def run(tmp_path):
    args = gpu.parse(["--smoke", "--out", str(tmp_path)])
    r = gpu.Run(args, ["--smoke"])
    # the script's budget counts from its import, which here was at collection, maybe
    # minutes before this test: count it from now
    r.deadline = time.perf_counter() + args.budget
    return r


def stages(run) -> dict:
    return run.res["models"].setdefault("m", {"stages": {}})["stages"]


def test_a_failing_stage_is_one_line_and_the_others_still_run(run):
    where = stages(run)
    run.guarded(where, "broken", lambda: {"status": "ok", "x": 1 / 0}, cap=10)
    run.guarded(where, "fine", lambda: {"status": "ok", "error": None}, cap=10)
    assert where["broken"]["status"] == "failed"
    assert where["broken"]["error"] == "ZeroDivisionError: division by zero"
    assert where["fine"]["status"] == "ok"
    written = json.loads(run.json.read_text())  # after every stage, so a cut run keeps it
    assert written["command"] == "python benchmarks/gpu.py --smoke"
    assert written["models"]["m"]["stages"]["broken"]["status"] == "failed"
    assert "- m broken: failed: ZeroDivisionError: division by zero" in run.md.read_text()


def test_time_budget_stops_a_stage_and_skips_the_rest(run):
    where = stages(run)
    t = time.perf_counter()
    run.guarded(where, "slow", lambda: time.sleep(30) or {"status": "ok"}, cap=0.3)
    assert time.perf_counter() - t < 5
    assert where["slow"]["status"] == "failed" and "time budget" in where["slow"]["error"]
    run.deadline = time.perf_counter()
    run.guarded(where, "late", lambda: {"status": "ok"}, cap=10)
    assert where["late"] == {"status": "skipped", "error": "time budget spent"}
    assert "- m late: skipped: time budget spent" in run.md.read_text()


def test_synthetic_sequences_reach_training_as_generated():
    """Training takes text examples: the id tokenizer must give back the very ids, prompt
    split and end-of-turn suffix that scoring and LESS get directly."""
    from ccds.tokenize import encode

    enc = gpu.synthetic(50, 1024, seed=3)
    back = encode(gpu.as_examples(enc), gpu.id_tokenizer(1024), gpu.MAX_LEN)
    assert [x.tolist() for x in back.ids] == [x.tolist() for x in enc.ids]
    assert back.n_prompt.tolist() == enc.n_prompt.tolist()
    assert back.n_suffix.tolist() == enc.n_suffix.tolist() == [1] * 50
    assert enc.lengths.max() <= gpu.MAX_LEN and enc.lengths.min() >= 32
