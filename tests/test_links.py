"""Dataset and pool folders reached through symbolic links (usual on shared clusters) load,
and a link cycle does not make a loader loop (issue 20)."""

from __future__ import annotations

import json
from pathlib import Path

from ccds.data import sources as S
from ccds.data.formats import load_examples


def _task(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    examples = [{"input": f"{i}+1", "target": str(i + 1)} for i in range(n)]
    (folder / "task.json").write_text(json.dumps({"examples": examples}))


def test_bigbench_task_folders_may_be_links(tmp_path, monkeypatch):
    real = tmp_path / "real"
    _task(real / "add", 10)
    _task(real / "mc" / "sub", 4)
    bigbench = tmp_path / "data" / "bigbench"
    bigbench.mkdir(parents=True)
    (bigbench / "add").symlink_to(real / "add", target_is_directory=True)
    (bigbench / "mc").symlink_to(real / "mc", target_is_directory=True)
    (bigbench / "loop").symlink_to(bigbench, target_is_directory=True)  # cycles
    (real / "mc" / "sub" / "up").symlink_to(real / "mc", target_is_directory=True)
    monkeypatch.setenv("CCDS_DATA_DIR", str(tmp_path / "data"))

    assert S.bigbench_tasks() == ["add", "mc/sub"]
    target = S.load_target("bigbench:add")
    assert [e.id for e in target.val + target.test] == [f"bigbench/add/{i}" for i in range(10)]
    assert [e.source for e in S.load_source("bigbench:mc")] == ["bigbench/mc/sub"] * 4


def test_pool_folder_reads_linked_folders(tmp_path):
    pool, other = tmp_path / "pool", tmp_path / "other"
    pool.mkdir()
    other.mkdir()
    (pool / "a.jsonl").write_text(json.dumps({"prompt": "p", "response": "a"}) + "\n")
    (other / "b.jsonl").write_text(json.dumps({"prompt": "p", "response": "b"}) + "\n")
    (pool / ".hidden").symlink_to(other, target_is_directory=True)  # never data
    (pool / "more").symlink_to(other, target_is_directory=True)
    (pool / "self").symlink_to(pool, target_is_directory=True)  # a cycle
    assert [e.id for e in load_examples(pool)] == ["a-0", "b-0"]
