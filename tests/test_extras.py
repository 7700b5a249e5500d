"""Optional parts say what to install: a command that needs an extra which is not installed
fails with one line naming `pip install 'ccds[extra]'` and exit 2, before any model work.
Each case hides the extra's modules (None in sys.modules makes their import fail) and runs
the CLI in-process on a tiny synthetic pool."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_cli import ccds, one_error_line

from ccds.errors import CcdsError, require

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def hide(monkeypatch, *names: str) -> None:
    """Make `import name` (and of any of its submodules) raise ImportError."""
    for name in names:
        for loaded in [m for m in sys.modules if m.startswith(f"{name}.")]:
            monkeypatch.setitem(sys.modules, loaded, None)
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture
def synth(tmp_path, monkeypatch):
    monkeypatch.setenv("CCDS_CACHE", str(tmp_path / "cache"))  # no cached scores to return
    r = ccds("data", "synth", "--out", tmp_path / "d", "--n-pool", "30", "--n-test", "5")
    assert r.returncode == 0, r.stderr
    return tmp_path / "d"


@pytest.mark.parametrize("hidden, extra, args", [
    (["ray"], "dist", ["--backend", "ray"]),
    (["sentence_transformers"], "embed", ["--method", "embed"]),
    (["faiss", "sklearn"], "s2l", ["--method", "s2l"]),
    (["faiss"], "s2l", ["--method", "s2l", "--param", "backend=faiss"]),
    (["sklearn"], "s2l", ["--method", "s2l", "--param", "backend=sklearn"]),
    (["faiss", "sklearn"], "s2l", ["--method", "cascade", "--param", "expensive=s2l"]),
], ids=["ray", "embed", "s2l", "s2l-faiss", "s2l-sklearn", "cascade-s2l"])
def test_a_missing_extra_is_one_line_naming_it(synth, tmp_path, monkeypatch, hidden, extra,
                                               args):
    hide(monkeypatch, *hidden)
    r = ccds("score", "--pool", synth / "pool.jsonl", "--target",
             synth / "targets" / "synth-arithmetic", "--out", tmp_path / "s.parquet", *args)
    one_error_line(r, "which is not installed", f"pip install 'ccds[{extra}]'")
    assert not (tmp_path / "s.parquet").exists()


@pytest.mark.parametrize("module, extra", [("trl", "stacks"), ("lm_eval", "stacks"),
                                           ("ray.data", "dist")])
def test_require_names_the_extra(monkeypatch, module, extra):
    hide(monkeypatch, module.split(".")[0])  # ray.data: its package is missing
    with pytest.raises(CcdsError) as e:
        require(module, extra, "the comparison")
    assert str(e.value) == (f"the comparison needs {module}, which is not "
                            f"installed — pip install 'ccds[{extra}]'")


def test_require_returns_the_module():
    assert require("json", "dev", "a test") is sys.modules["json"]


def test_every_extra_named_is_declared():
    """The lines above name extras that pyproject.toml really has, with the package."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    for extra, package in [("dist", "ray[data]"), ("embed", "sentence-transformers"),
                           ("s2l", "faiss-cpu"), ("s2l", "scikit-learn"), ("stacks", "trl"),
                           ("stacks", "lm-eval")]:
        assert any(d.startswith(package) for d in extras[extra]), (extra, package)
