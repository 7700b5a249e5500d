"""ccds.price, the one place compute is priced: budgets between FLOPs and (GPU-)hours, and
`ccds cost`'s rows; `ccds plan` and `ccds cost` print what it computes (issue 29)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import ccds, one_error_line
from test_cost_device import rows

from ccds.data.formats import load_examples
from ccds.data.sources import load_target
from ccds.errors import CcdsError
from ccds.price import (
    Rate,
    budget_flops,
    check_budget,
    cost_rows,
    describe_budget,
    gpu_rate,
    hours_of,
)

PLAN = ("plan", "--train-model", "7B", "--selection-model", "7B", "--pool-tokens", "1e8")
MEASURED = Rate.measured({"score": 3e12, "less": 1e12, "train": 2e12},
                         "measured on this machine by a test")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("price")
    assert ccds("data", "synth", "--out", d, "--n-pool", "60", "--n-test", "5").returncode == 0
    return d


@settings(max_examples=100, deadline=None)
@given(st.floats(1e-6, 1e6), st.sampled_from(["h100", "h200", "a100"]), st.floats(0.01, 1.0),
       st.sampled_from(["gpu-hours", "hours", "measured hours"]))
def test_budget_flops_and_hours_of_are_inverse(hours, device, mfu, unit):
    """A measured rate prices wall-clock hours only; a GPU's, hours and GPU-hours alike."""
    rate = MEASURED if unit == "measured hours" else Rate.gpu(device, mfu, n_params=1e9)
    unit = unit.removeprefix("measured ")
    flops = budget_flops(hours, unit, rate)
    assert flops == pytest.approx(hours * 3600 * rate.per_stage["train"], rel=1e-12)
    assert hours_of(flops, rate) == pytest.approx(hours, rel=1e-12)
    assert budget_flops(hours_of(flops, rate), unit, rate) == pytest.approx(flops, rel=1e-12)
    assert budget_flops(flops, "flops", rate) == flops == budget_flops(flops, "flops", None)


def test_a_gpu_rate_is_its_peak_times_mfu_and_says_so():
    rate = Rate.gpu("a100", 0.25, n_params=1e9)
    assert rate.per_stage == dict.fromkeys(("score", "less", "train"), 312e12 * 0.25)
    assert rate.device == "a100" and rate.hours_unit == "GPU-hours"
    assert describe_budget(2, "gpu-hours", rate) == \
        f"2 GPU-hours = {2 * 3600 * 312e12 * 0.25:.3g} FLOPs on a100 at MFU 0.25 (given)"
    assert describe_budget(1e18, "flops", rate).startswith(
        f"1e+18 FLOPs = {1e18 / (312e12 * 0.25) / 3600:.3g} GPU-hours on a100")
    assert describe_budget(1e18, "flops", None) == "1e+18 FLOPs"
    # a measured rate counts wall-clock hours, each pass at its own throughput
    assert MEASURED.hours_unit == "hours"
    assert hours_of(3600 * 3e12, MEASURED, "score") == pytest.approx(1.0)
    assert hours_of(3600 * 1e12, MEASURED, "less") == pytest.approx(1.0)
    check_budget(1, "hours", None, measured=True)  # fine where a throughput will be measured


@pytest.mark.parametrize(("call", "needle"), [
    (lambda: budget_flops(0, "flops", None), "must be positive and finite"),
    (lambda: budget_flops(-1, "hours", MEASURED), "must be positive and finite"),
    (lambda: budget_flops(math.nan, "flops", None), "must be positive and finite"),
    (lambda: budget_flops(math.inf, "flops", None), "must be positive and finite"),
    (lambda: budget_flops(1, "gpu-hours", None), "--unit gpu-hours needs --device"),
    (lambda: budget_flops(1, "gpu-hours", MEASURED), "--unit gpu-hours needs --device"),
    (lambda: budget_flops(1, "hours", None), "needs --device or a measured throughput"),
    (lambda: budget_flops(1, "days", None), "unknown budget unit 'days'"),
    (lambda: check_budget(1, "hours", None), "needs --device or a measured throughput"),
    (lambda: check_budget(1, "gpu-hours", "h100", 1.5), "--mfu 1.5 must be in (0, 1]"),
    (lambda: gpu_rate(None, 0.5, n_params=1e9), "--mfu prices GPU-hours, which need --device"),
    (lambda: Rate.gpu("h300", n_params=1e9), "unknown device 'h300'"),
    (lambda: Rate.measured({}, "x"), "at least one pass"),
    (lambda: Rate.measured({"train": 0.0}, "x"), "must be positive and finite"),
    (lambda: Rate.measured({"train": math.nan}, "x"), "must be positive and finite"),
    (lambda: Rate.measured({"eval": 1e12}, "x"), "unknown GPU pass 'eval'"),
    (lambda: hours_of(1e18, Rate.measured({"train": 1e12}, "x"), "less"), "no FLOP/s for less"),
])
def test_bad_input_is_one_line(call, needle):
    with pytest.raises(CcdsError) as e:
        call()
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(("args", "needle"), [
    (["--budget", "0"], "budget 0 FLOPs must be positive"),
    (["--budget", "-5", "--unit", "gpu-hours", "--device", "h100"], "must be positive"),
    (["--budget", "nan"], "must be positive and finite"),
    (["--budget", "inf"], "must be positive and finite"),
    (["--budget", "64", "--unit", "hours"], "--unit hours needs --device"),
    (["--budget", "64", "--unit", "hours", "--mfu", "0.5"], "--mfu prices GPU-hours"),
    (["--budget", "64", "--unit", "days"], "'days'"),
])
def test_bad_plan_budgets_are_one_line(args, needle):
    one_error_line(ccds(*PLAN, *args), needle)


