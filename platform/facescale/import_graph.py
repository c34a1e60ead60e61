"""The package's import graph, read from the source (``ast``), never by importing it.

Used by ``tests/test_architecture.py`` (no import cycle anywhere) and ``docs/gen_architecture.py`` (the picture in
``docs/architecture.md``), so the picture and the rule are the same graph. An edge ``a -> b`` is any ``import`` of
``b`` in ``a`` that runs: at module level or inside a function (an import hidden in a function to dodge a cycle is
still a cycle), but not under ``if TYPE_CHECKING:`` (annotations only, never executed).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "facescale"


def module_files(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every module under ``root/facescale`` (packages by their ``__init__``)."""
    mods = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _runtime_imports_of(child))
            continue
        yield from _runtime_imports_of(node)


def _runtime_imports_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    else:
        yield from _runtime_imports(node)


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, mods: dict[str, Path]) -> set[str]:
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif node.module != "__future__":
        base = node.module or ""
        if node.level:  # relative import
            parts = module.split(".") if is_package else module.split(".")[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join([*parts, base] if base else parts)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    found = set()
    for name in names:
        while name and name not in mods:  # ``facescale.data.storage.X`` -> the module that defines X
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules of this package it imports at run time}`` for the package under ``root``."""
    mods = module_files(root)
    graph: dict[str, set[str]] = {}
    for module, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = set()
        for node in _runtime_imports(tree):
            graph[module] |= _targets(module, path.name == "__init__.py", node, mods)
    return graph


def external_imports(root: Path) -> dict[str, set[str]]:
    """``{module: top-level names of other distributions it imports at run time}`` (``boto3``, ``ray``, ...)."""
    out: dict[str, set[str]] = {}
    for module, path in module_files(root).items():
        names: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif node.level == 0 and node.module and node.module != "__future__":
                names.add(node.module.split(".")[0])
        out[module] = names - {PACKAGE}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted; ``[]``: no cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def package_of(module: str) -> str:
    """The top-level sub-package a module belongs to (``facescale.train.loop`` -> ``train``); root modules by name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Module edges folded onto sub-packages (``train -> parallel``), self-edges dropped."""
    out: dict[str, set[str]] = {}
    for a, targets in graph.items():
        out.setdefault(package_of(a), set()).update(package_of(b) for b in targets if package_of(b) != package_of(a))
    return out
