"""The package's shape: no import cycles, and docs/architecture.md names what exists."""

import ast
import importlib
import re
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "scaling"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """The scaling modules a file imports anywhere in it (inside functions too: a lazy import
    is still a dependency). `from scaling.x import y` counts scaling.x.y when that is a module."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                    for a in node.names}
    # Importing scaling.parallel.dims first runs scaling/parallel/__init__.py: a dependency too,
    # except from inside that package (Python is already running its __init__ then).
    me = module_name(path)
    out |= {m.rsplit(".", 1)[0] for m in out if m.count(".") > 1 and not me.startswith(m.rsplit(".", 1)[0])}
    return {m for m in out if m in MODULES and m != me}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        stack.pop()

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle({m: imports(p) for m, p in MODULES.items()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", list(MODULES))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_the_architecture_doc_names_every_module_and_only_modules_that_exist():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`(scaling/[\w/]+\.py)`", doc))
    files = {str(p.relative_to(ROOT)) for p in MODULES.values()}
    assert named - files == set(), "named in docs/architecture.md but missing"
    assert files - named == set(), "in scaling/ but not in docs/architecture.md"
