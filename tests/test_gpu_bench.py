"""benchmarks/gpu.py, the prepared device check of issues 22 and 31: its --smoke run goes
through every stage on the CPU (so the script cannot rot before a GPU is at hand), from a
plain checkout with ccds not installed; a failing, overlong or non-finite stage is one
recorded line; missing wheels are one message that names them; its synthetic data reach
training unchanged."""

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu  # noqa: E402

NUMBERS = ("examples", "tokens", "wall_s", "tokens_per_s", "examples_per_s", "flops",
           "tflops_per_s", "mfu", "peak_mem_gb", "batch_tokens")

# Runs a script as a machine without a ccds install would: ccds is not importable until
# something puts the checkout's src/ on sys.path, and then only from there (whether this
# venv installed it editable, as a finder, or into site-packages); the top-level modules
# named in argv[2] (comma-separated) are not importable at all.
LAUNCH = """
import importlib.machinery, importlib.util, os, runpy, sys
src, hidden, script = sys.argv[1], set(filter(None, sys.argv[2].split(","))), sys.argv[3]
sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != os.path.realpath(src)]

class Hide:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in hidden or (name == "ccds" and src not in sys.path):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        if name == "ccds":
            return importlib.machinery.PathFinder.find_spec(name, [src])
        return None

sys.meta_path.insert(0, Hide())
try:
    importlib.util.find_spec("ccds")
    sys.exit("launcher: ccds is still importable")
except ModuleNotFoundError:
    pass
sys.argv = sys.argv[3:]
sys.path.insert(0, os.path.dirname(script))  # as `python script` does
runpy.run_path(script, run_name="__main__")
"""


