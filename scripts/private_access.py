"""Count the places where one object reads or writes another's private members.

An access ``x._name`` counts when ``x`` is not ``self`` or ``cls`` (a module's private names
count too: ``other_module._helper``). ``python scripts/private_access.py [--list] [ROOT...]``
prints the total and, with --list, each place.
"""

from __future__ import annotations

import ast
import os
import sys


def accesses(path: str):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls", "sys", "os"):
                continue
            if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                continue
            yield node.lineno, ast.unparse(node)


def main(argv: list[str]) -> int:
    show = "--list" in argv
    roots = [a for a in argv if a != "--list"] or ["sandpool", "_sandpool_agent"]
    total = 0
    for root in roots:
        for folder, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    for line, text in accesses(path):
                        total += 1
                        if show:
                            print(f"{path}:{line}: {text}")
    print(total)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
