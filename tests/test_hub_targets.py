"""MMLU, BBH and GSM8K targets from their Hugging Face hub copies, offline.

The hub repositories are written here as the hub serves them (`<config>/<split>-00000-of-
00001.parquet` with the README's `configs:` metadata, the hub's columns and feature types)
and read through `datasets.load_dataset` from `CCDS_HUB_MIRROR`, the same call and parsing a
download meets. Rows of the shared data, converted into the hub's schema, must give the
same targets as the local files; with neither source, one line says what to set."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import huggingface_hub.constants
import pytest
from datasets import ClassLabel, Dataset, Features, Sequence, Value

from ccds.data import sources as S
from ccds.data.types import Target
from ccds.errors import CcdsError

MMLU = Features({"question": Value("string"), "subject": Value("string"),
                 "choices": Sequence(Value("string")), "answer": ClassLabel(names=list("ABCD"))})
GSM8K = Features({"question": Value("string"), "answer": Value("string")})
BBH = Features({"input": Value("string"), "target": Value("string")})


def write_repo(mirror: Path, repo: str, configs: dict[str, dict[str, list[dict]]],
               features: Features) -> None:
    """`repo` as the hub serves it: one parquet file per config and split, named in the
    README's `configs:` metadata."""
    card = ["---", "configs:"]
    for config, splits in configs.items():
        card += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            path = mirror / repo / config / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            Dataset.from_list(rows, features=features).to_parquet(path)
            card += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (mirror / repo / "README.md").write_text("\n".join([*card, "---", ""]))


def write_mmlu(mirror: Path, splits: dict[str, list[dict]]) -> None:
    """cais/mmlu: an "all" config and one per subject, as on the hub."""
    subjects = sorted({r["subject"] for rows in splits.values() for r in rows})
    configs = {"all": splits} | {s: {split: [r for r in rows if r["subject"] == s]
                                     for split, rows in splits.items()
                                     if any(r["subject"] == s for r in rows)}
                                 for s in subjects}
    write_repo(mirror, "cais/mmlu", configs, MMLU)


def cot_prompt(task: str, shots: list[tuple[str, str]]) -> str:
    """A cot-prompts/<task>.txt in BIG-Bench-Hard's layout."""
    blocks = [f"Q: {q}\nA: Let's think step by step.\nSo the answer is {a}." for q, a in shots]
    return "canary\n-----\nThe " + task + " task.\n\n" + "\n\n".join(blocks) + "\n"


