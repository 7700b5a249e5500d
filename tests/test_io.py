"""Atomic outputs: a folder replaced by `atomic_dir` is never missing or half-filled to a
reader, a killed writer leaves the old folder or the new one whole, and what a crash leaves
behind is removed by the next write without touching a write in progress."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ccds import io
from ccds.io import atomic_dir, atomic_path


def _write(path: Path, version: int) -> None:
    with atomic_dir(path) as tmp:
        for name in ("a", "b"):
            (tmp / name).write_text(str(version) * 1000)


def _read(path: Path) -> str | None:
    """Both files of the folder now at `path`, read through one handle on it (so a later
    swap cannot mix versions): their text, "torn", or None if there is no folder. A folder
    replaced (and being removed) while it is read is read again."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            got = []
            for name in ("a", "b"):
                f = os.open(name, os.O_RDONLY, dir_fd=fd)
                got.append(os.read(f, 1 << 16).decode())
                os.close(f)
            return got[0] if got[0] == got[1] and len(got[0]) == 1000 else "torn"
        except FileNotFoundError:
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    return "torn"  # still the folder at `path`, and a file is missing
        finally:
            os.close(fd)


def test_replaced_folder_is_never_missing(tmp_path, figure):
    path = tmp_path / "out"
    _write(path, 0)
    seen, stop = {"missing": 0, "torn": 0, "reads": 0, "error": None}, threading.Event()

    def reader():
        try:
            while not stop.is_set():
                got = _read(path)
                seen["reads"] += 1
                if got is None or got == "torn":
                    seen["missing" if got is None else "torn"] += 1
        except Exception as e:  # noqa: BLE001 (reported by the assertion below)
            seen["error"] = repr(e)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for version in range(1, 400):
            _write(path, version % 10)
    finally:
        stop.set()
        t.join()
    assert seen["reads"] > 100 and seen["error"] is None, seen
    assert seen["missing"] == seen["torn"] == 0, seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it
    figure("atomic_dir: reads during 399 folder replacements that found it missing", 0)


CHILD = """
import os, signal, sys
from pathlib import Path
from ccds import io
path, when = Path(sys.argv[1]), sys.argv[2]
if when == "after-swap":  # killed between the swap and removing the old folder
    io._remove = lambda p: os.kill(os.getpid(), signal.SIGKILL)
with io.atomic_dir(path) as tmp:
    (tmp / "a").write_text("new")
    if when == "mid-write":
        os.kill(os.getpid(), signal.SIGKILL)
    (tmp / "b").write_text("new")
"""


@pytest.mark.parametrize("when", ["mid-write", "after-swap"])
def test_killed_writer_leaves_a_whole_folder_and_the_next_write_cleans_up(tmp_path, when):
    path = tmp_path / "out"
    with atomic_dir(path) as tmp:
        (tmp / "a").write_text("old")
        (tmp / "b").write_text("old")
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), when])
    assert r.returncode == -signal.SIGKILL
    contents = {(path / n).read_text() for n in ("a", "b")}
    assert contents == ({"old"} if when == "mid-write" else {"new"})
    stale = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert len(stale) == 1 and stale[0].name.startswith(".out.") and stale[0].is_dir()

    with atomic_dir(path) as live:  # a write in progress is left alone by another's cleanup
        (live / "a").write_text("8" * 1000)
        _write(tmp_path / "out", 7)
        assert live.is_dir() and not stale[0].exists()
        (live / "b").write_text("8" * 1000)
    assert _read(path) == "8" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_without_the_swap_the_folder_is_still_replaced(tmp_path, monkeypatch):
    """The fallback for systems without RENAME_EXCHANGE: two renames."""
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    path = tmp_path / "out"
    for version in (1, 2):
        _write(path, version)
    assert _read(path) == "2" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_writes_are_fsynced_down_to_the_parent(tmp_path, monkeypatch):
    synced = []
    real = io._fsync
    monkeypatch.setattr(io, "_fsync", lambda p: (synced.append(Path(p).name), real(p)))
    with atomic_path(tmp_path / "f.txt") as tmp:
        tmp.write_text("x")
    assert synced[-1] == tmp_path.name  # the rename itself is made durable
    synced.clear()
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("x")
    assert {"sub", "x", tmp.name} <= set(synced) and synced[-1] == tmp_path.name
