"""The package's import graph: no cycles, and the layers import only downwards.

Built with ``ast`` from the source (nothing is imported): module-level imports and
imports inside functions both count (a function-level import that closes a loop is still a
cycle), ``if TYPE_CHECKING:`` blocks do not (they never run).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "nodeprov"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nodes(nodes: list[ast.stmt], typing_only: bool) -> Iterator[ast.AST]:
    """Every node under ``nodes``; ``if TYPE_CHECKING:`` bodies only when ``typing_only``."""
    for node in nodes:
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not typing_only:
            yield from _nodes(node.orelse, typing_only)
            continue
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                yield from _nodes([child], typing_only)
            else:
                yield from ast.walk(child)


def _imports(path: Path, modules: set[str], typing_only: bool) -> set[str]:
    """The package modules ``path`` imports (at run time, or also for the type checker)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _nodes(ast.parse(path.read_text()).body, typing_only):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` depends on pkg.mod; `from mod import name` on mod.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            # `import a.b.c` runs a, a.b and a.b.c; the nearest package module is the edge.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph(*, typing_only: bool = False) -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules, typing_only) for p in paths}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
    return found


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_package_has_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_no_import_cycles_even_through_type_checking_imports() -> None:
    """A cycle hidden behind ``if TYPE_CHECKING:`` is still two modules that need each other."""
    assert _cycles(_graph(typing_only=True)) == []


def test_core_imports_no_channel_daemon_or_cli() -> None:
    forbidden = ("nodeprov.http", "nodeprov.nostr", "nodeprov.daemon", "nodeprov.cli")
    bad = {
        module: sorted(t for t in targets if any(_in(t, f) for f in forbidden))
        for module, targets in _graph().items()
        if _in(module, "nodeprov.core")
    }
    assert {m: t for m, t in bad.items() if t} == {}


def test_channels_import_neither_daemon_nor_cli() -> None:
    forbidden = ("nodeprov.daemon", "nodeprov.cli")
    bad = {
        module: sorted(t for t in targets if any(_in(t, f) for f in forbidden))
        for module, targets in _graph().items()
        if _in(module, "nodeprov.http") or _in(module, "nodeprov.nostr")
    }
    assert {m: t for m, t in bad.items() if t} == {}


def test_graph_sees_a_known_edge() -> None:
    """Guards the checker itself: an import it must see is seen."""
    assert "nodeprov.core.ledger" in _graph()["nodeprov.core.payments"]
