"""No import cycles between the modules of ``cpm_infer``, ``export`` and ``trainer``.

Read statically (``ast``, nothing is imported): every ``import`` and ``from ... import`` of a module,
at module level and inside functions alike (an import moved into a function hides a cycle from the
interpreter, not from this graph), relative ones resolved. Imports under ``if TYPE_CHECKING:`` never
run and are not counted.

Edges: ``import a.b.c`` and ``from a.b import c`` (``c`` a submodule) depend on ``a.b.c`` only; the
interpreter runs ``a/__init__`` and ``a/b/__init__`` on the way, but counting those would put every
package that re-exports one of its submodules on a cycle with it. ``from a.b import name`` (``name``
not a submodule) depends on ``a.b`` itself: its ``__init__`` defines the name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cpm_infer", "export", "trainer")


def find_modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``packages`` below ``root``."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if all((root.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
                modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement below ``node``, at any depth, except in ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _import_nodes(ast.Module(body=[other], type_ignores=[]))
        else:
            yield from _import_nodes(child)


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` import reads from (``from .x import y`` in ``a.b`` -> ``a.x``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` (source at ``path``) imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        source = _absolute(module, is_package, node)
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            found.add(submodule if submodule in known else source)
    return (found & known) - {module}


def import_graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    modules = find_modules(root, packages)
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def tangles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module: the modules on import cycles (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per tangle, a shortest one through its first module."""
    return sorted(_cycle_through(graph, component) for component in tangles(graph))


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    chain = [node]
                    while chain[-1] != start:
                        chain.append(parents[chain[-1]])
                    return [*reversed(chain), start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert {"cpm_infer.cli.app", "export.onnx_export", "trainer.loop"} <= set(graph)
    lines = []
    for component in sorted(tangles(graph), key=min):
        cycle = _cycle_through(graph, component)
        rest = sorted(component - set(cycle))
        lines.append(" -> ".join(cycle) + (f" (also tangled with it: {', '.join(rest)})" if rest else ""))
    assert not lines, "import cycles (one per set of modules that import each other):\n" + "\n".join(lines)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_graph_resolves_every_import_form(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.sub import thing\n",
            "pkg/a.py": "import pkg.sub.deep\nfrom . import b\nfrom .sub import thing\n",
            "pkg/b.py": "def f():\n    from .c import name\n",
            "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\nimport os\n",
            "pkg/sub/__init__.py": "from .deep import thing\n",
            "pkg/sub/deep.py": "from .. import c\nfrom ..c import name as other\n",
        },
    )
    graph = import_graph(tmp_path, ["pkg"])
    assert graph == {
        "pkg": {"pkg.sub"},
        "pkg.a": {"pkg.sub.deep", "pkg.b", "pkg.sub"},
        "pkg.b": {"pkg.c"},
        "pkg.c": set(),
        "pkg.sub": {"pkg.sub.deep"},
        "pkg.sub.deep": {"pkg.c"},
    }
    assert find_cycles(graph) == []


def test_cycles_are_reported_with_their_path(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import x\n",
            "pkg/b.py": "def f():\n    import pkg.c\n",
            "pkg/c.py": "from . import a\n",
            "pkg/d.py": "from pkg import e\n",
            "pkg/e.py": "import pkg.d\n",
        },
    )
    assert find_cycles(import_graph(tmp_path, ["pkg"])) == [
        ["pkg.a", "pkg.b", "pkg.c", "pkg.a"],
        ["pkg.d", "pkg.e", "pkg.d"],
    ]


@pytest.mark.parametrize(
    "module, is_package, level, source, expected",
    [
        ("pkg.sub", True, 1, "x", "pkg.sub.x"),  # in pkg/sub/__init__.py
        ("pkg.sub", True, 1, None, "pkg.sub"),
        ("pkg.sub", True, 2, None, "pkg"),
        ("pkg.sub.m", False, 1, "x", "pkg.sub.x"),
        ("pkg.sub.m", False, 2, "x", "pkg.x"),
        ("pkg.sub.m", False, 0, "other.x", "other.x"),
    ],
)
def test_relative_imports_resolve(module: str, is_package: bool, level: int, source: str | None, expected: str) -> None:
    node = ast.ImportFrom(module=source, names=[ast.alias("y")], level=level)
    assert _absolute(module, is_package, node) == expected
