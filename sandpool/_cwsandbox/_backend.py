"""The trio side of the cwsandbox service: cwsandbox's RPCs carried out on the sandboxes of one Session.

Every RPC method runs in the server's trio loop (the gRPC threads reach it through ``_grpc.bridge``) and
takes the request message and the call's remaining time in seconds (None: no deadline); StreamExec
finds its sandbox from the gRPC thread (``target_now``) and runs there as far as it can (``_exec``,
``_servicer``). CreateSandbox
waits up to ``CREATE_WAIT_SECONDS`` for the sandbox to run, so the client's first poll usually finds
it RUNNING; DeleteSandbox returns once the sandbox has ended, so the client's first poll after a stop
finds it terminal. Both would otherwise cost the client a poll interval (0.2 s or more) each.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, BinaryIO

import grpc
import trio

from .._grpc.bridge import Sender
from .._status import SandboxStatus
from . import _exec, _files, _logs, _pods, _snapshots, _specfrom
from ._errors import INVALID_REQUEST, RpcFailure, invalid, translate
from ._proto import Message, pb
from ._registry import Entry, Registry
from ._spec import mounted_files, scratch_dirs
from ._status import sandbox_message

if TYPE_CHECKING:
    from .._session.session import Session

#: ``open_log(sandbox_id)``: a sandbox's main log, for a runtime that keeps none where the server runs
#: (None: none there either).
OpenLog = Callable[[str], BinaryIO | None]

CREATE_WAIT_SECONDS = 1.0
#: most StreamExec calls whose stdin is forwarded at once (a gRPC server gives each open stream a
#: worker thread: the standalone server has 256)
MAX_STREAMS = 4096
RETIRE_EVERY_SECONDS = 60.0
PURGE_GRACE_SECONDS = 10.0
_FILE_TIMEOUT_SECONDS = 60.0


class CwsandboxBackend:
    """cwsandbox's SandboxService over ``session``'s sandboxes. Made by ``open_backend``."""

    def __init__(self, session: Session, nursery: trio.Nursery, open_log: OpenLog | None = None) -> None:
        self.session = session
        self.open_log = open_log
        self.nursery = nursery
        self.token = trio.lowlevel.current_trio_token()
        self.registry = Registry()
        self.log_sessions = _logs.LogSessions()
        self.container_logs = _pods.ContainerLogs(open_log)  # a pod's further containers'
        #: one thread per open StreamExec pumps its stdin (``_exec.StdinPump``): never one waiting for
        #: another's to end
        self.pumps = ThreadPoolExecutor(MAX_STREAMS, thread_name_prefix="cwsandbox-stdin")

    def __repr__(self) -> str:
        return f"<CwsandboxBackend {self.registry!r}>"

    # -- control plane -------------------------------------------------------------------------

    async def create(self, request: Message, timeout: float | None) -> Message:
        spec = request.sandbox.spec
        fingerprint = spec.SerializeToString(deterministic=True)
        entry = self.registry.replay(request.request_id, fingerprint)
        if entry is None:
            entry = await self._launch(spec, request.request_id, fingerprint)
        else:
            await entry.identified.wait()
            if entry.failure is not None:
                raise entry.failure
        with trio.move_on_after(CREATE_WAIT_SECONDS):
            await entry.started.wait()
        return sandbox_message(entry)

    async def create_from_file(self, request: Message, timeout: float | None) -> Message:
        return await self.create(_specfrom.from_file(request), timeout)  # a compose file: one container each

    async def create_from_template(self, request: Message, timeout: float | None) -> Message:
        return await self.create(_specfrom.from_template(request), timeout)  # a template stored here

    async def _launch(self, spec: Message, request_id: str, fingerprint: bytes) -> Entry:
        try:
            sandbox = self.session.sandbox(**_pods.sandbox_options(spec, self.session.defaults.isolation))
        except (TypeError, ValueError) as exc:
            raise invalid("sandbox.spec", str(exc)) from exc
        entry = Entry(sandbox, spec, request_id, fingerprint)
        self.registry.reserve(entry)
        ref = sandbox.start()
        ref.add_done_callback(lambda _ref: self._started(entry))
        sandbox.wait_until_complete().add_done_callback(lambda _ref: self._ended(entry))
        with trio.move_on_after(CREATE_WAIT_SECONDS):
            await entry.started.wait()
        while sandbox.sandbox_id is None and not ref.done():  # a slow start: its runtime names it early
            await trio.sleep(0.01)
        if sandbox.sandbox_id is None:
            try:
                await ref
            except Exception as exc:  # the runtime refused it (an isolation level or image it lacks...)
                entry.failure = translate(exc)
                if entry.failure.code == grpc.StatusCode.CANCELLED:  # not "stopped": it never existed
                    entry.failure.code = grpc.StatusCode.FAILED_PRECONDITION
            else:
                entry.failure = RpcFailure(grpc.StatusCode.INTERNAL, "the sandbox started without an id")
            self.registry.drop(entry)
            entry.identified.set()
            raise entry.failure
        self.registry.add(entry)
        entry.identified.set()
        return entry

    def _started(self, entry: Entry) -> None:
        """The start finished (in the loop thread, before anything else runs): take the main log at
        once, so a main command that ends within milliseconds still leaves it readable."""
        if entry.sandbox.status != SandboxStatus.RUNNING:
            entry.started.set()
            return
        self.container_logs.open(entry)  # a pod's further containers'
        file = entry.sandbox.link.open_main_log()
        if file is None and self.open_log is not None:
            file = self.open_log(entry.sandbox_id)
        entry.log = _logs.MainLog(file)
        files, dirs = mounted_files(entry.spec), scratch_dirs(entry.spec)
        if files or dirs:
            entry.preparing = True
            self.nursery.start_soon(self._mount_files, entry, files, dirs)
        else:
            entry.started.set()

    async def _mount_files(self, entry: Entry, files: list[tuple[str, bytes]], dirs: list[str]) -> None:
        """Make the scratch volumes' directories and write the spec's files before the sandbox is
        reported RUNNING; a failure fails the sandbox."""
        path = ""
        try:
            if dirs:
                path = dirs[0]
                await entry.sandbox.exec(["mkdir", "-p", "--", *dirs], check=True,
                                         timeout_seconds=_FILE_TIMEOUT_SECONDS)
            for path, content in files:
                try:
                    await _files.write_file(entry.sandbox, path, content, _FILE_TIMEOUT_SECONDS)
                except Exception as exc:
                    if entry.sandbox.status == SandboxStatus.RUNNING:  # else it is being stopped: that is why
                        entry.failure_reason = f"could not mount {path!r}: {translate(exc).message}"
                        entry.sandbox.stop(graceful_shutdown_seconds=0.0)  # its end reports the failure
                    return
        finally:
            entry.preparing = False
            entry.started.set()

    def _ended(self, entry: Entry) -> None:
        entry.ended_at = time.time()
        if entry.log is not None:
            entry.log.close()
        entry.ended.set()
        entry.started.set()

    async def get(self, request: Message, timeout: float | None) -> Message:
        return sandbox_message(self.registry.get(request.sandbox_id))

    async def list(self, request: Message, timeout: float | None) -> Message:
        page, token = self.registry.select(request)
        return pb.ListSandboxesResponse(sandboxes=[sandbox_message(e) for e in page], next_page_token=token)

    async def delete(self, request: Message, timeout: float | None) -> Message:
        """Stop a sandbox; with ``snapshot_volumes``, snapshot it first (``_snapshots``)."""
        snapshot = bool(request.snapshot_volumes)
        try:
            entry = self.registry.get(request.sandbox_id)
        except RpcFailure:
            if request.allow_missing and snapshot:  # cwsandbox's own answer to this combination
                raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"sandbox {request.sandbox_id!r} not found: "
                                 f"allow_missing cannot go with snapshot_volumes", INVALID_REQUEST) from None
            if request.allow_missing:
                return pb.DeleteSandboxResponse()
            raise
        await self._stop(entry, float(max(0, request.grace_period_seconds)), snapshot=snapshot)
        taken = [entry.sandbox.file_system_snapshot_id] if snapshot and entry.sandbox.file_system_snapshot_id else []
        return pb.DeleteSandboxResponse(sandbox=sandbox_message(entry), file_system_snapshot_ids=taken)

    async def purge(self, request: Message, timeout: float | None) -> Message:
        if not request.tags and not request.purge_all:
            raise invalid("tags", "give tags to match, or purge_all=true to stop every sandbox")
        targets = [e for e in self.registry.matching_tags(request.tags) if not e.status.is_terminal]
        failed: list[str] = []
        if not request.dry_run:
            async def stop_one(entry: Entry) -> None:
                try:
                    await self._stop(entry, PURGE_GRACE_SECONDS)
                except Exception:
                    failed.append(entry.sandbox_id)

            async with trio.open_nursery() as nursery:
                for entry in targets:
                    nursery.start_soon(stop_one, entry)
        return pb.PurgeSandboxesResponse(purge_count=len(targets) - len(failed), failed_sandbox_ids=failed)

    async def _stop(self, entry: Entry, grace: float, *, snapshot: bool = False) -> None:
        """Stop (or join a stop already asked for) and wait until the sandbox has ended; with ``snapshot``,
        snapshot it first. Leaving early (the caller gave up) does not interrupt the stop."""
        ref = entry.sandbox.stop(graceful_shutdown_seconds=grace, snapshot_on_stop=snapshot)
        done = trio.Event()
        ref.add_done_callback(lambda _ref: done.set())
        await done.wait()
        with trio.move_on_after(1.0):  # the end is reported a moment after the stop resolves
            await entry.ended.wait()
        await ref  # finished: returns or raises at once

    # -- snapshots (_snapshots.py) --------------------------------------------------------------

    async def create_snapshot(self, request: Any, timeout: float | None) -> Any:
        entry = await self._ready(request.sandbox_id, "")
        snapshot_id = await entry.sandbox.snapshot()
        return await _snapshots.describe(self.session, snapshot_id)

    async def get_snapshot(self, request: Any, timeout: float | None) -> Any:
        return await _snapshots.describe(self.session, request.file_system_snapshot_id)

    async def list_snapshots(self, request: Any, timeout: float | None) -> Any:
        return await _snapshots.listing(self.session, request)

    async def delete_snapshot(self, request: Any, timeout: float | None) -> Any:
        return await _snapshots.delete(self.session, request)

    # -- data plane ----------------------------------------------------------------------------

    async def _ready(self, sandbox_id: str, container: str) -> Entry:
        """The entry of ``sandbox_id`` once it runs (or has failed to); checks the container named."""
        entry = self.registry.get(sandbox_id)
        _pods.container(entry.spec, container)
        await entry.started.wait()
        return entry

    async def target(self, sandbox_id: str, container: str) -> _pods.InContainer:
        """The container ``container`` names of sandbox ``sandbox_id``, once it runs."""
        entry = await self._ready(sandbox_id, container)
        return _pods.InContainer(entry.sandbox, _pods.container(entry.spec, container))

    async def exec(self, request: Message, timeout: float | None) -> Message:
        return await _exec.exec_unary(await self.target(request.sandbox_id, request.container), request, timeout)

    def target_now(self, sandbox_id: str, container: str) -> _pods.InContainer | None:
        """From any thread: the container ``container`` names of sandbox ``sandbox_id`` if it has
        started (running, prepared), else None (then ``target``, in the loop, waits for it)."""
        entry = self.registry.get(sandbox_id)
        name = _pods.container(entry.spec, container)
        return _pods.InContainer(entry.sandbox, name) if entry.started.is_set() else None

    async def read_file(self, request: Message, timeout: float | None) -> Message:
        target = await self.target(request.sandbox_id, request.container)
        return pb.ReadFileResponse(content=await _files.read_file(target, request.path, timeout))

    async def write_file(self, request: Message, timeout: float | None) -> Message:
        target = await self.target(request.sandbox_id, request.container)
        await _files.write_file(target, request.path, bytes(request.content), timeout)
        return pb.WriteFileResponse()

    async def stream_logs(self, request: Message, send: Sender) -> None:
        entry = await self._ready(request.sandbox_id, request.container)
        await _logs.stream_logs(self.container_logs.of(entry, request.container), request, send, self.log_sessions)

    # -- housekeeping --------------------------------------------------------------------------

    async def retire(self) -> None:
        """Forget ended sandboxes past their retention, so a long-running server stays small."""
        while True:
            await trio.sleep(RETIRE_EVERY_SECONDS)
            for entry in self.registry.expired(time.time()):
                self.registry.drop(entry)
                entry.sandbox.stop()  # ended already: only releases it from the session

    def close_logs(self) -> None:
        """Close the main logs the backend opened for StreamLogs (the backend is ending)."""
        for entry in self.registry.entries():
            if entry.log is not None:
                entry.log.close()
        self.container_logs.close()


@contextlib.asynccontextmanager
async def open_backend(session: Session, open_log: OpenLog | None = None) -> AsyncIterator[CwsandboxBackend]:
    """A backend serving ``session``'s sandboxes while the block runs (call inside the server's trio loop).
    ``open_log(sandbox_id)``, if given, opens a sandbox's main log when its runtime keeps none here.

    The session owns the sandboxes: closing it stops them. Leaving the block ends the backend's own
    tasks (streams still open end with UNAVAILABLE).
    """
    async with trio.open_nursery() as nursery:
        backend = CwsandboxBackend(session, nursery, open_log)
        nursery.start_soon(backend.retire)
        try:
            yield backend
        finally:
            nursery.cancel_scope.cancel()
            backend.close_logs()
            backend.pumps.shutdown(wait=False)  # their RPCs have ended, or end with the server
