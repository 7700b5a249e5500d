"""Subsets in the layouts the training stacks read (spec §8), from `ccds select --format`:
each file loads with the datasets library, matches its stack's schema, and carries a
sidecar (ids, scores, method, parameters, pool hash) that `check_sidecar` holds it to."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_cli import ccds, one_error_line

from ccds.data.formats import (
    SUBSET_FORMATS,
    check_sidecar,
    load_examples,
    sidecar_path,
    write_subset,
)
from ccds.errors import CcdsError

N = 10  # examples selected from the 40 of the pool
FILES = {"ccds": "ccds.jsonl", "messages": "messages.jsonl", "prompt-completion": "pc.jsonl",
         "alpaca": "alpaca.json", "sharegpt": "sharegpt.json"}
COLUMNS = {"messages": {"id", "messages", "source"},
           "prompt-completion": {"id", "prompt", "completion", "source"},
           "alpaca": {"id", "instruction", "input", "output", "source"},
           "sharegpt": {"id", "conversations", "source"}}


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    r = ccds("data", "synth", "--out", out, "--n-pool", "40", "--n-test", "5")
    assert r.returncode == 0, r.stderr
    return out / "pool.jsonl"


@pytest.fixture(scope="module")
def subsets(pool, tmp_path_factory) -> dict[str, Path]:
    """One subset per format, all in one folder (so alpaca and sharegpt share, and merge
    into, one dataset_info.json that already holds someone else's entry)."""
    out = tmp_path_factory.mktemp("subsets")
    (out / "dataset_info.json").write_text(json.dumps({"theirs": {"file_name": "t.json"}}))
    paths = {fmt: out / name for fmt, name in FILES.items()}
    for fmt, path in paths.items():
        r = ccds("select", "--pool", pool, "--out", path, "--format", fmt, "--count", N,
                 "--method", "random", "--seed", "3")
        assert r.returncode == 0, r.stderr
        assert f"selected {N} of 40" in r.stdout and sidecar_path(path).name in r.stdout
    return paths


def _rows(path: Path) -> list[dict]:
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_help_lists_the_formats(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # the choices on one line
    r = ccds("select", "--help")
    assert r.returncode == 0 and f"<{'|'.join(SUBSET_FORMATS)}>" in r.stdout


@pytest.mark.parametrize("fmt", sorted(COLUMNS))
def test_datasets_loads_each_format(subsets, fmt, tmp_path):
    import datasets

    ds = datasets.load_dataset("json", data_files=str(subsets[fmt]), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert set(ds.column_names) == COLUMNS[fmt] and len(ds) == N


@pytest.mark.parametrize("fmt", sorted(COLUMNS))
def test_schema_of_each_format(subsets, pool, fmt):
    """Each row is its stack's layout, holding the pool example of its id."""
    by_id = {e.id: e for e in load_examples(pool)}
    rows = _rows(subsets[fmt])
    assert len(rows) == N
    for row in rows:
        assert set(row) == COLUMNS[fmt]
        ex = by_id[row["id"]]
        assert row["source"] == ex.source
        if fmt == "messages":
            assert row["messages"] == [{"role": "user", "content": ex.prompt},
                                       {"role": "assistant", "content": ex.response}]
        elif fmt == "prompt-completion":
            assert (row["prompt"], row["completion"]) == (ex.prompt + "\n", ex.response)
        elif fmt == "alpaca":
            assert (row["instruction"], row["input"], row["output"]) == (ex.prompt, "",
                                                                         ex.response)
        else:
            assert row["conversations"] == [{"from": "human", "value": ex.prompt},
                                            {"from": "gpt", "value": ex.response}]


@pytest.mark.parametrize("fmt", ["messages", "alpaca", "sharegpt"])
def test_stack_formats_read_back_as_the_pool_examples(subsets, pool, fmt):
    """ccds reads its own subsets in the stacks' layouts (ccds analyze counts their tokens)."""
    by_id = {e.id: e for e in load_examples(pool)}
    for e in load_examples(subsets[fmt]):
        assert (e.prompt, e.response) == (by_id[e.id].prompt, by_id[e.id].response)


def test_ccds_format_reads_back(subsets, pool):
    side = json.loads(sidecar_path(subsets["ccds"]).read_text())
    assert [e.id for e in load_examples(subsets["ccds"])] == side["ids"]
    # a folder holding a subset and its sidecar still loads as a pool: the sidecar is not data
    folder = subsets["ccds"].parent / "as-pool"
    folder.mkdir()
    for p in (subsets["ccds"], sidecar_path(subsets["ccds"])):
        (folder / p.name).write_bytes(p.read_bytes())
    assert len(load_examples(folder)) == N


def test_llama_factory_dataset_info(subsets):
    """One entry per file, named after its stem, that maps LLaMA-Factory's fields onto the
    file's columns; an entry already there is kept."""
    info = json.loads((subsets["alpaca"].parent / "dataset_info.json").read_text())
    assert set(info) == {"theirs", "alpaca", "sharegpt"}
    alpaca, sharegpt = info["alpaca"], info["sharegpt"]
    assert alpaca == {"file_name": "alpaca.json", "formatting": "alpaca",
                      "columns": {"prompt": "instruction", "query": "input",
                                  "response": "output"}, "num_samples": N}
    assert sharegpt["file_name"] == "sharegpt.json" and sharegpt["formatting"] == "sharegpt"
    assert sharegpt["num_samples"] == N
    for entry in (alpaca, sharegpt):
        row = _rows(subsets[entry["formatting"]])[0]
        assert set(entry["columns"].values()) <= set(row)
    tags, turns = sharegpt["tags"], _rows(subsets["sharegpt"])[0]["conversations"]
    assert [t[tags["role_tag"]] for t in turns] == [tags["user_tag"], tags["assistant_tag"]]
    assert all(isinstance(t[tags["content_tag"]], str) for t in turns)


@pytest.mark.parametrize("fmt", SUBSET_FORMATS)
def test_sidecar_records_the_selection(subsets, pool, fmt):
    from ccds.score import get_method, run
    from ccds.score.base import examples_hash

    examples = load_examples(pool)
    side = json.loads(sidecar_path(subsets[fmt]).read_text())
    ids = ([e.id for e in load_examples(subsets[fmt])] if fmt == "ccds" else
           [r["id"] for r in _rows(subsets[fmt])])
    assert side["ids"] == ids and side["n"] == N
    assert side["format"] == fmt and side["file"] == subsets[fmt].name
    assert side["method"] == "random" and side["params"] == {"seed": 3}
    assert side["pool_hash"] == examples_hash(examples) and side["pool_size"] == 40
    assert side["budget"]["count"] == N
    scores = side["scores"]
    assert scores == sorted(scores, reverse=True)  # random ranks best first
    values = run(get_method("random", seed=3), examples, cache=None).values
    by_id = dict(zip([e.id for e in examples], values, strict=True))
    assert np.allclose(scores, [by_id[i] for i in side["ids"]])
    assert check_sidecar(subsets[fmt], side["pool_hash"]) == side


def test_mismatched_sidecar_is_one_line(subsets, pool, tmp_path):
    from ccds.score.base import examples_hash

    examples = load_examples(pool)
    path = subsets["messages"]
    with pytest.raises(CcdsError) as e:
        check_sidecar(path, examples_hash(examples[1:]))
    assert "another pool" in str(e.value) and str(sidecar_path(path)) in str(e.value)
    assert "\n" not in str(e.value)
    edited = tmp_path / path.name  # a subset edited after selection is refused too
    edited.write_text(path.read_text().replace('"user"', '"system"', 1))
    sidecar_path(edited).write_bytes(sidecar_path(path).read_bytes())
    with pytest.raises(CcdsError, match="changed after it was selected"):
        check_sidecar(sidecar_path(edited), examples_hash(examples))
    with pytest.raises(CcdsError, match="no selection sidecar"):
        check_sidecar(tmp_path / "none.jsonl", examples_hash(examples))


def test_bad_name_for_a_format_is_one_line_before_scoring(pool, tmp_path):
    # checked before the target loads (an unknown one would be the error otherwise)
    one_error_line(ccds("select", "--pool", pool, "--out", tmp_path / "s.parquet", "--format",
                        "alpaca", "--count", "2", "--method", "less", "--target", "nope"),
                   "alpaca subset is a .jsonl or .json file", "s.parquet")
    with pytest.raises(CcdsError, match="dataset_info.json"):
        write_subset([], tmp_path / "dataset_info.json", "sharegpt",
                     sidecar={"method": "m", "params": {}, "pool_hash": "h", "scores": []})


@pytest.mark.slow
def test_trl_sft_trains_on_the_messages_file(subsets, tmp_path):
    """TRL's SFTTrainer, the consumer of chat JSONL, trains a few steps on it with the
    embedded SmolLM2 (its chat template applied by the trainer)."""
    trl = pytest.importorskip("trl")
    import datasets

    from ccds.models import load_causal_lm

    model, tok, _ = load_causal_lm("smollm2-135m")  # its own copy: training changes it
    model.requires_grad_(True)
    ds = datasets.load_dataset("json", data_files=str(subsets["messages"]), split="train",
                               cache_dir=str(tmp_path / "hf"))
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3,
                         per_device_train_batch_size=2, learning_rate=1e-4, max_length=256,
                         logging_steps=1, save_strategy="no", report_to=[], bf16=False,
                         seed=0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert trainer.state.global_step == 3 and len(losses) == 3
    assert all(np.isfinite(losses))
