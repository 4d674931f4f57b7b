"""``sandpool snapshots ls | rm | prune``: the local snapshot store (``sandpool._images.snapshots``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._images.snapshots import SnapshotStore
    from . import Subcommands


def register(sub: Subcommands) -> None:
    snaps = sub.add_parser("snapshots", help="list or remove sandbox filesystem snapshots",
                           description="Snapshots taken with sb.snapshot(), sb.fork() or stop(snapshot_on_stop=True); "
                                       "they live beside the image store ($SANDPOOL_IMAGE_DIR).")
    ssub = snaps.add_subparsers(dest="snapshots_command", required=True, metavar="ACTION")
    p = ssub.add_parser("ls", help="list the snapshots, oldest first")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(run=cmd_ls)
    p = ssub.add_parser("rm", help="remove snapshots (their layers go once nothing uses them)")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(run=cmd_rm)
    p = ssub.add_parser("prune", help="remove layers no snapshot names and no sandbox runs on")
    p.set_defaults(run=cmd_prune)


def _store() -> SnapshotStore:
    from .._isolation.snapshots import store

    return store()


def cmd_ls(args: argparse.Namespace) -> int:
    records = _store().records()
    if args.output == "json":
        print(json.dumps([r.to_json() for r in records], indent=1))
        return 0
    print(f"{'ID':<22} {'IMAGE':<20} {'SOURCE':<12} {'SIZE':>10} {'LAYERS':>6}  CREATED")
    for r in records:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created))
        print(f"{r.snapshot_id:<22} {r.image[:20]:<20} {r.source_sandbox_id:<12} {r.size_bytes / 2**20:8.1f}Mi "
              f"{len(r.layers):>6}  {created}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from .._ids import check_snapshot_id as check_id

    store, code = _store(), 0
    for snapshot_id in args.ids:
        check_id(snapshot_id)
        if store.delete(snapshot_id):
            print(f"removed {snapshot_id}")
        else:
            print(f"Error: no snapshot {snapshot_id!r}; list them with 'sandpool snapshots ls'", file=sys.stderr)
            code = 1
    return code


def cmd_prune(args: argparse.Namespace) -> int:
    removed = _store().prune()
    print(f"removed {len(removed)} unused layer(s)")
    return 0
