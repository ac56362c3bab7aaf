"""The layers contract (docs/architecture.md): imports point one way, no module imports another in a cycle, and no
module grows past about 400 lines without saying why at its top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "milbench"

# Top to bottom; packages on one line are independent of each other. A module may import from its own package and
# from any layer below its own, never from a layer above or beside it.
LAYERS: list[tuple[str, ...]] = [
    ("cli",),
    ("report", "bench", "extract"),
    ("runs",),
    ("training",),
    ("accel", "config"),
    ("models", "tasks"),
    ("data", "survival"),
]
LEVEL = {pkg: i for i, row in enumerate(LAYERS) for pkg in row}
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every milbench module ``path`` imports, at the top or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("milbench")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("milbench"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists()}
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LEVEL) else None


def test_every_package_has_a_layer():
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == set(LEVEL), f"give every package a layer in LAYERS: {packages ^ set(LEVEL)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m)))
def test_imports_point_down(module):
    mine = _layer(module)
    wrong = [m for m in GRAPH[module] if _layer(m) and _layer(m) != mine and LEVEL[_layer(m)] <= LEVEL[mine]]
    assert not wrong, f"{module} (layer {mine}) imports {wrong}: a layer beside or above its own"


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_data_knows_nothing_of_tasks_or_models():
    offenders = {m: sorted(i for i in GRAPH[m] if _layer(i) in ("tasks", "models"))
                 for m in MODULES if _layer(m) == "data"}
    assert not any(offenders.values()), offenders


@pytest.mark.parametrize("module", sorted(MODULES))
def test_long_modules_say_why(module):
    text = MODULES[module].read_text()
    if len(text.splitlines()) > MAX_LINES:
        assert "Longer than" in ast.get_docstring(ast.parse(text)) or "", (
            f"{module} has {len(text.splitlines())} lines: split it, or say at its top why it is one module "
            f"('Longer than {MAX_LINES} lines because ...')")


def test_the_test_suite_mirrors_the_package():
    tests = Path(__file__).resolve().parent
    missing = [pkg for pkg in LEVEL if not (tests / pkg).is_dir()]
    assert not missing, f"tests/ has no folder for {missing}"
