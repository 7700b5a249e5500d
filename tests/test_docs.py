"""The docs cite tests by name; a renamed or deleted test must not leave a page pointing at
nothing."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_every_test_the_reliability_page_cites_exists():
    page = (ROOT / "docs" / "reliability.md").read_text()
    defined = {m for f in (ROOT / "tests").glob("test_*.py")
               for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    files = {f.name for f in (ROOT / "tests").glob("test_*.py")}
    cited = set(re.findall(r"\b(test_\w+)\b(?!\.py)", page)) - {n[:-3] for n in files}
    assert cited, "no test names found on the page"
    assert cited <= defined, sorted(cited - defined)
    assert set(re.findall(r"tests/(test_\w+\.py)", page)) <= files
