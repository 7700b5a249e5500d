"""Untrusted files and names: no pickle is loaded from user data, no remote code runs unless
asked, configs are parsed safely, and names taken from data cannot leave the output folder."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ccds.io import safe_name

SRC = Path(__file__).resolve().parents[1] / "src" / "ccds"
UNSAFE = {
    r"\bpickle\.loads?\(": "pickle",
    r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)": "torch.load without weights_only=True",
    r"allow_pickle\s*=\s*True": "np.load with allow_pickle",
    r"trust_remote_code\s*=\s*True": "trust_remote_code on by default",
    r"\byaml\.(?:load|unsafe_load)\(": "yaml.load (use yaml.safe_load)",
    r"(?<![.\w])(?:eval|exec)\(": "eval/exec",
}


def test_no_unsafe_deserialisation_in_the_source():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, what in UNSAFE.items():
                if re.search(pattern, line):
                    found.append(f"{path.relative_to(SRC)}:{n}: {what}")
    assert not found, "\n".join(found)


def test_the_scanner_catches_what_it_looks_for():
    bad = ["x = pickle.load(f)", "torch.load(p)", "np.load(p, allow_pickle=True)",
           "AutoModel.from_pretrained(p, trust_remote_code=True)", "yaml.load(s)", "eval(s)"]
    assert not any(re.search(p, "model.eval()") for p in UNSAFE)
    for line in bad:
        assert any(re.search(p, line) for p in UNSAFE), line
    assert not any(re.search(p, "torch.load(p, weights_only=True)") for p in UNSAFE)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=40))
def test_names_from_data_stay_inside_the_output_folder(tmp_path_factory, name):
    out = tmp_path_factory.getbasetemp() / "out"
    stem = safe_name(name)
    path = (out / f"{stem}-frontier.png").resolve()
    assert path.parent == out.resolve()
    assert stem and not stem.startswith(".") and "/" not in stem and "\\" not in stem


def test_report_of_a_hostile_target_name_is_written_inside(tmp_path):
    for name in ("../../escape", "/etc/passwd", "..", "a/../../b", "C:\\x"):
        stem = safe_name(f"{name}-smollm2")
        assert (tmp_path / stem).resolve().parent == tmp_path.resolve()
