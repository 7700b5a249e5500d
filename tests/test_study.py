"""The committed study (issue 7): its report and RESULTS.md are what the committed run store
gives, so no figure in them can have been edited by hand."""

import importlib.util
import json
from pathlib import Path

from ccds.analyse.runs import analyze
from ccds.sweep import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_study_config_is_the_full_design():
    cfg = load_config(ROOT / "experiments" / "study.yaml")
    assert {m.name for m in cfg.methods} == {"random", "bm25", "embed", "ppl", "less", "s2l",
                                             "cascade"}
    assert cfg.fractions == [0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
    assert cfg.targets == ["mmlu", "bbh", "gsm8k"]
    assert len(next(m for m in cfg.methods if m.name == "random").seeds) >= 2


def rounded(x):
    """Six significant digits: another CPU's BLAS may move a fit's last bits, not its result."""
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    return [rounded(v) for v in x] if isinstance(x, list) else x


def test_committed_report_and_results_regenerate_from_the_run_store(tmp_path, monkeypatch):
    analyze(ROOT / "study", tmp_path, bootstrap=200)
    committed = ROOT / "study" / "report"
    assert rounded(json.loads((tmp_path / "fits.json").read_text())) == \
        rounded(json.loads((committed / "fits.json").read_text()))
    assert (tmp_path / "runs.csv").read_text() == (committed / "runs.csv").read_text()
    assert len((committed / "runs.csv").read_text().splitlines()) == 144 + 1
    spec = importlib.util.spec_from_file_location("results", ROOT / "experiments" / "results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    monkeypatch.chdir(ROOT)  # the command line RESULTS.md names is relative to the repository
    results.main(["study/report", "--out", str(tmp_path / "RESULTS.md")])
    assert (tmp_path / "RESULTS.md").read_text() == \
        (ROOT / "experiments" / "RESULTS.md").read_text()
