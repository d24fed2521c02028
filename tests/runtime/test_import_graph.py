"""The runtime's modules import each other one way only: no import cycle in libs/runtime.

The graph is drawn from the source (ast), with every import counted: at module level, inside
functions (deferred imports) and under ``if TYPE_CHECKING:``, since each is a dependency a
reader has to follow. A cycle fails the test, naming its modules in order.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "libs" / "runtime" / "src" / "lotse_runtime"
PACKAGE = RUNTIME.name


def _modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name → file, for every module of the package."""
    found: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module that ``name`` (a module, or an attribute of one) lives in."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module → the package's modules it imports (anywhere in the file)."""
    modules = _modules(package_dir)
    package = package_dir.name
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets: set[str | None] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(
                    _owner(alias.name, modules)
                    for alias in node.names
                    if alias.name.split(".")[0] == package
                )
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                if source.split(".")[0] != package:
                    continue
                for alias in node.names:
                    # `from pkg import submodule` depends on the submodule itself.
                    full = f"{source}.{alias.name}"
                    targets.add(full if full in modules else _owner(source, modules))
        # A submodule's import of its own package (`from pkg.migrations import x` inside
        # pkg.migrations.env) is no edge back to itself; the package root is empty.
        graph[module] = {t for t in targets if t is not None and t not in (module, package)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_runtime_has_no_import_cycle() -> None:
    graph = import_graph(RUNTIME)
    assert {"lotse_runtime.app", "lotse_runtime.db"} <= set(graph), "graph not drawn"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in libs/runtime: " + " → ".join(cycle or [])


def test_the_cycle_finder_names_a_cycle() -> None:
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert find_cycle(graph) == ["p.a", "p.b", "p.c", "p.a"]
    assert find_cycle({"p.a": {"p.b"}, "p.b": set()}) is None


def test_deferred_and_type_checking_imports_count(tmp_path: Path) -> None:
    package = tmp_path / "probe_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from probe_pkg.b import B\n"
    )
    (package / "b.py").write_text("def f():\n    from . import a\n")
    graph = import_graph(package)
    assert graph["probe_pkg.a"] == {"probe_pkg.b"}
    assert graph["probe_pkg.b"] == {"probe_pkg.a"}
    assert find_cycle(graph) == ["probe_pkg.a", "probe_pkg.b", "probe_pkg.a"]


def test_the_runtime_does_not_import_the_tooling() -> None:
    """The tooling (libs/tooling) builds on the runtime, never the reverse."""
    for path in RUNTIME.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] == "lotse_tooling" for n in names), path