def test_plan_checks_its_budget_before_a_pilot_runs(tmp_path):
    one_error_line(ccds("plan", "--budget", "64", "--unit", "gpu-hours", "--pilot",
                        tmp_path / "absent.yaml"), "--unit gpu-hours needs --device")


@pytest.mark.parametrize(("args", "needle"), [
    (["--fractions", "0.1,x"], "not a comma-separated list of numbers"),
    (["--fractions", "0,1"], "must be numbers in (0, 1]"),
    (["--fractions", ","], "must be numbers in (0, 1]"),
    (["--epochs", "0"], "--epochs 0.0 must be positive"),
    (["--epochs", "inf"], "must be positive"),
    (["--mfu", "0.5", "--gpu-results", "x.json"], "--mfu and --gpu-results price GPU-hours"),
])
def test_bad_cost_options_are_one_line(synth, args, needle):
    one_error_line(ccds("cost", "--pool", synth / "pool.jsonl", *args), needle)


def _plan_table(out: str) -> list[list[str]]:
    lines = out.splitlines()
    return [ln.split() for ln in lines[2:lines.index("")] if "ruled out" not in ln]


def test_plan_prices_its_budget_and_gpu_hours_with_the_library():
    """A budget in hours on a GPU is the library's FLOPs: the plan is the one made from those
    FLOPs, in hours and in GPU-hours alike, and its GPU-h column is `hours_of` its total."""
    rate = Rate.gpu("h100", 0.5, n_params=7e9)
    gpu = ["--device", "h100", "--mfu", "0.5"]
    hours = ccds(*PLAN, "--budget", "64", "--unit", "hours", *gpu)
    assert hours.returncode == 0, hours.stderr
    assert hours.stdout.startswith(f"budget {describe_budget(64, 'hours', rate)}; ")
    flops = ccds(*PLAN, "--budget", repr(budget_flops(64, "hours", rate)), *gpu)
    gpu_hours = ccds(*PLAN, "--budget", "64", "--unit", "gpu-hours", *gpu)
    assert hours.stdout.splitlines()[1:] == flops.stdout.splitlines()[1:] \
        == gpu_hours.stdout.splitlines()[1:]
    table = _plan_table(hours.stdout)
    assert table and all(len(r) >= 7 for r in table)
    for r in table:  # method fraction selection training total GPU-h predicted
        assert float(r[5]) == pytest.approx(hours_of(float(r[4]), rate), rel=1e-2), r


def test_cost_prints_the_librarys_rows(synth):
    pool, tgt = synth / "pool.jsonl", synth / "targets" / "synth-arithmetic"
    methods = ["bm25", "ppl", "less"]
    out = ccds("cost", "--pool", pool, "--target", tgt, *[a for m in methods
                                                          for a in ("--method", m)],
               "--fractions", "0.1,1", "--device", "a100", "--mfu", "0.25")
    assert out.returncode == 0, out.stderr
    table = cost_rows(load_examples(pool), load_target(str(tgt)), methods, "smollm2-135m",
                      [0.1, 1.0], 1.0, Rate.gpu("a100", 0.25, n_params="smollm2-135m"))
    assert " ".join(table.title.split()) in " ".join(out.stdout.split())
    assert table.hours_column == "GPU-hours (a100, MFU 0.25)" and table.hours_column in out.stdout
    want = {r.stage: [f"{r.flops:.3e}", "" if r.paper is None else f"{r.paper:.3e}",
                      f"{r.hours:.3g}"] for r in table.rows}
    assert rows(out.stdout) == want
    assert list(want) == ["train on 10.0%", "train on 100.0%", "select: bm25", "select: ppl",
                          "select: less"]


def test_cost_rows_price_each_pass_at_its_own_rate(synth):
    examples = load_examples(synth / "pool.jsonl")
    table = cost_rows(examples, load_target(str(synth / "targets" / "synth-arithmetic")),
                      ["bm25", "less"], "smollm2-135m", [0.5], 2.0, MEASURED)
    stage = {"train on 50.0%": "train", "select: bm25": "score", "select: less": "less"}
    assert [r.stage for r in table.rows] == list(stage)
    for r in table.rows:
        assert r.hours == pytest.approx(r.flops / MEASURED.per_stage[stage[r.stage]] / 3600)
    assert table.hours_column == "hours (measured)" and MEASURED.source in table.title
    plain = cost_rows(examples, None, ["bm25"], "smollm2-135m", [1.0], 1.0)
    assert plain.hours_column is None and plain.rows[1] == ("select: bm25", None, None, None)
