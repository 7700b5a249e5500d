"""`ccds analyze` on runs made with the stacks (spec §8), read without a CSV: Hugging Face
Trainer folders (TRL SFT with a peft LoRA) and lm-evaluation-harness results, matched to their
selection by a manifest and the subsets' sidecars. The fixtures were made by the real
libraries (tests/fixtures/stacks/make_fixtures.py). Training FLOPs are ccds's cost model on the
Trainer's tokens; its `total_flos` rides beside; bad input is one line naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_cli import ccds, one_error_line

from ccds.analyse.stacks import points_from_runs, trainer_state
from ccds.data.formats import load_examples
from ccds.errors import CcdsError
from ccds.flops import Work, full_step_flops, lora_step_flops
from ccds.models import counts_without_weights, load_tokenizer, read_lora
from ccds.tokenize import encode

FIX = Path(__file__).parent / "fixtures" / "stacks"
RUNS = {"random-25": 0.25, "random-50": 0.5}


@pytest.fixture()
def stacks(tmp_path) -> Path:
    """A copy of the fixtures to break."""
    return Path(shutil.copytree(FIX, tmp_path / "stacks",
                                ignore=shutil.ignore_patterns("make_fixtures.py")))


def manifest(folder: Path, text: str) -> Path:
    """A manifest beside the fixtures' files, with the fixtures' defaults."""
    head = "model: tiny-llama\ntokenizer: smollm2-135m\ntarget: ccds_dates\n"
    path = folder / "m.yaml"
    path.write_text(head + text)
    return path


def _results(name: str) -> dict:
    return json.loads((FIX / "results" / f"{name}.json").read_text())["results"]


def _work(folder: Path, name: str, t: int) -> Work:
    """The Work ccds prices a run at: the Trainer's T, the subset's length profile."""
    lengths = encode(load_examples(folder / "subsets" / f"{name}.jsonl"),
                     load_tokenizer("smollm2-135m"), 1024).lengths
    return Work(sequences=len(lengths), tokens=t, head_tokens=t,
                tokens_sq=round(t * (lengths ** 2).sum() / lengths.sum()))


def test_fixture_runs_through_the_cli(tmp_path):
    r = ccds("analyze", FIX, "--out", tmp_path / "report", "--bootstrap", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ccds_dates / tiny-llama: 2 runs")
    for name in RUNS:
        line = next(ln for ln in r.stdout.splitlines() if f"runs/{name})" in ln)
        assert "FLOPs ccds (lora" in line and "Trainer total_flos" in line and "not used" in line
    report = json.loads((tmp_path / "report" / "fits.json").read_text())
    assert [c["run"] for c in report["trainer_total_flos"]] == ["random 25.0%", "random 50.0%"]
    assert report["groups"][0]["zero_shot"] == _results("base")["ccds_dates"]["acc,none"]
    assert "The Trainer's total_flos beside ccds's count" in (
        tmp_path / "report" / "report.md").read_text()
    csv = (tmp_path / "report" / "runs.csv").read_text().splitlines()
    assert csv[0].endswith("perf_stderr,training,attention_flops,trainer_total_flos,"
                           "total_flos_ratio,trainer_dir") and len(csv) == 3


def test_training_flops_are_ccds_cost_model_with_total_flos_beside():
    runs, meta = points_from_runs(FIX)
    for r, (name, fraction) in zip(runs, RUNS.items(), strict=True):
        path, state = trainer_state(FIX / "runs" / name)
        lora = read_lora(path.parent)
        p = counts_without_weights(str(FIX / "tiny-llama"), lora)
        assert p["lora"] == 2 * (64 * 8 + 8 * 64 + 64 * 8 + 8 * 32)  # r=8 on q_proj and v_proj
        t = state["num_input_tokens_seen"]
        w = _work(FIX, name, t)
        assert (r["method"], r["fraction"], r["tokens"], r["n"]) == ("random", fraction, t,
                                                                     w.sequences)
        assert r["training_flops"] == pytest.approx(lora_step_flops(p, w))
        assert r["training_paper_flops"] == pytest.approx(6 * p["active"] * t)
        assert r["selection_flops"] == r["selection_paper_flops"] == 0.0  # random, by sidecar
        # the Trainer's own count, beside: 6 × every non-embedding weight, LoRA included
        assert r["trainer_total_flos"] == state["total_flos"]
        assert state["total_flos"] == pytest.approx(6 * (p["active"] + p["lora"]) * t)
        assert r["total_flos_ratio"] == pytest.approx(state["total_flos"] / r["training_flops"])
    assert path.parent == FIX / "runs" / "random-50"  # save_state's, past its checkpoint's
    full = sorted(r["training_flops"] / r["fraction"] for r in runs)[1]  # the upper median
    assert meta["c_full/tiny-llama"]["analytic"] == pytest.approx(full)
    assert meta["zero_shot/ccds_dates/tiny-llama"]["perf"] == 0.125


def test_performance_from_acc_acc_norm_exact_match_and_na_stderr(tmp_path):
    runs, _ = points_from_runs(FIX)
    res25, res50 = _results("random-25")["ccds_dates"], _results("random-50")["ccds_dates"]
    assert (runs[0]["perf"], runs[0]["metric"]) == (res25["acc,none"], "acc,none")
    assert runs[0]["perf_stderr"] == res25["acc_stderr,none"]
    assert res50["acc_stderr,none"] == "N/A" and runs[1]["perf_stderr"] is None
    for metric, target, key in (("acc_norm", "ccds_dates", "acc_norm,none"),
                                (None, "ccds_arith", "exact_match,none")):
        m = tmp_path / f"{target}-{metric}.json"  # a JSON manifest, absolute paths
        m.write_text(json.dumps({"model": str(FIX / "tiny-llama"), "target": target,
                                 **({"metric": metric} if metric else {}),
                                 "runs": [{"trainer_dir": str(FIX / "runs" / "random-50"),
                                           "results": str(FIX / "results" / "random-50.json"),
                                           "method": "random", "fraction": 0.5}]}))
        (run,), _ = points_from_runs(m)
        assert (run["metric"], run["target"]) == (key, target)
        assert run["perf"] == _results("random-50")[target][key] and run["perf_stderr"] is None


def test_method_and_fraction_from_the_manifest_without_a_subset(stacks):
    m = manifest(stacks, "runs:\n  - trainer_dir: runs/random-25\n"
                         "    results: results/random-25.json\n"
                         "    method: random\n    fraction: 0.25\n")
    (run,), _ = points_from_runs(m)
    path, state = trainer_state(stacks / "runs" / "random-25")
    p = counts_without_weights(str(stacks / "tiny-llama"), read_lora(path.parent))
    t = state["num_input_tokens_seen"]
    assert run["attention_flops"] is None  # no subset lengths: left out, and said so
    assert run["training_flops"] == pytest.approx(lora_step_flops(p, Work(tokens=t,
                                                                         head_tokens=t)))


def test_tokens_counted_from_the_subset_when_the_trainer_did_not(stacks):
    """A Trainer without include_num_input_tokens_seen saves 0: T is then the subset's tokens
    times the epochs; without a subset it is one line naming the state."""
    state_path = stacks / "runs" / "random-25" / "checkpoint-3" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "num_input_tokens_seen": 0}))
    runs, _ = points_from_runs(stacks)
    lengths = encode(load_examples(stacks / "subsets" / "random-25.jsonl"),
                     load_tokenizer("smollm2-135m"), 1024).lengths
    assert runs[0]["tokens"] == lengths.sum() < state["num_input_tokens_seen"]  # no padding
    m = manifest(stacks, "runs:\n  - trainer_dir: runs/random-25\n"
                         "    results: results/random-25.json\n"
                         "    method: random\n    fraction: 0.25\n")
    one_error_line(ccds("analyze", m), "no num_input_tokens_seen", str(state_path),
                   "include_num_input_tokens_seen=True")


def test_full_fine_tuning_without_an_adapter(stacks):
    for f in (stacks / "runs" / "random-50").rglob("adapter_config.json"):
        f.unlink()
    runs, _ = points_from_runs(stacks)
    assert runs[1]["training"] == "full" and runs[0]["training"] == "lora"
    p = counts_without_weights(str(stacks / "tiny-llama"))
    w = _work(stacks, "random-50", runs[1]["tokens"])
    assert runs[1]["training_flops"] == pytest.approx(full_step_flops(p, w))


# -- bad input: one line naming the file ----------------------------------------------------

def test_trainer_folder_without_trainer_state(stacks):
    for f in (stacks / "runs" / "random-25").rglob("trainer_state.json"):
        f.unlink()
    one_error_line(ccds("analyze", stacks, "--out", stacks / "r"),
                   "without trainer_state.json", str(stacks / "runs" / "random-25"))
    assert not (stacks / "r").exists()


def test_results_file_from_another_tool(stacks):
    """The Trainer's own all_results.json given as the evaluation."""
    state = json.loads((stacks / "runs" / "random-50" / "trainer_state.json").read_text())
    other = stacks / "results" / "random-25.json"
    other.write_text(json.dumps(state["log_history"][-1]))
    one_error_line(ccds("analyze", stacks), "not an lm-evaluation-harness results file",
                   str(other))


