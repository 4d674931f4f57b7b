"""The import graph of sandpool: no circles, and every import points down the layers.

Parsed, not imported: every ``import`` that runs counts, at module level and inside functions
alike (a lazy import only hides a circle, it does not break it). The one allowed exception is
``LAZY_EDGES`` below, with its reason. Imports under ``if TYPE_CHECKING:`` do not count: they load
nothing and only name types for annotations (a mixin's ``self: Sandbox``, an actor's ``Session``).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

#: The layers, lowest first. A module may import its own package and anything in a lower layer;
#: packages that share a layer (the two servers) may not import each other. "base" is the top-level
#: private modules of sandpool (options, errors, quantities): shared by everything, importing nothing above.
LAYERS: list[tuple[str, ...]] = [
    ("base",),
    ("sandpool._core",),
    ("sandpool._images",),
    ("sandpool._isolation",),
    ("sandpool._grpc",),
    ("sandpool._runtime",),
    ("sandpool._functions",),
    ("sandpool._session",),
    ("sandpool._service", "sandpool._cwsandbox"),
    ("public",),  # sandpool/__init__, exceptions, testing: what users import
    ("sandpool._cli",),
    ("sandpool.__main__",),
]
PUBLIC = {"sandpool", "sandpool.exceptions", "sandpool.testing"}

#: Lazy imports that close a circle on purpose (importer, imported): why each must stay.
LAZY_EDGES = {
    # cwsandbox's public ``Sandbox(...)`` constructor (and Sandbox.run/list/from_id/delete/session),
    # called outside any session, needs the hidden default session; the session module builds
    # Sandboxes, so the sandbox module reaches the default sessions' module lazily (Sandbox._hidden).
    ("sandpool._session.sandbox", "sandpool._session.default"): "Sandbox() needs a default session",
}



def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    found = {}
    for path in sorted((ROOT / "sandpool").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = (path, is_package)
    return found


def _imports(name: str, path: pathlib.Path, is_package: bool, modules) -> set[tuple[str, int]]:
    """The sandpool modules ``name`` imports, each with the line of the import."""
    out = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                   for stmt in node.body for inner in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # ``import sandpool._x.y`` names the module itself
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add((target, node.lineno))
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _graph() -> dict[str, dict[str, int]]:
    modules = _modules()
    return {name: dict(sorted(_imports(name, path, pkg, modules))) for name, (path, pkg) in modules.items()}


def _layer(module: str) -> tuple[int, str]:
    """(rank, package) of a module."""
    if module in PUBLIC:
        package = "public"
    elif module.count(".") == 1 and module != "sandpool.__main__" and not _is_package_dir(module):
        package = "base"
    else:
        package = ".".join(module.split(".")[:2])
    for rank, names in enumerate(LAYERS):
        if package in names:
            return rank, package
    raise AssertionError(f"{module} is in no layer: add its package {package!r} to LAYERS in {__file__}")


def _is_package_dir(module: str) -> bool:
    return (ROOT / module.replace(".", "/")).is_dir()


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph.get(root, ())))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph.get(child, ()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _describe(component: list[str], graph) -> str:
    inside = set(component)
    edges = [f"  {a} -> {b} (line {line})" for a in component for b, line in graph[a].items() if b in inside]
    return "\n".join([" <-> ".join(component), *edges])


def test_no_import_circles():
    """No module imports, even lazily, a module that imports it back; except the documented edges."""
    graph = _graph()
    for importer, imported in LAZY_EDGES:
        graph.get(importer, {}).pop(imported, None)
    circles = _cycles(graph)
    assert not circles, "import circles (break them: move what both need into the lower module):\n" + \
        "\n".join(_describe(c, graph) for c in circles)


def test_imports_point_down_the_layers():
    """A module imports only its own package and the layers below it (see LAYERS)."""
    wrong = []
    for importer, targets in _graph().items():
        rank, package = _layer(importer)
        for imported, line in targets.items():
            their_rank, their_package = _layer(imported)
            if their_package == package:
                continue
            if their_rank >= rank:
                wrong.append(f"{importer} (line {line}) imports {imported}: {package} may not import {their_package}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


@pytest.mark.parametrize("module", ["sandpool._core.opref", "sandpool._grpc.messages"])
def test_the_checker_sees_imports(module):
    """The parser finds imports (a checker that saw none would pass anything)."""
    assert _graph()[module], f"no imports found in {module}"


def test_the_checker_finds_a_circle():
    """A made-up circle of three is reported whole."""
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert _cycles(graph) == [["a", "b", "c"]]
