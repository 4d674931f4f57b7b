"""Snapshots and forks of a sandbox (mixed into ``Sandbox``), and cwsandbox's snapshot management.

``sb.snapshot()`` captures the sandbox's whole writable filesystem while it runs (its processes
frozen during the copy) and resolves to a snapshot id; ``session.sandbox(restore_from_snapshot_id=id)``
(cwsandbox: ``file_system_snapshot_id=``) starts sandboxes on it, each with a copy-on-write layer of
its own; ``sb.fork(n)`` is one snapshot and ``n`` such starts with the same spec and tags;
``stop(snapshot_on_stop=True)`` snapshots before it stops and fills ``file_system_snapshot_id``.
``Sandbox.get_snapshot/list_snapshots/delete_snapshot`` read and change the local snapshot store,
or with ``address=`` (or ``$SANDPOOL_ADDRESS``) a server's, through the hidden session for it.
What is captured, and where it is kept: docs/snapshots.md.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

import trio

from .._core.lifecycle import Phase
from .._core.opref import OperationRef
from .._cwtypes import FileSystemSnapshot, FileSystemSnapshotStatus, FileSystemSnapshotTrigger
from .._errors_cw import SnapshotNotFoundError, SnapshotOnStopConflictError
from .._ids import check_snapshot_id
from .._images import snapshots as _store
from .parts import SandboxParts

if TYPE_CHECKING:
    from .._runtime.contract import Runtime
    from .._runtime.remote import RemoteRuntime
    from .home import SandboxHome

__all__ = ["SessionSnapshots", "SnapshotsMixin"]

#: At most this many sandboxes from one fork() call.
MAX_FORKS = 1000
_CLOUD_ONLY = {"base_url", "auth", "timeout_seconds"}
T = TypeVar("T")
U = TypeVar("U")


class SnapshotsMixin(SandboxParts):
    """``snapshot``, ``fork``, snapshot-on-stop and the snapshot store's class methods (module doc)."""

    _fss_id: str | None = None

    @property
    def file_system_snapshot_id(self) -> str | None:
        """The snapshot ``stop(snapshot_on_stop=True)`` took, once it has."""
        return self._fss_id

    def snapshot(self, *, wait_for_ready: bool = True, request_id: str | None = None,
                 retry_budget_seconds: float | None = None) -> OperationRef[str]:
        """Capture the sandbox's writable filesystem now (starting it if needed); resolves to the
        snapshot id once it is stored (ready). SnapshotNotSupportedError at the ``process`` level or
        on a runtime without snapshots; ``wait_for_ready``, ``request_id`` and
        ``retry_budget_seconds`` are cwsandbox's and have no local effect."""
        return self._spawn(self._snapshot_async, "manual")

    async def _snapshot_async(self, trigger: str) -> str:
        await self._ensure_running()
        assert self._record is not None  # (a running sandbox has its record)
        snap = await self._runtime.snapshot(self._record, trigger)
        return snap.snapshot_id

    def fork(self, n: int = 1) -> OperationRef[list[Self]]:
        """``n`` new running sandboxes with this one's filesystem as it is now, its spec and tags:
        one snapshot, then ``n`` starts from it at once. They belong to this sandbox's session.
        If one fails to start, the others are stopped and its error raised."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_FORKS:
            raise ValueError(f"fork(n) needs an int n from 1 to {MAX_FORKS}, got {n!r}; e.g. sb.fork(4)")
        return self._spawn(self._fork_async, n)

    async def _fork_async(self, n: int) -> list[Self]:
        snapshot_id = await self._snapshot_async("manual")
        spec = dataclasses.replace(self._spec, restore_from_snapshot_id=snapshot_id)
        forks = [type(self)(_home=self._home, _spec=spec) for _ in range(n)]
        for child in forks:
            child._belong_to(self._home)
        try:
            async with trio.open_nursery() as nursery:
                for child in forks:
                    nursery.start_soon(child._start_async)
        except BaseException:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as nursery:
                    for child in forks:
                        nursery.start_soon(child._stop_async, 0.0)
            raise
        return forks

    def _stop_with_snapshot(self, grace: float) -> OperationRef[None]:
        """``stop(snapshot_on_stop=True)``: snapshot (if it runs), then stop, even if the snapshot failed."""
        if self._stop_ref is not None:
            raise SnapshotOnStopConflictError(f"sandbox {self.sandbox_id} is already stopping without a snapshot; "
                                              f"call stop(snapshot_on_stop=True) first", sandbox_id=self.sandbox_id)
        self._stop_ref = self._spawn(self._snapshot_then_stop, grace)
        return self._stop_ref

    async def _snapshot_then_stop(self, grace: float) -> None:
        try:
            if self._state.phase is Phase.RUNNING:
                self._fss_id = await self._snapshot_async("on_delete")
        finally:
            await self._stop_async(grace)

    # -- the store (class-level, as in cwsandbox) ----------------------------------------------

    @classmethod
    def get_snapshot(cls, fss_id: str, *, address: str | None = None, token: str | None = None,
                     **cloud: Any) -> OperationRef[FileSystemSnapshot]:
        """The snapshot ``fss_id`` (SnapshotNotFoundError if there is none; ValueError if malformed).
        With ``address`` (or ``$SANDPOOL_ADDRESS``), one the server at that address took for its clients."""
        _check_cloud(cloud, "get_snapshot")
        if _server(address):
            session: SessionSnapshots = cls._hidden().default_session(address=address, token=token)
            return session.get_snapshot(fss_id)
        return _local(_get, fss_id)

    @classmethod
    def list_snapshots(cls, *, source_sandbox_id: str | None = None, status: Any = None, address: str | None = None,
                       token: str | None = None, **cloud: Any) -> OperationRef[list[FileSystemSnapshot]]:
        """Every stored snapshot, oldest first; only those of ``source_sandbox_id`` / ``status`` if given.
        With ``address`` (or ``$SANDPOOL_ADDRESS``), those the server at that address took for its clients."""
        _check_cloud(cloud, "list_snapshots")
        if _server(address):
            session: SessionSnapshots = cls._hidden().default_session(address=address, token=token)
            return session.list_snapshots(source_sandbox_id=source_sandbox_id, status=status)
        return _local(_list, source_sandbox_id, status)

    @classmethod
    def delete_snapshot(cls, fss_id: str, *, missing_ok: bool = False, address: str | None = None,
                        token: str | None = None, **cloud: Any) -> OperationRef[None]:
        """Delete snapshot ``fss_id``; its layers go once no snapshot names them and no sandbox runs on
        them. SnapshotNotFoundError if there is none, unless ``missing_ok``. With ``address`` (or
        ``$SANDPOOL_ADDRESS``), on the server at that address (only what it took for its clients)."""
        _check_cloud(cloud, "delete_snapshot")
        if _server(address):
            session: SessionSnapshots = cls._hidden().default_session(address=address, token=token)
            return session.delete_snapshot(fss_id, missing_ok=missing_ok)
        return _local(_delete, fss_id, missing_ok)


class SessionSnapshots:
    """``Session.get_snapshot/list_snapshots/delete_snapshot`` (a base class of ``Session``): the
    snapshot store its sandboxes start from: its server's for a session with ``address=`` (the
    snapshots the server took for its clients), else this machine's."""

    if TYPE_CHECKING:
        _home: SandboxHome
        _owned_runtime: Runtime | None
        _runtime_arg: Runtime | None

    def _on_server(self) -> bool:
        from .._runtime.remote import RemoteRuntime

        return isinstance(self._owned_runtime or self._runtime_arg, RemoteRuntime)

    def _ask_server(self, call: Callable[[RemoteRuntime], Awaitable[T]], shape: Callable[[T], U]) -> OperationRef[U]:
        """``shape(await call(runtime))`` with this session's (remote) runtime, opened if needed."""
        home = self._home

        async def run() -> U:
            runtime = await home.ready()
            return shape(await call(cast("RemoteRuntime", runtime)))

        return OperationRef.spawn(home.host(), run)

    def get_snapshot(self, fss_id: str) -> OperationRef[FileSystemSnapshot]:
        """The snapshot ``fss_id``: SnapshotNotFoundError if there is none, ValueError if malformed."""
        if not self._on_server():
            return _local(_get, fss_id)
        check_snapshot_id(fss_id, "fss_id")
        return self._ask_server(lambda rt: rt.get_snapshot(fss_id), _describe)

    def list_snapshots(self, *, source_sandbox_id: str | None = None,
                       status: Any = None) -> OperationRef[list[FileSystemSnapshot]]:
        """Every snapshot, oldest first; only those of ``source_sandbox_id`` / ``status`` if given."""
        if not self._on_server():
            return _local(_list, source_sandbox_id, status)
        wanted = None if status is None else FileSystemSnapshotStatus(status)
        return self._ask_server(lambda rt: rt.list_snapshots(source_sandbox_id),
                                lambda records: _select(records, None, wanted))

    def delete_snapshot(self, fss_id: str, *, missing_ok: bool = False) -> OperationRef[None]:
        """Delete snapshot ``fss_id`` (see ``Sandbox.delete_snapshot``); SnapshotNotFoundError if there
        is none, unless ``missing_ok``."""
        if not self._on_server():
            return _local(_delete, fss_id, missing_ok)
        check_snapshot_id(fss_id, "fss_id")
        return self._ask_server(lambda rt: rt.delete_snapshot(fss_id, missing_ok=missing_ok), lambda _deleted: None)


