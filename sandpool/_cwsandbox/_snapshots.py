"""cwsandbox's file-system snapshot RPCs over sandpool's snapshots.

A cwsandbox snapshot captures a sandbox's scratch volume; a sandpool snapshot captures the whole
writable filesystem, scratch volumes included (``_spec`` makes them directories of that
filesystem), so CreateFileSystemSnapshot snapshots the sandbox, a scratch volume restored from a
snapshot restores the sandbox from it, and DeleteSandbox with ``snapshot_volumes`` is
``stop(snapshot_on_stop=True)``. Snapshots are taken at once: every record is READY. The store is
the one this server's sandboxes start from, asked through its session (``Session.get_snapshot`` and
friends): this machine's, or under ``sandpool serve --cwsandbox`` the sandpool server's, which
shows its clients only the snapshots it took for them (docs/snapshots.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._errors_cw import SnapshotNotFoundError
from .._cwtypes import FileSystemSnapshot, FileSystemSnapshotTrigger
from ._errors import invalid
from ._proto import pb, timestamp

if TYPE_CHECKING:
    from .._session.session import Session

#: Most records one ListFileSystemSnapshots page holds (the request may ask for fewer).
MAX_PAGE = 100

_TRIGGERS = {FileSystemSnapshotTrigger.MANUAL: "SNAPSHOT_TRIGGER_MANUAL",
             FileSystemSnapshotTrigger.ON_DELETE: "SNAPSHOT_TRIGGER_ON_DELETE"}


def snapshot_message(snap: FileSystemSnapshot) -> Any:
    """cwsandbox's ``FileSystemSnapshot`` message of a stored snapshot (always READY)."""
    message = pb.FileSystemSnapshot(
        file_system_snapshot_id=snap.file_system_snapshot_id, state=pb.SnapshotState.Value("SNAPSHOT_STATE_READY"),
        size_bytes=snap.size_bytes or 0, source_sandbox_id=snap.source_sandbox_id or "",
        trigger=pb.SnapshotTrigger.Value(_TRIGGERS.get(snap.trigger, "SNAPSHOT_TRIGGER_UNSPECIFIED")))
    for field, moment in (("create_time", snap.created_at), ("complete_time", snap.completed_at),
                          ("updated_at", snap.updated_at)):
        if moment is not None:
            getattr(message, field).CopyFrom(timestamp(moment.timestamp()))
    return message


async def describe(session: Session, snapshot_id: str) -> Any:
    """The message of snapshot ``snapshot_id``; SnapshotNotFoundError if the store has none."""
    if not snapshot_id:
        raise invalid("file_system_snapshot_id", "file_system_snapshot_id is required, e.g. 'snap-0123456789abcdef'")
    return snapshot_message(await session.get_snapshot(snapshot_id))


async def listing(session: Session, request: Any) -> Any:
    """One page of the stored snapshots (oldest first), of ``source_sandbox_id`` if given."""
    if request.page_size < 0:
        raise invalid("page_size", f"page_size must be >= 0, got {request.page_size}")
    size = min(request.page_size or MAX_PAGE, MAX_PAGE)
    try:
        start = int(request.page_token or 0)
    except ValueError:
        raise invalid("page_token", f"page_token {request.page_token!r} is not one this server gave") from None
    found = await session.list_snapshots(source_sandbox_id=request.source_sandbox_id or None)
    page = found[start:start + size]
    following = str(start + size) if start + size < len(found) else ""
    return pb.ListFileSystemSnapshotsResponse(file_system_snapshots=[snapshot_message(s) for s in page],
                                              next_page_token=following)


async def delete(session: Session, request: Any) -> Any:
    """Delete a snapshot; its last record (an empty one when missing and ``allow_missing``)."""
    snapshot_id = request.file_system_snapshot_id
    try:
        message = await describe(session, snapshot_id)
    except SnapshotNotFoundError:
        if request.allow_missing:
            return pb.FileSystemSnapshot(file_system_snapshot_id=snapshot_id)
        raise
    await session.delete_snapshot(snapshot_id, missing_ok=request.allow_missing)
    return message