def run_uninstalled(args: list[str], cwd: Path, hidden: str = "", timeout: float = 300):
    return subprocess.run([sys.executable, "-c", LAUNCH, str(ROOT / "src"), hidden,
                           str(ROOT / "benchmarks" / "gpu.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def test_smoke_run_writes_every_stage_with_numbers(tmp_path):
    """Run as the README says, from another folder and with ccds not installed: the script
    finds the checkout's src/ itself."""
    r = run_uninstalled(["--smoke", "--out", str(tmp_path)], cwd=tmp_path)
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
        assert stage["finite"] is True, name
        for key in NUMBERS:
            assert math.isfinite(stage[key]) and stage[key] > 0, (name, key, stage[key])
    less = model["stages"]["less"]
    assert less["proj_dim"] == 8192 and 0 < less["projection_share"] < 1
    assert len(res["targets"]) == len(gpu.TARGETS)
    assert all(t["value"] is not None and t["pass"] is not None for t in res["targets"])
    check = res["checks"]["projection_cpu_vs_device"]
    assert check["status"] == "ok" and check["same"] and check["finite"] is True
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


@pytest.mark.parametrize("hidden", ["pydantic", "pydantic_core,typing_inspection"])
def test_missing_wheels_are_one_message_that_names_them(tmp_path, hidden):
    """On a machine with torch, transformers, peft and accelerate only (the device's image):
    exit 2 before any work, with the pinned wheels, how to fetch them and how to install
    them in one message, and no traceback."""
    r = run_uninstalled(["--smoke", "--out", str(tmp_path / "out")], cwd=tmp_path,
                        hidden=hidden, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not r.stdout
    assert r.stderr.startswith("gpu.py: ccds needs pydantic, pydantic-core")
    assert r.stderr.count("gpu.py:") == 1
    for pin in gpu.pinned():
        assert re.fullmatch(r"[a-z-]+==\d[\w.]*", pin), pin
        assert r.stderr.count(pin) == 2, pin  # named, and in the pip download command
    assert "pip download --no-deps --only-binary=:all:" in r.stderr
    assert gpu.INSTALL in r.stderr and 'carry [".whl"]' in r.stderr
    assert not (tmp_path / "out").exists()


def test_wheels_are_pinned_as_tested_and_match_the_device_script(monkeypatch):
    constraints = (ROOT / "constraints.txt").read_text().lower().replace("_", "-")
    for pin in gpu.pinned():
        assert f"\n{pin}\n" in constraints, pin
    script = (ROOT / "benchmarks" / "gpu_run.sh").read_text()
    listed = re.search(r"^WHEELS=\((.*)\)$", script, re.M).group(1).split()
    assert tuple(listed) == gpu.WHEELS
    assert gpu.missing_wheels() is None  # this venv has them
    # pydantic's own pins are checked, not only its imports
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "4.0.0" if
                        name.replace("_", "-").lower() == "typing-extensions" else real(name))
    why = gpu.missing_wheels()
    assert why and "typing-extensions" in why and "found 4.0.0" in why


def test_configs_keep_rope_in_rope_parameters():
    """transformers 5 deprecates rope_scaling and top-level rope_theta (warned on 5.17 and
    later); rope_parameters holds both, and transformers fills it in place, so the configs
    are copied."""
    before = json.dumps(gpu.CONFIGS, sort_keys=True)
    for name, factor in (("llama-3.2-1b", 32.0), ("llama-3.1-8b", 8.0)):
        assert not {"rope_scaling", "rope_theta"} & set(gpu.CONFIGS[name])
        rope = gpu.llama_config(name).rope_parameters
        assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0
        assert rope["factor"] == factor and rope["original_max_position_embeddings"] == 8192
    assert json.dumps(gpu.CONFIGS, sort_keys=True) == before


def test_check_finite_counts_and_names_the_first_bad_value():
    assert gpu.check_finite("x", {"a": np.ones(3), "b": [1.0, 2.0]}) == 5
    assert gpu.check_finite("x", torch.zeros(2, 3)) == 6
    with pytest.raises(gpu.NotFinite, match=r"^f: 2 of 6 not finite \(first at \(0, 2\): inf\)"):
        gpu.check_finite("f", torch.tensor([[0.0, 1.0, float("inf")], [float("nan"), 0, 0]]))
    with pytest.raises(gpu.NotFinite, match="s nll: 1 of 3"):
        gpu.check_finite("s", {"nll": np.array([1.0, np.nan, 2.0])})


@pytest.fixture(scope="module")
def bench():
    args = gpu.parse(["--smoke"])
    data = gpu.synthetic(24, 1024)
    return gpu.Bench("tiny", args, gpu.Runtime(torch.device("cpu"), torch.bfloat16), data,
                     gpu.id_tokenizer(1024))


def poison_scores(real):
    def score_sequences(*a, **k):
        out = real(*a, **k)
        out["nll_sum"][0] = np.nan
        return out
    return score_sequences


def poison_losses(real):
    def train(*a, **k):
        res = real(*a, **k)
        res.losses[-1] = float("nan")
        return res
    return train


def poison_features(real):
    def features(self, *a, **k):
        out = real(self, *a, **k)
        out[0, 5] = np.inf
        return out
    return features


@pytest.mark.parametrize("stage, owner, attr, poison, what", [
    ("score", gpu, "score_sequences", poison_scores, "scoring nll_sum"),
    ("train", gpu, "train", poison_losses, "training losses"),
    ("less", gpu.LESS, "features", poison_features, "LESS features"),
])
def test_a_non_finite_stage_fails_with_its_reason(run, bench, monkeypatch, stage, owner, attr,
                                                  poison, what):
    monkeypatch.setattr(owner, attr, poison(getattr(owner, attr)))
    where = stages(run)
    run.guarded(where, stage, lambda: gpu.run_stage(bench, stage, 0.2, 1e12, None), cap=120)
    assert where[stage]["status"] == "failed" and where[stage]["finite"] is False
    assert where[stage]["error"].startswith(f"NotFinite: {what}: 1 of "), where[stage]
    assert f"- m {stage}: failed: NotFinite: {what}" in run.md.read_text()
