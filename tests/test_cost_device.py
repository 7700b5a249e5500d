"""`ccds cost --device`: every stage priced in GPU-hours, FLOPs / (dense bf16 peak × MFU),
at an MFU that is given, measured by benchmarks/gpu.py, or a stated default (issue 22)."""

import json
import re
import typing

import pytest
from test_cli import ccds, one_error_line

from ccds.cli import cost_cmd
from ccds.flops import DEFAULT_MFU, DEVICE_PEAK_FLOPS, device_of, gpu_hours, mfu_by_stage

DATASHEET = {"h100": 989e12, "h200": 989e12, "a100": 312e12}  # dense bf16, no sparsity


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("cost")
    assert ccds("data", "synth", "--out", d, "--n-pool", "60", "--n-test", "5").returncode == 0
    return d


def cost(synth, *args):
    r = ccds("cost", "--pool", synth / "pool.jsonl", "--target",
             synth / "targets" / "synth-arithmetic", "--method", "bm25", "--method", "ppl",
             "--fractions", "0.1,1", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def rows(out: str) -> dict[str, list[str]]:
    """The table's rows by stage: the cells after the stage name."""
    found = {}
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if cells and (cells[0].startswith("train on") or cells[0].startswith("select:")):
            found[cells[0]] = cells[1:]
    return found


@pytest.mark.parametrize(("device", "mfu"), [("h100", "0.5"), ("a100", "0.25")])
def test_gpu_hours_are_flops_over_peak_times_mfu(synth, device, mfu):
    out = cost(synth, "--device", device, "--mfu", mfu)
    assert f"GPU-hours ({device}, MFU {mfu})" in out
    assert f"MFU {mfu} (given)" in " ".join(out.split())
    got = rows(out)
    assert set(got) == {"train on 10.0%", "train on 100.0%", "select: bm25", "select: ppl"}
    for stage, (flops, _paper, hours) in got.items():
        want = float(flops) / (DATASHEET[device] * float(mfu)) / 3600
        assert float(hours) == pytest.approx(want, rel=1e-2), stage


def test_without_device_the_table_is_unchanged(synth):
    out = cost(synth)
    assert "GPU-hours" not in out and "MFU" not in out
    assert all(len(cells) == 2 for cells in rows(out).values())


def test_measured_mfu_of_the_nearest_model_prices_each_stage(synth, tmp_path):
    """SmolLM2-135M is nearest the 0.12B model: its training and scoring MFU (of the
    datasheet peak, which GPU-hours divide by) price those rows; LESS, not measured there
    nor anywhere, gets the default and says so."""
    results = {"device": "NVIDIA H200", "smoke": False, "models": {
        "small": {"params_total": 1.2e8, "stages": {
            "train": {"status": "ok", "mfu": 0.3, "mfu_datasheet": 0.25},
            "score": {"status": "ok", "mfu": 0.5, "mfu_datasheet": 0.45},
            "less": {"status": "failed", "error": "RuntimeError: x"}}},
        "big": {"params_total": 8e9, "stages": {
            "train": {"status": "ok", "mfu": 0.6, "mfu_datasheet": 0.55}}}}}
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(results))
    out = cost(synth, "--device", "h200", "--gpu-results", path)
    flat = " ".join(out.split())
    assert "GPU-hours (h200, MFU measured)" in out
    assert "measured on NVIDIA H200" in flat and f"less {DEFAULT_MFU:.2f} assumed" in flat
    mfu = {"train on 10.0%": 0.25, "train on 100.0%": 0.25, "select: bm25": 0.45,
           "select: ppl": 0.45}
    for stage, (flops, _paper, hours) in rows(out).items():
        assert float(hours) == pytest.approx(gpu_hours(float(flops), "h200", mfu[stage]),
                                             rel=1e-2), stage


def test_the_default_mfu_is_stated_and_a_smoke_run_prices_nothing():
    assert mfu_by_stage(None, None, 1e9) == (dict.fromkeys(("score", "less", "train"),
                                                           DEFAULT_MFU), "0.4 (assumed)")
    smoke = {"smoke": True, "models": {"tiny": {"params_total": 1e6, "stages": {
        "train": {"status": "ok", "mfu": 0.9}}}}}
    assert mfu_by_stage(None, smoke, 1e6)[1] == "0.4 (assumed)"


def test_device_choices_are_the_peak_table():
    hint = typing.get_type_hints(cost_cmd, include_extras=True)["device"]
    literal = next(a for a in typing.get_args(typing.get_args(hint)[0]) if a is not type(None))
    assert set(typing.get_args(literal)) == set(DEVICE_PEAK_FLOPS) == set(DATASHEET)
    assert DEVICE_PEAK_FLOPS == DATASHEET


def test_cuda_device_names_find_their_peak():
    assert device_of("NVIDIA H100 80GB HBM3") == "h100"
    assert device_of("NVIDIA H200") == "h200"
    assert device_of("NVIDIA A100-SXM4-80GB") == "a100"
    assert device_of("Tesla V100-SXM2-16GB") is None
    assert gpu_hours(989e12 * 3600, "h200", 1.0) == pytest.approx(1.0)


def test_bad_device_is_one_line(synth):
    r = ccds("cost", "--pool", synth / "pool.jsonl", "--device", "h300")
    one_error_line(r, "'h300'", "h100")


@pytest.mark.parametrize("mfu", ["0", "1.5", "-0.2", "nan"])
def test_mfu_outside_0_1_is_one_line(synth, mfu):
    r = ccds("cost", "--pool", synth / "pool.jsonl", "--device", "h100", "--mfu", mfu)
    one_error_line(r, "--mfu", "(0, 1]")


def test_mfu_without_device_is_one_line(synth):
    one_error_line(ccds("cost", "--pool", synth / "pool.jsonl", "--mfu", "0.5"),
                   "--device")
