"""``sandpool volume create | ls | rm``: named local volumes (``sandpool._isolation.volumes``), which
sandboxes mount with ``RegisteredVolumeOptions(volume_id=NAME, ...)`` and which outlive them."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Subcommands


def register(sub: Subcommands) -> None:
    vol = sub.add_parser("volume", help="create, list or remove named local volumes",
                         description="A named volume is a directory of the volume store ($SANDPOOL_VOLUME_DIR) that "
                                     "sandboxes mount with RegisteredVolumeOptions(name=..., volume_id=NAME, "
                                     "mount_path=...); it outlives them.")
    vsub = vol.add_subparsers(dest="volume_command", required=True, metavar="ACTION")
    p = vsub.add_parser("create", help="make a named volume (no-op if it exists)")
    p.add_argument("name")
    p.set_defaults(run=cmd_create)
    p = vsub.add_parser("ls", help="list the named volumes")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(run=cmd_ls)
    p = vsub.add_parser("rm", help="remove named volumes and their files")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(run=cmd_rm)


def cmd_create(args: argparse.Namespace) -> int:
    from .._isolation import volumes

    print(volumes.create(args.name))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from .._isolation import volumes

    found = volumes.listing()
    if args.output == "json":
        print(json.dumps(found, indent=1))
        return 0
    print(f"{'NAME':<32} PATH")
    for v in found:
        print(f"{v['name']:<32} {v['path']}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from .._isolation import volumes

    code = 0
    for name in args.names:
        if volumes.remove(name):
            print(f"removed {name}")
        else:
            print(f"Error: no volume {name!r}; list them with 'sandpool volume ls'", file=sys.stderr)
            code = 1
    return code
