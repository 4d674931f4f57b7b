"""``sandpool snapshots ls | rm | prune``: the local snapshot store (``sandpool._images.snapshots``),
or with ``--address`` (or ``$SANDPOOL_ADDRESS``) the snapshots a sandpool server took for its clients
(``ls`` and ``rm``; ``prune`` is the store owner's, on its machine)."""

from __future__ import annotations

import argparse
import os
import time
from typing import TYPE_CHECKING, Any

from .sandboxes import ENV_ADDRESS, _connection, _target
from .stores import remove_each, show

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
    _connection(p)
    p.set_defaults(run=cmd_ls)
    p = ssub.add_parser("rm", help="remove snapshots (their layers go once nothing uses them)")
    p.add_argument("ids", nargs="+", metavar="ID")
    _connection(p)
    p.set_defaults(run=cmd_rm)
    p = ssub.add_parser("prune", help="remove layers no snapshot names and no sandbox runs on")
    p.set_defaults(run=cmd_prune)


def _store() -> SnapshotStore:
    from .._isolation.snapshots import store

    return store()


def _server(args: argparse.Namespace) -> dict[str, Any] | None:
    """The server to ask (address and token), when ``--address`` or ``$SANDPOOL_ADDRESS`` names one."""
    return _target(args) if args.address or os.environ.get(ENV_ADDRESS) else None


def _rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The snapshots as plain data: the local store's records, or those the server reports."""
    server = _server(args)
    if server is None:
        return [r.to_json() for r in _store().records()]
    from .._session.sandbox import Sandbox

    found = Sandbox.list_snapshots(**server).result()
    return [{"snapshot_id": s.file_system_snapshot_id, "image": "", "source_sandbox_id": s.source_sandbox_id or "",
             "size_bytes": s.size_bytes or 0, "layers": [],
             "created": s.created_at.timestamp() if s.created_at else 0.0} for s in found]


def cmd_ls(args: argparse.Namespace) -> int:
    def row(r: dict[str, Any]) -> str:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"]))
        return (f"{r['snapshot_id']:<22} {(r['image'] or '-')[:20]:<20} {r['source_sandbox_id']:<12} "
                f"{r['size_bytes'] / 2**20:8.1f}Mi {len(r['layers']) or '-':>6}  {created}")

    header = f"{'ID':<22} {'IMAGE':<20} {'SOURCE':<12} {'SIZE':>10} {'LAYERS':>6}  CREATED"
    return show(_rows(args), args.output, header, row)


def cmd_rm(args: argparse.Namespace) -> int:
    from .._errors_cw import SnapshotNotFoundError
    from .._ids import check_snapshot_id as check_id

    server = _server(args)

    def remove(snapshot_id: str) -> bool:
        check_id(snapshot_id)
        if server is None:
            return _store().delete(snapshot_id)
        from .._session.sandbox import Sandbox

        try:
            Sandbox.delete_snapshot(snapshot_id, **server).result()
        except SnapshotNotFoundError:
            return False
        return True

    return remove_each(args.ids, remove, "snapshot", "sandpool snapshots ls")


def cmd_prune(args: argparse.Namespace) -> int:
    removed = _store().prune()
    print(f"removed {len(removed)} unused layer(s)")
    return 0
