"""The snapshots a server's clients may see: those taken through the server, and nothing else.

The server keeps its snapshots in the machine's snapshot store, which its own user's local
sessions (and other servers sharing the image store) use too. A client of the server may read,
restore from and delete only the snapshots the server took for its clients (``Snapshot`` calls):
their ids are kept in a ledger, a file beside the server's journal (in memory when the journal
is), so they stay the clients' across server restarts. Every other id is answered as if it did
not exist (SnapshotNotFoundError, the same text), so a client learns nothing of the others.
Among clients, the rule is the one for sandboxes: every client the server admits (token, allowed
uid) sees all the server's sandboxes, and so all the snapshots taken of them.

The ledger is one JSON line per event (``{"add": id}`` / ``{"drop": id}``); it is rewritten
compactly when opened, dropping ids whose snapshot is gone from the store. Store calls that copy
or remove files run in a worker thread.
"""

from __future__ import annotations

import json
import os
from typing import Any, TextIO

import trio

from .._errors_cw import SnapshotNotFoundError
from .._ids import check_snapshot_id
from .._images.snapshots import SnapshotNotFound, SnapshotRecord, SnapshotStore
from .._grpc import limits
from .._grpc import messages as m


def ledger_path(journal_path: str | None) -> str | None:
    """Where the ledger of a server whose journal is ``journal_path`` lives (None: in memory)."""
    return None if journal_path is None else f"{journal_path}.snapshots"


def not_found(snapshot_id: str) -> SnapshotNotFoundError:
    return SnapshotNotFoundError(f"snapshot {snapshot_id!r} does not exist on this server; list its snapshots "
                                 f"with Sandbox.list_snapshots()", file_system_snapshot_id=snapshot_id)


class SnapshotLedger:
    """The ids of the snapshots a server took for its clients (module doc)."""

    def __init__(self, path: str | None, store: SnapshotStore) -> None:
        self.path = path
        self.store = store
        self.ids: set[str] = set()
        self._file: TextIO | None = None
        if path is not None:
            self._load(path)

    def __repr__(self) -> str:
        return f"<SnapshotLedger {self.path or 'in memory'} {len(self.ids)} snapshots>"

    def _load(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:  # a torn last line (the server was killed mid-write)
                continue
            if isinstance(event, dict) and isinstance(event.get("add"), str):
                self.ids.add(event["add"])
            elif isinstance(event, dict) and isinstance(event.get("drop"), str):
                self.ids.discard(event["drop"])
        self.ids = {i for i in self.ids if _well_formed(i) and os.path.exists(self.store.path("records", f"{i}.json"))}
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        staging = f"{path}.tmp"
        with open(staging, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"add": i}) + "\n" for i in sorted(self.ids))
        os.rename(staging, path)
        self._file = open(path, "a", encoding="utf-8")

    def _write(self, event: dict[str, str]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(event) + "\n")
            self._file.flush()

    def add(self, snapshot_id: str) -> None:
        self.ids.add(snapshot_id)
        self._write({"add": snapshot_id})

    def admits(self, snapshot_id: str) -> bool:
        """True if a client may use this snapshot (restore from it, read or delete it)."""
        return snapshot_id in self.ids

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- the calls -----------------------------------------------------------------------------

    async def rpc_get(self, request: dict[str, Any]) -> dict[str, Any]:
        record = await trio.to_thread.run_sync(self._get, _snapshot_id(request))
        reply: dict[str, Any] = record.to_json()
        return reply

    def _get(self, snapshot_id: str) -> SnapshotRecord:
        if not self.admits(snapshot_id):
            raise not_found(snapshot_id)
        try:
            return self.store.get(snapshot_id)
        except SnapshotNotFound as exc:
            raise not_found(snapshot_id) from exc

    async def rpc_list(self, request: dict[str, Any]) -> dict[str, Any]:
        source = m.field(request, "source_sandbox_id", str, None)
        if source is not None:
            limits.identifier("source_sandbox_id", source)
        records = await trio.to_thread.run_sync(self.store.records)
        return {"snapshots": [r.to_json() for r in records
                              if self.admits(r.snapshot_id) and source in (None, r.source_sandbox_id)]}

    async def rpc_delete(self, request: dict[str, Any]) -> dict[str, Any]:
        snapshot_id = _snapshot_id(request)
        missing_ok = m.field(request, "missing_ok", bool, False)
        deleted = self.admits(snapshot_id) and await trio.to_thread.run_sync(self.store.delete, snapshot_id)
        if self.admits(snapshot_id):
            self.ids.discard(snapshot_id)
            self._write({"drop": snapshot_id})
        if not deleted and not missing_ok:
            raise not_found(snapshot_id)
        return {"deleted": deleted}


def _snapshot_id(request: dict[str, Any]) -> str:
    return check_snapshot_id(m.field(request, "snapshot_id", str), "snapshot_id")


def _well_formed(snapshot_id: str) -> bool:
    try:
        check_snapshot_id(snapshot_id)
    except ValueError:
        return False
    return True
