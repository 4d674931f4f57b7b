"""What the commands over a local store (``templates``, ``volume``, ``snapshots``) share: listing
as a table or JSON, and removing names one by one."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import Any


def show(found: list[dict[str, Any]], output: str, header: str, row: Callable[[dict[str, Any]], str]) -> int:
    """Print ``found`` as JSON (``output == "json"``) or as ``header`` and one ``row`` each; 0."""
    if output == "json":
        print(json.dumps(found, indent=1))
        return 0
    print(header)
    for item in found:
        print(row(item))
    return 0


def remove_each(names: Iterable[str], remove: Callable[[str], bool], noun: str, ls_command: str) -> int:
    """``remove(name)`` each name, saying so; 1 if any was not there (said on stderr), else 0."""
    code = 0
    for name in names:
        if remove(name):
            print(f"removed {name}")
        else:
            print(f"Error: no {noun} {name!r}; list them with '{ls_command}'", file=sys.stderr)
            code = 1
    return code


def add_ls_rm(actions: Any, ls_help: str, rm_help: str, ls: Callable[..., int], rm: Callable[..., int]) -> None:
    """The ``ls [-o table|json]`` and ``rm NAME...`` actions of a store's command."""
    p = actions.add_parser("ls", help=ls_help)
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(run=ls)
    p = actions.add_parser("rm", help=rm_help)
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(run=rm)