@pytest.fixture()
def hub(tmp_path, monkeypatch) -> SimpleNamespace:
    """An empty data folder, a hub mirror to fill, and no way to the real hub or its cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    data, mirror = tmp_path / "data", tmp_path / "mirror"
    data.mkdir()
    monkeypatch.setenv("CCDS_DATA_DIR", str(data))
    monkeypatch.setenv("CCDS_HUB_MIRROR", str(mirror))
    return SimpleNamespace(data=data, mirror=mirror)


def same(a: Target, b: Target) -> None:
    assert (a.name, a.metric, a.extract) == (b.name, b.metric, b.extract)
    assert [e.to_dict() for e in a.val] == [e.to_dict() for e in b.val]
    assert [e.to_dict() for e in a.test] == [e.to_dict() for e in b.test]


# --- MMLU ---------------------------------------------------------------------------------


def _mmlu_row(subject: str, q: str, answer: int) -> dict:
    return {"question": q, "subject": subject, "choices": [" w", "x ", "y", "z"],
            "answer": answer}


def test_mmlu_dev_is_v_and_test_is_t(hub):
    write_mmlu(hub.mirror, {
        "dev": [_mmlu_row(s, f"{s} dev {i}", i % 4) for s in ("anatomy", "virology")
                for i in range(5)],
        "validation": [_mmlu_row("anatomy", "val", 1)],
        "test": [_mmlu_row("anatomy", f" anatomy q{i} ", 3) for i in range(3)]
        + [_mmlu_row("virology", f"virology q{i}", 2) for i in range(2)]})
    assert S.mmlu_subjects() == ["anatomy", "virology"]
    t = S.load_target("mmlu")
    assert (t.name, t.metric, t.extract) == ("mmlu", "mc", "first_line")
    assert (len(t.val), len(t.test)) == (10, 5)
    assert [e.id for e in t.val[:5]] == [f"mmlu/anatomy/dev-{i}" for i in range(5)]
    assert [e.response for e in t.val[:5]] == ["A", "B", "C", "D", "A"]
    first = t.test[0]
    assert first.prompt == ("The following is a multiple choice question about anatomy.\n\n"
                            "anatomy q0\nA. w\nB. x\nC. y\nD. z\n"
                            "Answer with the letter of the correct option.")
    assert (first.id, first.response, first.answer, first.choices) == (
        "mmlu/anatomy/test-0", "D", "D", ["A", "B", "C", "D"])
    capped = S.load_target("mmlu:virology,anatomy", n_test=1)
    assert [e.id for e in capped.test] == ["mmlu/virology/test-0", "mmlu/anatomy/test-0"]
    assert [e.id for e in S.load_mmlu(split="val")] == ["mmlu/anatomy/val-0"]
    with pytest.raises(CcdsError, match="unknown MMLU subject astrology.*valid: anatomy, virology"):
        S.load_target("mmlu:astrology")


def test_mmlu_bad_hub_row_names_the_row(hub):
    bad = _mmlu_row("anatomy", "q", 0) | {"choices": ["only", "three", "options"]}
    write_mmlu(hub.mirror, {"dev": [_mmlu_row("anatomy", "q", 0), bad]})
    with pytest.raises(CcdsError, match=r"cais/mmlu all/dev row 1: expected question, subject, "
                                        r"4 choices"):
        S.load_mmlu(split="dev")


# --- GSM8K --------------------------------------------------------------------------------


def _gsm8k_rows(n: int, tag: str = "") -> list[dict]:
    return [{"question": f"{tag}How many {i}?", "answer": f"{i} + 1000 = {i + 1000}\n"
                                                          f"#### {i + 1000:,}"} for i in range(n)]


def test_gsm8k_v_is_the_same_held_out_train_rows(hub, tmp_path):
    train, test = _gsm8k_rows(30), _gsm8k_rows(6, "test: ")
    write_repo(hub.mirror, "openai/gsm8k", {"main": {"train": train, "test": test}}, GSM8K)
    target, held_out = S.gsm8k_target(n_test=4)
    assert (len(target.val), len(target.test), target.metric, target.extract) == (
        8, 4, "exact", "number")
    assert target.test[0].answer == "1000" and target.test[0].response.endswith("#### 1,000")
    pool_ids = {e.id for e in S.load_source("gsm8k")}  # the hub's train rows, V's ids among them
    assert len(pool_ids) == 30 and set(held_out) <= pool_ids
    local = tmp_path / "local"
    (local / "gsm8k").mkdir(parents=True)
    for split, rows in (("train", train), ("test", test)):
        (local / "gsm8k" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                                for r in rows))
    for seed in (0, 1):
        same(S.load_target("gsm8k", seed=seed), S.load_target("gsm8k", local, seed=seed))
    (hub.data / "gsm8k").symlink_to(local / "gsm8k", target_is_directory=True)
    (local / "gsm8k" / "test.jsonl").write_text(json.dumps(_gsm8k_rows(1, "local: ")[0]) + "\n")
    assert S.load_target("gsm8k").test[0].prompt == "local: How many 0?"  # local folder first


# --- BBH ----------------------------------------------------------------------------------

NAVIGATE = "Turn left. Take {} steps.\nOptions:\n- Yes\n- No"
DATES = "What day is it?\nOptions:\n(A) Monday\n(B) Tuesday\n(C) Friday"


def test_bbh_t_from_the_hub_and_v_from_the_cot_prompts(hub):
    write_repo(hub.mirror, "SaylorTwift/bbh", {
        "navigate": {"test": [{"input": NAVIGATE.format(i), "target": "Yes" if i % 2 else "No"}
                              for i in range(4)]},
        "date_understanding": {"test": [{"input": DATES, "target": "(B)"},
                                        {"input": DATES, "target": "(D)"},  # not an option
                                        {"input": DATES, "target": "(A)"}]}}, BBH)
    with pytest.raises(CcdsError) as err:
        S.load_target("bbh:navigate")
    assert "\n" not in str(err.value)
    assert "not on the hub" in str(err.value) and "bbh/cot-prompts/" in str(err.value)
    cot = hub.data / "bbh" / "cot-prompts"
    cot.mkdir(parents=True)
    (cot / "navigate.txt").write_text(cot_prompt("navigate", [("Turn around?", "No"),
                                                              ("Take 1 step?", "Yes")]))
    (cot / "date_understanding.txt").write_text(cot_prompt("dates", [("Today?", "(A)")]))
    assert S.bbh_tasks() == list(S.BBH_TASKS)  # cot-prompts alone are no local BBH
    t = S.load_target("bbh:navigate,date_understanding")
    assert (t.metric, t.extract) == ("mc", "first_line")
    assert [(e.id, e.answer) for e in t.val] == [
        ("bbh/navigate/cot-0", "No"), ("bbh/navigate/cot-1", "Yes"),
        ("bbh/date_understanding/cot-0", "(A)")]
    assert [e.id for e in t.test] == [f"bbh/navigate/test-{i}" for i in range(4)] + [
        "bbh/date_understanding/test-0", "bbh/date_understanding/test-2"]
    assert t.test[0].choices == ["No", "Yes"] and t.test[0].prompt == NAVIGATE.format(0)
    assert t.test[-1].choices == ["(A)", "(B)", "(C)"]
    assert len(S.load_target("bbh:navigate", n_test=2).test) == 2
    with pytest.raises(CcdsError, match="unknown BBH task nope.*valid: boolean_expressions"):
        S.load_target("bbh:nope")


@pytest.mark.data
def test_bbh_task_list_is_the_shared_one(shared_data):
    assert S.bbh_tasks(shared_data) == list(S.BBH_TASKS)


# --- the hub's schema gives the local files' targets --------------------------------------


@pytest.mark.data
def test_shared_rows_in_the_hub_schema_give_the_same_targets(hub, shared_data):
    subjects = ["anatomy", "virology"]
    mmlu = {}
    for split, hub_split in (("dev", "dev"), ("val", "validation"), ("test", "test")):
        mmlu[hub_split] = []
        for s in subjects:
            with open(shared_data / "mmlu" / split / f"{s}_{split}.csv", newline="",
                      encoding="utf-8") as f:
                mmlu[hub_split] += [{"question": q, "subject": s, "choices": [a, b, c, d],
                                     "answer": "ABCD".index(letter.strip())}
                                    for q, a, b, c, d, letter in csv.reader(f)]
    write_mmlu(hub.mirror, mmlu)
    gsm8k = {split: [json.loads(line) for line in (shared_data / "gsm8k" / f"{split}.jsonl")
                     .read_text(encoding="utf-8").splitlines() if line.strip()]
             for split in ("train", "test")}
    write_repo(hub.mirror, "openai/gsm8k", {"main": gsm8k}, GSM8K)
    tasks = ["navigate", "ruin_names", "date_understanding"]  # ruin_names drops 2 rows
    write_repo(hub.mirror, "SaylorTwift/bbh", {t: {"test": json.loads(
        (shared_data / "bbh" / f"{t}.json").read_text(encoding="utf-8"))["examples"]}
        for t in tasks}, BBH)
    (hub.data / "bbh").mkdir()
    (hub.data / "bbh" / "cot-prompts").symlink_to(shared_data / "bbh" / "cot-prompts",
                                                  target_is_directory=True)

    for spec, n_test in (("mmlu:anatomy,virology", None), ("mmlu:virology", 7),
                         ("gsm8k", None), ("gsm8k", 50), ("bbh:" + ",".join(tasks), None)):
        from_hub = S.load_target(spec, n_test=n_test)
        assert from_hub.val and from_hub.test
        same(from_hub, S.load_target(spec, shared_data, n_test=n_test))
    assert [e.to_dict() for e in S.load_mmlu(subjects=subjects, split="val")] == [
        e.to_dict() for e in S.load_mmlu(shared_data, subjects, split="val")]


# --- neither source -----------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "says"), [("mmlu", "cais/mmlu"), ("gsm8k", "openai/gsm8k"),
                                            ("bbh", "not on the hub")])
def test_neither_source_is_one_line_and_exit_2(tmp_path, spec, says):
    (tmp_path / "empty").mkdir()
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"prompt": "p", "response": "r"}\n')
    env = {k: v for k, v in os.environ.items() if k != "CCDS_HUB_MIRROR"} | {
        "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
        "CCDS_DATA_DIR": str(tmp_path / "empty")}
    r = subprocess.run([sys.executable, "-m", "ccds", "data", "build-pool", "--source",
                        str(pool), "--out", str(tmp_path / "out.jsonl"), "--target", spec],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ccds: error: "), r.stderr
    assert says in lines[0] and "CCDS_DATA_DIR" in lines[0]
    if spec != "bbh":
        assert "offline" in lines[0].lower()  # the datasets version words it
        assert "HF_HOME" in lines[0] and "CCDS_HUB_MIRROR" in lines[0]
    assert not (tmp_path / "out.jsonl").exists()
