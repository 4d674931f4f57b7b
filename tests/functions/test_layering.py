"""The functions layer sits below the session: none of its modules imports the session (or any
layer above it) when it runs; only type annotations may name them (under ``TYPE_CHECKING``)."""

from __future__ import annotations

import ast
import os

import sandpool._functions

FUNCTIONS = os.path.dirname(sandpool._functions.__file__)
ABOVE = ("_session", "_service", "_cli", "_cwsandbox")


def _runtime_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) of each import that runs: everywhere but in ``if TYPE_CHECKING:`` blocks."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_no_functions_module_imports_a_layer_above_it_at_run_time():
    """Every import of sandpool/_functions that runs names neither the session nor a layer above."""
    offending, checked = [], 0
    for name in sorted(os.listdir(FUNCTIONS)):
        if name.endswith(".py"):
            path = os.path.join(FUNCTIONS, name)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for line, module in _runtime_imports(tree):
                checked += 1
                if any(part in ABOVE for part in module.replace("..", ".").split(".")):
                    offending.append(f"{name}:{line}: {module}")
    assert checked > 20  # the walk saw the imports
    assert offending == []


def test_the_check_sees_an_upward_import():
    """The walk finds a runtime import of the session, and skips one under TYPE_CHECKING."""
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .._session import a\n"
                     "def f():\n    from .._session.session import Session\n")
    assert [m for _, m in _runtime_imports(tree)] == ["typing", ".._session.session"]
