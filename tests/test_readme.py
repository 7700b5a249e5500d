"""The README's Python examples import what exists (a renamed module broke one unnoticed)."""
import importlib
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_imports_resolve():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    imports = [m.groups() for b in blocks
               for m in re.finditer(r"^from (ccds[\w.]*) import ([\w, ]+)$", b, flags=re.M)]
    assert imports, "no `from ccds... import` line in the README's python blocks"
    for module, names in imports:
        mod = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(mod, name), f"README: `from {module} import {name}` fails"