def _server(address: str | None) -> bool:
    """True when the store to ask is a server's: ``address``, else ``$SANDPOOL_ADDRESS``."""
    from .shared import resolve_address

    return resolve_address(address) is not None


def _local(fn: Callable[..., T], *args: Any) -> OperationRef[T]:
    """``fn(*args)`` on this machine's store, as a finished ref (ValueError for a malformed id raised now)."""
    try:
        return OperationRef.completed(fn(*args))
    except SnapshotNotFoundError as exc:
        return OperationRef.failed(exc)


def _get(fss_id: str) -> FileSystemSnapshot:
    check_snapshot_id(fss_id, "fss_id")
    try:
        return _describe(_local_store().get(fss_id))
    except _store.SnapshotNotFound as exc:
        raise SnapshotNotFoundError(str(exc), file_system_snapshot_id=fss_id) from exc


def _list(source_sandbox_id: str | None, status: Any) -> list[FileSystemSnapshot]:
    wanted = None if status is None else FileSystemSnapshotStatus(status)
    return _select(_local_store().records(), source_sandbox_id, wanted)


def _select(records: list[_store.SnapshotRecord], source_sandbox_id: str | None,
            wanted: FileSystemSnapshotStatus | None) -> list[FileSystemSnapshot]:
    found = [_describe(r) for r in records if source_sandbox_id in (None, r.source_sandbox_id)]
    return [s for s in found if wanted in (None, s.status)]


