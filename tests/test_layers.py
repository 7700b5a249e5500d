"""The layering of docs/architecture.md, checked on the source: every import in src/ccds
(at module level and inside functions; `if TYPE_CHECKING:` blocks never run and are left
out) points to a module in the same layer or one below, there is no import cycle, and the
library never loads the command line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first; a module may import from its own layer or any layer below.
LAYERS = {
    "core": ["ccds", "ccds.errors", "ccds.io", "ccds.data.types"],
    "compute": ["ccds.flops", "ccds.tokenize"],
    "data": ["ccds.data", "ccds.data.formats", "ccds.data.sources", "ccds.data.pool",
             "ccds.data.synth", "ccds.data.composition"],
    "models": ["ccds.models", "ccds.lm", "ccds.decoder"],
    "stages": ["ccds.train", "ccds.evaluate", "ccds.select"],
    "selection": ["ccds.score", "ccds.score.*"],
    "results": ["ccds.store", "ccds.analyse", "ccds.analyse.*", "ccds.plan", "ccds.decide",
                "ccds.price"],
    "orchestration": ["ccds.sweep", "ccds.demo", "ccds.spend"],
    "interface": ["ccds.cli", "ccds.__main__"],
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in (SRC / "ccds").rglob("*.py"):
        parts = f.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node, less the bodies of `if TYPE_CHECKING:`."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
            else:
                todo.append(child)


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The ccds modules `name` imports (a package's names resolved to its submodules)."""
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module
                                                                  else [])) \
                if node.level else node.module
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                         for a in node.names)
    return {m for m in found if m in mods and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _layer(module: str) -> int:
    for i, members in enumerate(LAYERS.values()):
        for m in members:
            if module == m or (m.endswith(".*") and module.startswith(m[:-1])):
                return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def test_every_import_points_down_or_sideways():
    up = [f"{a} ({list(LAYERS)[_layer(a)]}) imports {b} ({list(LAYERS)[_layer(b)]})"
          for a, deps in _graph().items() for b in deps if _layer(b) > _layer(a)]
    assert not up, "\n".join(sorted(up))


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, str] = {}
    found: list[str] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                found.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_imports_inside_functions_and_finds_cycles(tmp_path):
    """The tests above would pass on nothing: show they see what they must."""
    pkg = tmp_path / "ccds"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nfrom . import a\n"
                              "if TYPE_CHECKING:\n    from .c import h\n")
    (pkg / "c.py").write_text("")
    mods = {"ccds": pkg / "__init__.py", "ccds.a": pkg / "a.py", "ccds.b": pkg / "b.py",
            "ccds.c": pkg / "c.py"}
    graph = {m: _imports(m, f, mods) for m, f in mods.items()}
    assert graph["ccds.a"] == {"ccds.b"} and graph["ccds.b"] == {"ccds.a"}
    assert _cycles(graph) == ["ccds.a -> ccds.b -> ccds.a"]


def test_every_module_has_a_layer():
    for m in _modules():
        _layer(m)


def test_library_does_not_load_the_cli():
    stages = ["ccds.data.sources", "ccds.score", "ccds.select", "ccds.train",
              "ccds.evaluate", "ccds.store", "ccds.analyse.runs", "ccds.plan", "ccds.price",
              "ccds.sweep", "ccds.demo"]
    code = (f"import sys\nfor m in {stages!r}: __import__(m)\n"
            "print(sorted(m for m in sys.modules if m == 'typer' or m.startswith('typer.') "
            "or m == 'ccds.cli'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout


def test_docs_table_matches_the_layers():
    """docs/architecture.md's table names, in each layer's row, that layer's modules."""
    doc = (SRC.parent / "docs" / "architecture.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in doc.splitlines()
            if line.startswith("| ") and line.count("|") >= 4}
    missing = []
    for layer, members in LAYERS.items():
        for m in members:
            if m in ("ccds", "ccds.data", "ccds.analyse", "ccds.score"):
                continue  # packages
            path = m.removeprefix("ccds.").replace(".", "/")
            path = path[:-1] if path.endswith("*") else path + ".py"
            if f"`{path}" not in rows.get(layer, ""):
                missing.append(f"{layer}: {path}")
    assert not missing, missing
