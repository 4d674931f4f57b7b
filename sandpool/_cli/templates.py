"""``sandpool templates save | ls | rm``: named sandbox specs (``sandpool._templates``), which
``session.sandbox(template_id=NAME)`` and ``Sandbox.run_from_template(NAME)`` start."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Subcommands


def register(sub: Subcommands) -> None:
    tpl = sub.add_parser("templates", help="save, list or remove named sandbox templates",
                         description="A template is a named sandbox spec stored on this machine ($SANDPOOL_TEMPLATE_DIR); "
                                     "start one with session.sandbox(template_id=NAME) or Sandbox.run_from_template(NAME).")
    tsub = tpl.add_subparsers(dest="templates_command", required=True, metavar="ACTION")
    p = tsub.add_parser("save", help="store a compose-style file (or a JSON file of sandbox options) as a template")
    p.add_argument("name")
    p.add_argument("file", help="a compose-style file (services:), or a JSON object of sandbox options")
    p.add_argument("--primary-service", help="the compose service that is the primary container")
    p.set_defaults(run=cmd_save)
    p = tsub.add_parser("ls", help="list the templates")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(run=cmd_ls)
    p = tsub.add_parser("rm", help="remove templates")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(run=cmd_rm)


def cmd_save(args: argparse.Namespace) -> int:
    from .. import _compose, _templates
    from .._config import resolve_spec

    data, source = _compose.read(args.file)
    doc = _compose.parse(data, source)
    if "services" in doc:
        if not args.primary_service:
            raise ValueError(f"{source} has services: name the primary one with --primary-service "
                             f"(one of {', '.join(doc['services'] or ())})")
        options = {"containers": _compose.containers(doc, source, args.primary_service)}
    else:
        options = doc
    print(_templates.save(args.name, options, resolve_spec))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from .. import _templates

    found = _templates.listing()
    if args.output == "json":
        print(json.dumps(found, indent=1))
        return 0
    print(f"{'NAME':<32} CONTAINERS")
    for t in found:
        print(f"{t['name']:<32} {','.join(t['containers']) or '-'}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from .. import _templates

    code = 0
    for name in args.names:
        if _templates.remove(name):
            print(f"removed {name}")
        else:
            print(f"Error: no template {name!r}; list them with 'sandpool templates ls'", file=sys.stderr)
            code = 1
    return code
