"""``sandpool volume create | ls | rm``: named local volumes (``sandpool._isolation.volumes``), which
sandboxes mount with ``RegisteredVolumeOptions(volume_id=NAME, ...)`` and which outlive them."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .stores import add_ls_rm, remove_each, show

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
    add_ls_rm(vsub, "list the named volumes", "remove named volumes and their files", cmd_ls, cmd_rm)


def cmd_create(args: argparse.Namespace) -> int:
    from .._isolation import volumes

    print(volumes.create(args.name))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from .._isolation import volumes

    return show(volumes.listing(), args.output, f"{'NAME':<32} PATH", lambda v: f"{v['name']:<32} {v['path']}")


def cmd_rm(args: argparse.Namespace) -> int:
    from .._isolation import volumes

    return remove_each(args.names, volumes.remove, "volume", "sandpool volume ls")