def test_a_run_the_manifest_does_not_name(stacks):
    shutil.copytree(stacks / "runs" / "random-50", stacks / "runs" / "random-75")
    one_error_line(ccds("analyze", stacks), "does not name",
                   f"{stacks / 'runs' / 'random-75'}: ")


@pytest.mark.parametrize("run,line,what", [
    ("  - trainer_dir: runs/random-25\n    results: results/random-25.json\n", 5,
     "the run has no method and fraction"),
    ("  - trainer_dir: runs/random-25\n    results: results/random-25.json\n"
     "    subset: subsets/random-25.jsonl\n    fraction: 0.5\n", 5,
     "fraction 0.5 differs from the subset's 0.25"),
    ("  - trainer_dir: runs/random-25\n    results: results/random-25.json\n"
     "    method: bm25\n    fraction: 0.25\n", 5, "no selection FLOPs for bm25"),
    ("  - trainer_dir: runs/random-25\n    result: results/random-25.json\n", 5,
     "bad run key"),
    ("  - trainer_dir: runs/random-25\n    results: results/random-25.json\n"
     "    method: random\n    fraction: 0.25\n"
     "  - trainer_dir: runs/random-25\n    results: results/random-25.json\n"
     "    method: random\n    fraction: 0.25\n", 9, "runs/random-25 is named twice"),
])
def test_bad_manifest_runs_name_the_line(stacks, run, line, what):
    m = manifest(stacks, "runs:\n" + run)
    with pytest.raises(CcdsError) as e:
        points_from_runs(m)
    assert e.value.where == f"{m}:{line}" and e.value.what.startswith(what)
    one_error_line(ccds("analyze", m), f"{m}:{line}")


def test_unknown_task_and_manifest_key(stacks):
    m = manifest(stacks, "runs:\n  - trainer_dir: runs/random-25\n"
                         "    results: results/random-25.json\n    subset: "
                         "subsets/random-25.jsonl\n    target: mmlu\n")
    one_error_line(ccds("analyze", m), "no task 'mmlu'", str(stacks / "results" /
                                                            "random-25.json"))
    m.write_text("modle: x\n" + m.read_text())
    one_error_line(ccds("analyze", m), f"{m}:1", "unknown key 'modle'")


def test_where_keeps_the_runs_with_a_value(tmp_path):
    (run,), _ = points_from_runs(FIX, {"fraction": "0.5"})
    assert run["trainer_dir"].endswith("random-50")
    one_error_line(ccds("analyze", FIX, "--where", "method=bm25", "--out", tmp_path / "r"),
                   "no runs where", str(FIX / "ccds-runs.yaml"))