def _delete(fss_id: str, missing_ok: bool) -> None:
    check_snapshot_id(fss_id, "fss_id")
    if not _local_store().delete(fss_id) and not missing_ok:
        raise SnapshotNotFoundError(f"snapshot {fss_id!r} does not exist; list them with Sandbox.list_snapshots()",
                                    file_system_snapshot_id=fss_id)


def _local_store() -> _store.SnapshotStore:
    from .._isolation.snapshots import store

    return store()


def _check_cloud(cloud: dict[str, Any], what: str) -> None:
    unknown = set(cloud) - _CLOUD_ONLY
    if unknown:
        raise TypeError(f"Sandbox.{what}() got an unexpected keyword {sorted(unknown)[0]!r}")


def _describe(record: _store.SnapshotRecord) -> FileSystemSnapshot:
    created = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
    trigger = FileSystemSnapshotTrigger.ON_DELETE if record.trigger == "on_delete" else FileSystemSnapshotTrigger.MANUAL
    return FileSystemSnapshot(file_system_snapshot_id=record.snapshot_id, status=FileSystemSnapshotStatus.READY,
                              size_bytes=record.size_bytes, source_sandbox_id=record.source_sandbox_id,
                              trigger=trigger, created_at=created, updated_at=created, completed_at=created)
