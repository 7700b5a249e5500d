"""Loaders for the shared datasets (real data; skipped when absent) and target/source specs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ccds.data import sources as S
from ccds.data.types import Example, Target
from ccds.errors import CcdsError


@pytest.fixture(scope="module")
def data_dir(shared_data) -> Path:
    return shared_data


# --- data dir -----------------------------------------------------------------------------


def test_data_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CCDS_HUB_MIRROR", str(tmp_path / "no-mirror"))  # the hub: not here
    monkeypatch.setenv("CCDS_DATA_DIR", str(tmp_path))
    assert S.default_data_dir() == tmp_path.resolve()
    with pytest.raises(CcdsError, match="no mmlu/ folder.*cais/mmlu.*set CCDS_DATA_DIR"):
        S.load_mmlu()
    monkeypatch.setenv("CCDS_DATA_DIR", str(tmp_path / "absent"))
    assert S.default_data_dir() is None
    with pytest.raises(CcdsError, match="shared data folder not found.*set CCDS_DATA_DIR"):
        S.load_source("gsm8k")
    with pytest.raises(CcdsError, match="shared data folder not found.*set CCDS_DATA_DIR"):
        S.load_source("alpaca")


# --- MMLU ---------------------------------------------------------------------------------


@pytest.mark.data
def test_mmlu_counts_and_format(data_dir):
    assert len(S.mmlu_subjects(data_dir)) == 57
    dev = S.load_mmlu(data_dir, split="dev")
    test = S.load_mmlu(data_dir)
    assert (len(dev), len(test)) == (285, 14079)
    assert len({e.id for e in test}) == len(test)
    ex = next(e for e in test if e.source == "mmlu/high_school_biology")
    lines = ex.prompt.split("\n")
    assert lines[0] == "The following is a multiple choice question about high school biology."
    assert [ln[:3] for ln in lines[-5:-1]] == ["A. ", "B. ", "C. ", "D. "]
    assert lines[-1] == "Answer with the letter of the correct option."
    assert all(e.choices == ["A", "B", "C", "D"] and e.answer == e.response for e in test)
    assert {e.response for e in test} == {"A", "B", "C", "D"}


@pytest.mark.data
def test_mmlu_target_subset_and_cap(data_dir):
    t = S.load_target("mmlu:anatomy,virology", data_dir, n_test=3)
    assert (t.name, t.metric, t.extract) == ("mmlu:anatomy,virology", "mc", "first_line")
    assert t.subtasks == ["mmlu/anatomy", "mmlu/virology"]
    assert (len(t.val), len(t.test)) == (10, 6)
    assert [e.id for e in t.test[:3]] == [f"mmlu/anatomy/test-{i}" for i in range(3)]
    with pytest.raises(CcdsError, match="unknown MMLU subject astrology.*valid: abstract"):
        S.load_target("mmlu:astrology", data_dir)


def test_mmlu_bad_row_names_line(tmp_path):
    for split in ("test", "dev"):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        (tmp_path / "mmlu" / split / f"law_{split}.csv").write_text(
            "Q1,a,b,c,d,A\nQ2,a,b,c,d,E\n")
    with pytest.raises(CcdsError, match=r"law_test.csv:2: expected question"):
        S.load_mmlu(tmp_path)
    assert len(S.load_mmlu(tmp_path, limit_per_subject=1)) == 1


# --- BBH ----------------------------------------------------------------------------------


@pytest.mark.data
def test_bbh_examples_and_choices(data_dir):
    assert len(S.bbh_tasks(data_dir)) == 27
    test = S.load_bbh(data_dir)
    assert len(test) == 6511 - 3  # three upstream targets are not among their own options
    by_task: dict[str, list[Example]] = {}
    for e in test:
        by_task.setdefault(e.source.removeprefix("bbh/"), []).append(e)
    assert len(by_task["penguins_in_a_table"]) == 146
    assert len(by_task["movie_recommendation"]) == 249
    for e in test:
        assert e.answer == e.response
        assert e.choices is None or e.response in e.choices
    assert by_task["navigate"][0].choices == ["No", "Yes"]
    assert by_task["formal_fallacies"][0].choices == ["invalid", "valid"]
    assert by_task["date_understanding"][0].choices == [f"({c})" for c in "ABCDEF"]
    assert all(e.choices is None for t in ("object_counting", "word_sorting", "dyck_languages")
               for e in by_task[t])
    assert S.load_target("bbh:navigate,snarks", data_dir).metric == "mc"
    full = S.load_target("bbh", data_dir, n_test=2)
    assert (full.metric, len(full.test), len(full.val)) == ("exact", 54, 81)


@pytest.mark.data
def test_bbh_cot_exemplars(data_dir):
    val = S.load_bbh_cot(data_dir)
    targets = {e.source: {t.response for t in S.load_bbh(data_dir, [e.source[4:]])}
               for e in val[::3]}
    assert len(val) == 81
    for e in val:
        assert e.prompt and not e.prompt.startswith("Q:") and "\nA: " not in e.prompt
        assert e.response.startswith("Let's think step by step.")
        assert e.answer and not e.answer.endswith(".") and e.response.endswith(".")
        if len(targets[e.source]) <= 10 or e.answer.startswith("("):
            assert e.answer in targets[e.source], e.id
    nav = [e for e in val if e.source == "bbh/navigate"]
    assert [e.answer for e in nav] == ["No", "No", "Yes"]
    assert nav[0].prompt.startswith("If you follow these instructions")
    assert nav[0].prompt.endswith("Options:\n- Yes\n- No")


def test_parse_cot_prompt_errors(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("canary\n-----\nTask.\n\nQ: one?\nA: Step. So the answer is (B).\n\n"
                    "Q: two\n\nwith a blank line?\nA: So the answer is 3.")
    assert S.parse_cot_prompt(good) == [("one?", "Step. So the answer is (B).", "(B)"),
                                        ("two\n\nwith a blank line?", "So the answer is 3.",
                                         "3")]
    bad = tmp_path / "bad.txt"
    bad.write_text("canary\n-----\nTask.\n\nQ: one?\nA: x. So the answer is 1.\n\n"
                   "Q: two?\nA: no final answer\n")
    with pytest.raises(CcdsError, match=rf"^{re.escape(str(bad))}:8: exemplar needs"):
        S.parse_cot_prompt(bad)
    (tmp_path / "nosep.txt").write_text("Q: a\nA: So the answer is 1.")
    with pytest.raises(CcdsError, match="no '-----' line"):
        S.parse_cot_prompt(tmp_path / "nosep.txt")


# --- GSM8K and Alpaca ---------------------------------------------------------------------


@pytest.mark.data
def test_gsm8k(data_dir):
    train, test = S.load_gsm8k(data_dir), S.load_gsm8k(data_dir, "test")
    assert (len(train), len(test)) == (7473, 1319)
    assert train[0].answer == "72" and train[0].response.endswith("#### 72")
    assert all(re.fullmatch(r"-?[\d.]+", e.answer) for e in train + test)
    assert any("," in e.response.rpartition("####")[2] for e in train)  # commas were removed
    target, held_out = S.gsm8k_target(data_dir, n_val=8, n_test=100, seed=0)
    assert (len(target.val), len(target.test), target.metric, target.extract) == (
        8, 100, "exact", "number")
    assert held_out == [e.id for e in target.val]
    train_ids = {e.id: e for e in train}
    assert all(train_ids[e.id].prompt == e.prompt for e in target.val)
    assert S.gsm8k_target(data_dir, seed=0)[1] == held_out
    assert S.gsm8k_target(data_dir, seed=1)[1] != held_out
    assert [e.id for e in S.load_target("gsm8k", data_dir).val] == held_out


@pytest.mark.data
def test_alpaca(data_dir):
    rows = json.loads((data_dir / "alpaca" / "alpaca_5000.json").read_text())
    alpaca = S.load_source("alpaca", data_dir)
    assert len(rows) == 5000 and len(alpaca) == 5000 - 2  # two rows have an empty output
    assert all(e.source == "alpaca" and e.response.strip() for e in alpaca)
    with_input = next(i for i, r in enumerate(rows) if r["input"])
    ex = next(e for e in alpaca if e.id.endswith(f"-{with_input}"))
    assert ex.prompt == f"{rows[with_input]['instruction']}\n\n{rows[with_input]['input']}"


# --- BIG-bench ----------------------------------------------------------------------------


@pytest.mark.data
def test_bigbench_real(data_dir):
    names = S.bigbench_tasks(data_dir)
    assert len(names) == 289
    examples = S.load_source("bigbench", data_dir)
    assert len({e.source for e in examples}) >= 280 and len(examples) >= 50_000
    assert len({e.id for e in examples}) == len(examples)
    for e in examples:
        assert e.prompt == e.prompt.strip() and e.response.strip()
        assert e.choices is None or e.response in e.choices
    plural = S.load_source("bigbench:linguistic_mappings/plural_json", data_dir)[0]
    assert re.fullmatch(r"This is a \w+\. Now there is another one\. There are two",
                        plural.prompt)
    add = S.load_source("bigbench:arithmetic", data_dir)
    assert {e.source for e in add} >= {"bigbench/arithmetic/1_digit_addition"}
    first = add[0]
    assert first.response in first.choices and "\n  choice: " in first.prompt


def _task(root: Path, name: str, content: str | dict) -> None:
    (root / name).mkdir(parents=True)
    text = content if isinstance(content, str) else json.dumps(content)
    (root / name / "task.json").write_text(text)


@pytest.fixture()
def fake_bigbench(tmp_path) -> Path:
    root = tmp_path / "bigbench"
    _task(root, "good", {"examples": [{"input": "1+1", "target": ["2", "two"]},
                                      {"input": "2+2", "target": ""},
                                      {"input": "3+3", "target": "6"}] + [
        {"input": f"{i}*1", "target": str(i)} for i in range(4, 10)]})
    _task(root, "mc/sub", {
        "task_prefix": "Pick.\n", "example_input_prefix": "Q: ", "example_output_prefix": "\nA:",
        "append_choices_to_input": "false",
        "examples": [{"input": "sky?", "target_scores": {"red": 0, "blue": 1, "navy": 1}}]})
    _task(root, "mc/shown", {"choice_prefix": "\n- ", "examples": [
        {"input": "sky?", "target_scores": {"red": 0, "blue": 1}}]})
    _task(root, "broken", '{"examples": [')
    _task(root, "empty", {"examples": [{"input": "x"}]})
    return tmp_path


def test_bigbench_formats_and_skips(fake_bigbench, caplog):
    examples = {e.id: e for e in S.load_bigbench(fake_bigbench)}
    assert "skipped 2 of 5 BIG-bench tasks" in caplog.text
    assert set(examples) == {"bigbench/good/0", "bigbench/good/2", *(
        f"bigbench/good/{i}" for i in range(3, 9)), "bigbench/mc/sub/0", "bigbench/mc/shown/0"}
    good = examples["bigbench/good/0"]
    assert (good.prompt, good.response, good.answer, good.metadata) == (
        "1+1", "2", "2", {"targets": ["2", "two"]})
    sub = examples["bigbench/mc/sub/0"]
    assert (sub.prompt, sub.response, sub.choices) == ("Pick.\nQ: sky?\nA:", "blue",
                                                       ["red", "blue", "navy"])
    assert examples["bigbench/mc/shown/0"].prompt == "sky?\n- red\n- blue"


def test_bigbench_explicit_tasks(fake_bigbench):
    assert {e.source for e in S.load_bigbench(fake_bigbench, ["mc"])} == {
        "bigbench/mc/sub", "bigbench/mc/shown"}
    with pytest.raises(CcdsError, match=r"broken/task.json:1: malformed JSON"):
        S.load_bigbench(fake_bigbench, ["broken"])
    with pytest.raises(CcdsError, match="no usable examples"):
        S.load_source("bigbench:empty", fake_bigbench)
    with pytest.raises(CcdsError, match="unknown BIG-bench task 'nope'"):
        S.load_bigbench(fake_bigbench, ["nope"])
    target = S.load_target("bigbench:good", fake_bigbench, n_test=2)
    assert [e.id for e in target.val] == ["bigbench/good/0", "bigbench/good/2",
                                          "bigbench/good/3", "bigbench/good/4"]
    assert len(target.test) == 2 and target.metric == "exact"
    assert S.load_target("bigbench:mc", fake_bigbench).metric == "mc"


# --- specs and target folders -------------------------------------------------------------


@pytest.mark.parametrize("spec", ["mmlux", "gsm8k:foo", "bigbench", "", "nonsense:1"])
def test_unknown_target_spec(spec):
    with pytest.raises(CcdsError, match="unknown target.*valid forms: mmlu"):
        S.load_target(spec)


def test_save_and_load_target_folder(tmp_path):
    target = Target("demo", val=[Example("v0", "p", "r", "s1")],
                    test=[Example("t0", "q", "B", "s1", choices=["A", "B"], answer="B")],
                    metric="mc", extract="first_line")
    folder = tmp_path / "tgt"
    S.save_target(target, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["target.json", "test.jsonl", "val.jsonl"]
    loaded = S.load_target(str(folder))
    assert (loaded.name, loaded.metric, loaded.extract) == ("demo", "mc", "first_line")
    assert [e.to_dict() for e in loaded.val + loaded.test] == [
        e.to_dict() for e in target.val + target.test]
    (folder / "target.json").write_text('{"name": "demo", "metric": "bleu"}')
    with pytest.raises(CcdsError, match="bad metric"):
        S.load_target(str(folder))


def test_load_source_falls_through_to_files(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n')
    assert S.load_source(str(path))[0].source == "mine"
    with pytest.raises(CcdsError, match="unknown source .*other.jsonl.*valid forms: bigbench"):
        S.load_source(str(tmp_path / "other.jsonl"))
