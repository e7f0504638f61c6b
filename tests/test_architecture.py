"""Specification of the import arrows: the core at the bottom, the reference on the core only, test
helpers under ``tests/`` and no circles.

Every module under ``harness/``, ``references/`` and ``ports/`` is read with :mod:`ast`; every
``import`` counts, top-level or inside a function (a lazy import is still a dependency).  The one
exception is an ``if __name__ == "__main__":`` block: it runs as the module ``__main__`` (a
separate module object), so an entry point may wire in what sits above it.  Importing ``a.b.c``
also imports the packages ``a`` and ``a.b``, so those count too.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "references", "ports")
# Third-party packages that only test code may import.
TEST_ONLY = ("pytest", "_pytest")


@dataclass(frozen=True)
class Import:
    """One imported module name, as written, and where."""

    target: str
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the three packages, by dotted name."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_main_guard(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and any(
            isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators
        )
    )


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node`` except the bodies of ``if __name__ == "__main__":``."""
    for child in ast.iter_child_nodes(node):
        if _is_main_guard(child):
            continue
        yield child
        yield from _walk(child)


def imports_of(name: str, path: Path, known: Mapping[str, Path]) -> list[Import]:
    """Modules ``name`` imports, relative imports resolved; ``from p import m`` names module
    ``p.m`` when that is a module of ours."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[Import] = []
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append(Import(sub if sub in known else source, node.lineno))
    return found


def _ours(target: str, known: Mapping[str, Path]) -> str | None:
    """The module of ours that ``target`` names (a name inside a module: that module)."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(known: Mapping[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {module of ours it imports (with the packages above it): first line}."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        edges: dict[str, int] = {}
        own = set(_ancestors(name))  # already being imported when ``name`` runs
        for imp in imports_of(name, path, known):
            target = _ours(imp.target, known)
            if target is None:
                continue
            for t in [*_ancestors(target), target]:
                if t != name and t not in own and t in known:
                    edges.setdefault(t, imp.line)
        graph[name] = edges
    return graph


def cycles(graph: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def describe_cycle(graph: Mapping[str, Mapping[str, int]], members: list[str]) -> str:
    """The arrows inside one cycle, ``a -> b (line n)``, for the failure message."""
    arrows = [
        f"  {a} -> {b} (line {graph[a][b]})" for a in members for b in members if b in graph[a]
    ]
    return f"cycle of {len(members)} modules:\n" + "\n".join(arrows)


def wrong_arrows(
    graph: Mapping[str, Mapping[str, int]], source_prefix: str, allowed: tuple[str, ...]
) -> list[str]:
    """Arrows from modules under ``source_prefix`` to modules outside ``allowed`` prefixes."""

    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    def fine(target: str) -> bool:  # an allowed module, or a package that holds one
        return any(under(target, p) or under(p, target) for p in allowed)

    return [
        f"{a} -> {b} (line {line})"
        for a, edges in sorted(graph.items())
        if under(a, source_prefix)
        for b, line in sorted(edges.items())
        if not fine(b)
    ]


@pytest.fixture(scope="module")
def known() -> dict[str, Path]:
    return modules()


@pytest.fixture(scope="module")
def graph(known: dict[str, Path]) -> dict[str, dict[str, int]]:
    return import_graph(known)


# ---- the rules ----


def test_the_core_imports_nothing_of_the_harness_above_it(graph) -> None:
    bad = wrong_arrows(graph, "harness.core", ("harness.core",))
    assert not bad, "harness.core must import only itself (and stdlib/numpy/pandas):\n" + "\n".join(
        bad
    )


def _top_level_imports(path: Path) -> set[str]:
    """Top-level package names imported at module level (not inside functions or classes)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_core_uses_only_the_standard_library_numpy_and_pandas(known) -> None:
    """At import time; inside a function the core may reach for an optional package
    (``rich`` draws the live progress bar on a terminal)."""
    allowed = {"numpy", "pandas", "harness"} | set(sys.stdlib_module_names)
    optional = {"rich"}
    bad = sorted(
        {
            f"{name} imports {imp.target.split('.')[0]} (line {imp.line})"
            for name, path in known.items()
            if name.startswith("harness.core")
            for imp in imports_of(name, path, known)
            if imp.target.split(".")[0] not in allowed | optional
        }
        | {
            f"{name} imports {top} at module level"
            for name, path in known.items()
            if name.startswith("harness.core")
            for top in _top_level_imports(path) - allowed
        }
    )
    assert not bad, "\n".join(bad)


def test_the_reference_depends_only_on_itself_and_the_core(graph) -> None:
    bad = wrong_arrows(graph, "references", ("references", "harness.core"))
    assert not bad, "references may import only references.* and harness.core.*:\n" + "\n".join(bad)


def test_only_the_pytest_plugin_imports_pytest(known) -> None:
    bad = [
        f"{name} imports {imp.target} (line {imp.line}): test helpers belong under tests/"
        for name, path in known.items()
        if not name.startswith("harness.pytest_plugin")
        for imp in imports_of(name, path, known)
        if imp.target.split(".")[0] in TEST_ONLY
    ]
    assert not bad, "\n".join(bad)


def test_the_import_graph_has_no_cycles(graph) -> None:
    found = cycles(graph)
    assert not found, "\n\n".join(describe_cycle(graph, c) for c in found)


def test_every_module_was_read(known, graph) -> None:
    """The rules above saw the tree: the packages, their subpackages and some real arrows."""
    assert {"harness.core.capture_points", "references.model", "ports.llamacpp.port"} <= set(known)
    assert "harness.core.capture_points" in graph["harness.checks.compare"]


# ---- the detectors can fail (mutation checks on synthetic trees) ----


def _write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {
        ".".join(Path(rel).with_suffix("").parts).removesuffix(".__init__"): root / rel
        for rel in files
    }


def test_a_circle_hidden_in_a_function_is_found_with_its_members(tmp_path) -> None:
    known = _write(
        tmp_path,
        {
            "harness/__init__.py": "",
            "harness/a.py": "from harness.b import x\n",
            "harness/b.py": "def f():\n    from harness import c\n",
            "harness/c.py": "from . import a\n",
            "harness/d.py": "import harness.a\n",
        },
    )
    graph = import_graph(known)
    found = cycles(graph)
    assert found == [["harness.a", "harness.b", "harness.c"]]
    message = describe_cycle(graph, found[0])
    assert "harness.b -> harness.c (line 2)" in message


def test_an_arrow_out_of_the_core_is_found() -> None:
    graph = {
        "harness.core.x": {"harness.core.y": 1, "harness.checks.compare": 3},
        "harness.core.y": {},
        "references.model": {"harness": 1, "harness.core.x": 1, "harness.backends.base": 7},
    }
    assert wrong_arrows(graph, "harness.core", ("harness.core",)) == [
        "harness.core.x -> harness.checks.compare (line 3)"
    ]
    assert wrong_arrows(graph, "references", ("references", "harness.core")) == [
        "references.model -> harness.backends.base (line 7)"
    ]


def test_a_main_block_is_an_entry_point_not_an_arrow(tmp_path) -> None:
    known = _write(
        tmp_path,
        {
            "harness/__init__.py": "",
            "harness/tool.py": 'import os\nif __name__ == "__main__":\n    import harness.cli\n',
            "harness/cli.py": "import harness.tool\n",
        },
    )
    assert [i.target for i in imports_of("harness.tool", known["harness.tool"], known)] == ["os"]
