"""``sandpool templates save | ls | rm``: named sandbox specs (``sandpool._templates``), which
``session.sandbox(template_id=NAME)`` and ``Sandbox.run_from_template(NAME)`` start."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .stores import add_ls_rm, remove_each, show

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
    add_ls_rm(tsub, "list the templates", "remove templates", cmd_ls, cmd_rm)


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

    return show(_templates.listing(), args.output, f"{'NAME':<32} CONTAINERS",
                lambda t: f"{t['name']:<32} {','.join(t['containers']) or '-'}")


def cmd_rm(args: argparse.Namespace) -> int:
    from .. import _templates

    return remove_each(args.names, _templates.remove, "template", "sandpool templates ls")
