"""`ccds analyze` on runs made anywhere (a CSV or JSONL of points): the paper's own MMLU points
through the CLI, then `ccds plan --fits` from what it wrote; bad rows are one line naming
the file and line."""

import json
import subprocess
import sys

import pytest

from ccds import CcdsError
from ccds.analyse.points import read_points


def ccds(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ccds", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


@pytest.mark.data
@pytest.mark.slow
def test_paper_points_through_the_cli_then_plan(shared_data, tmp_path):
    points = shared_data / "ccds_paper" / "mmlu_points.csv"
    r = ccds("analyze", points, "--where", "view=compute_constrained", "--convention", "paper",
             "--bootstrap", "20", "--out", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    assert [line.split(":")[0] for line in r.stdout.splitlines()[:3]] == [
        "mmlu / llama-2-7b", "mmlu / llama-2-13b", "mmlu / llama-2-70b"]
    report = json.loads((tmp_path / "report" / "fits.json").read_text())
    g7 = report["groups"][0]
    assert g7["c_full"] == pytest.approx(4.593e18, rel=1e-3)  # from random's runs
    assert set(g7["fits"]) == {"random", "bm25", "embed", "ppl", "less"}
    assert {"ppl", "less"} <= set(g7["break_even"])
    assert (tmp_path / "report" / "report.html").exists()
    plan = ccds("plan", "--budget", "2e18", "--fits", tmp_path / "report" / "fits.json",
                "--train-model", "7B", "--selection-model", "7B", "--pool-tokens", "1e8")
    assert plan.returncode == 0, plan.stderr
    assert "Use " in plan.stdout and "less              ruled out" in plan.stdout


def test_totals_only_take_c_full_from_random(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("method,fraction,total_flops,accuracy,task\n"
                 "random,0.1,1e17,40,mmlu\nrandom,0.5,5e17,42,mmlu\nppl,0.1,3e17,41,mmlu\n")
    runs, meta = read_points(p)
    assert meta["c_full/model"]["paper"] == pytest.approx(1e18)
    ppl = next(r for r in runs if r["method"] == "ppl")
    assert (ppl["training_flops"], ppl["selection_flops"]) == pytest.approx((1e17, 2e17))
    assert ppl["target"] == "mmlu" and ppl["perf"] == 41


def test_jsonl_with_split_flops_and_zero_shot(tmp_path):
    p = tmp_path / "p.jsonl"
    rows = [{"method": "bm25", "fraction": f, "selection_flops": 1e15, "training_flops": f * 8e17,
             "perf": -1.0 + f, "model": "m", "target": "t", "zero_shot": -1.2, "seed": 1}
            for f in (0.1, 0.2)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs, meta = read_points(p)
    assert meta["c_full/m"]["analytic"] == pytest.approx(8e17)
    assert meta["zero_shot/t/m"]["perf"] == -1.2 and runs[0]["seed"] == 1


@pytest.mark.parametrize("text,line,what", [
    ("method,fraction,total_flops,perf\nrandom,0.1,abc,1\n", 2, "total_flops 'abc'"),
    ("method,fraction,total_flops,perf\nrandom,0.1,1e17,1\nppl,0.1,,2\n", 3, "missing FLOPs"),
    ("method,fraction,total_flops\nrandom,0.1,1e17\n", 2, "missing performance"),
    ("method,fraction,total_flops,perf\n,0.1,1e17,1\n", 2, "missing method"),
    ("method,fraction,total_flops,perf\nrandom,0,1e17,1\n", 2, "fraction '0'"),
    ("method,fraction,total_flops,perf\nrandom,0.1,-1e17,1\n", 2, "negative FLOPs"),
])
def test_bad_rows_name_file_and_line(tmp_path, text, line, what):
    p = tmp_path / "p.csv"
    p.write_text(text)
    with pytest.raises(CcdsError) as e:
        read_points(p)
    assert e.value.where == f"{p}:{line}" and e.value.what.startswith(what)


def test_bad_jsonl_line_and_no_way_to_c_full(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"method": "ppl", "fraction": 0.1, "total_flops": 1e17, "perf": 1}\n[1]\n')
    with pytest.raises(CcdsError) as e:
        read_points(p)
    assert e.value.where == f"{p}:2"
    p.write_text('{"method": "ppl", "fraction": 0.1, "total_flops": 1e17, "perf": 1}\n')
    with pytest.raises(CcdsError, match="cannot tell C_full"):
        read_points(p)


def test_cli_bad_points_file_is_one_line(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("method,fraction,total_flops,perf\nrandom,0.1,abc,1\n")
    r = ccds("analyze", p, "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{p}:2" in r.stderr and not (tmp_path / "o").exists()
