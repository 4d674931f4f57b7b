"""Sandbox: one isolated process tree with an agent at its root, owned by a Session."""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from .._core import lifecycle as _lifecycle
from . import shared as _shared
from _sandpool_agent import wire as _wire
from .._core.routing import Requests
from .._config import SandboxDefaults, SandboxSpec, SandboxStatus, resolve_spec
from .._errors import (
    ProtocolError,
    SandboxDiedError,
    SandboxError,
    SandboxFailedError,
    SandboxFileError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxTerminatedError,
    SandboxTimeoutError,
    SandboxUnavailableError,
)
from .blocks import SandboxBlocks
from .._core.opref import OperationRef, TaskHost, check_not_in_trio
from .process import Process
from .logs import LogsMixin
from .streamfiles import StreamFilesMixin
from .surface import ExecStats, SurfaceMixin
from .snapshots import SnapshotsMixin

if TYPE_CHECKING:
    from typing import BinaryIO

    from .._runtime.contract import SandboxRecord
    from .session import Session

_EXIT_REPORT_SECONDS = 3.0
#: Every sandbox of this process by id: what Sandbox.list / from_id search. Weak: a live sandbox is
#: held by its session (or its reader task), a forgotten finished one may go.
_KNOWN: weakref.WeakValueDictionary[str, Sandbox] = weakref.WeakValueDictionary()


class _Reply:
    """A pending request/response exchange (file operations, pings)."""

    ACCEPTS = frozenset({"result", "error", "pong"})  # what an agent may answer; anything else fails the sandbox

    def __init__(self) -> None:
        self.event = trio.Event()
        self.frame: dict | None = None
        self.error: BaseException | None = None

    def _on_frame(self, frame: dict) -> int:
        self.frame = frame
        self.event.set()
        return 0

    def _on_sandbox_gone(self, error: BaseException) -> None:
        self.error = error
        self.event.set()


class Sandbox(SandboxBlocks, SnapshotsMixin, SurfaceMixin, LogsMixin, StreamFilesMixin):
    """A sandbox. Construction does no I/O; the first use (exec, files, wait, ``await``) starts it."""

    def __init__(self, *, defaults: SandboxDefaults | None = None, address: str | None = None,
                 token: str | None = None, _session: Session | None = None, _spec: SandboxSpec | None = None,
                 **overrides: Any) -> None:
        standalone = _session is None
        if _session is None:
            from .session import default_session

            _session = default_session(address=address, token=token)
        self._session = _session
        self._owners: set[Session] = set()  # sessions that stop this sandbox when they close
        self._spec = _spec or resolve_spec(defaults if defaults is not None else _session.defaults, **overrides)
        self._state = _lifecycle.Lifecycle()
        self._record: SandboxRecord | None = None
        self._requests = Requests()
        self._started = trio.Event()  # start attempt finished (running or failed)
        self._terminal = trio.Event()
        self._start_ref: OperationRef[None] | None = None
        self._stop_ref: OperationRef[None] | None = None
        self._exec_stats = ExecStats()
        if standalone:
            _session._track(self)

    # -- state, as properties (no I/O) -------------------------------------------------------

    @property
    def sandbox_id(self) -> str | None:
        return (self._record.sandbox_id or None) if self._record else None

    @property
    def status(self) -> SandboxStatus | None:
        if self._state.phase == "starting" and self._record is not None and self._record.status == "pending":
            return SandboxStatus.PENDING  # waiting in an engine's queue (Slurm), as its runtime reports
        return self._state.status

    @property
    def status_reason(self) -> str | None:
        if self._state.phase == "starting" and self._record is not None and self._record.status_reason:
            return self._record.status_reason
        return self._state.reason

    @property
    def returncode(self) -> int | None:
        return self._state.returncode

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(self._spec.tags)

    @property
    def spec(self) -> SandboxSpec:
        return self._spec

    @property
    def isolation(self) -> str | None:
        return self._record.isolation if self._record else None

    @property
    def created_at(self) -> float | None:
        return self._record.created_at if self._record else None

    @property
    def started_at(self) -> float | None:
        return self._record.started_at if self._record else None

    def __repr__(self) -> str:
        status = self.status.value if self.status else "not_started"
        tags = ",".join(self.tags)
        procs = sum(1 for r in self._requests.handlers.values() if isinstance(r, Process))
        level = f" isolation={self.isolation}" if self.isolation else ""
        return (f"<Sandbox {self.sandbox_id or '(unstarted)'} {status} image={self._spec.container_image}"
                f"{level} tags=({tags}) {procs} processes>")

    @property
    def _host(self) -> TaskHost:
        return self._session._ensure_open()

    def _spawn(self, async_fn, *args) -> OperationRef:
        return OperationRef.spawn(self._host, async_fn, *args)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> OperationRef[None]:
        """Start the sandbox (idempotent); resolves once it runs."""
        if self._start_ref is None:
            self._start_ref = self._spawn(self._start_async)
        return self._start_ref

    def wait(self, timeout: float | None = None) -> Sandbox:
        """Block until the sandbox runs (starting it if needed); return self. Inside trio: ``await sb``."""
        check_not_in_trio("Sandbox.wait()", "'await sandbox'")
        _check_seconds(timeout, "timeout")
        self._spawn(self._wait_async, timeout).result()
        return self

    def __await__(self):
        return self._spawn(self._wait_async, None).__await__()

    def wait_until_complete(self, timeout: float | None = None, *,
                            raise_on_termination: bool = True) -> OperationRef[Sandbox]:
        """Resolves (to the sandbox) when it reaches a terminal state, starting it if needed. As in
        cwsandbox, a FAILED sandbox raises SandboxFailedError (with ``status_reason``) and, unless
        ``raise_on_termination=False``, a stopped one SandboxTerminatedError; SandboxTimeoutError
        after ``timeout`` seconds (None: no limit)."""
        _check_seconds(timeout, "timeout")
        return self._spawn(self._wait_complete_async, timeout, raise_on_termination)

    def stop(self, *, graceful_shutdown_seconds: float = 10.0, missing_ok: bool = False,
             snapshot_on_stop: bool = False, wait_for_ready: bool = True,
             request_id: str | None = None) -> OperationRef[None]:
        """Stop: SIGTERM its processes, wait the grace period, then kill the tree. Resolves when terminal.

        ``snapshot_on_stop=True`` snapshots it first (``file_system_snapshot_id``, see ``snapshots``);
        ``wait_for_ready`` and ``request_id`` are accepted for cwsandbox and have no local effect."""
        if not isinstance(missing_ok, bool):
            raise TypeError(f"missing_ok must be True or False, got {missing_ok!r}")
        grace = graceful_shutdown_seconds
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not (math.isfinite(grace) and grace >= 0):
            raise ValueError(f"graceful_shutdown_seconds must be a number >= 0, got {grace!r}; "
                             "use e.g. graceful_shutdown_seconds=10 (seconds)")
        _wire.check_field("stop", "grace", float(graceful_shutdown_seconds), "graceful_shutdown_seconds")
        if snapshot_on_stop:
            return self._stop_with_snapshot(float(graceful_shutdown_seconds))
        if self._stop_ref is None:
            self._stop_ref = self._spawn(self._stop_async, float(graceful_shutdown_seconds))
        return self._stop_ref

    async def _start_async(self) -> None:
        if self._state.phase != "new":
            await self._started.wait()
            return self._raise_if_not_running()
        self._state = _lifecycle.advance(self._state, "start")
        runtime = self._session._runtime
        try:
            self._record = runtime.create(self._spec)
            _KNOWN[self._record.sandbox_id] = self
            await runtime.start(self._record)
            _KNOWN[self._record.sandbox_id] = self  # again: a remote runtime names it in start()
            self._record.started_at = time.time()
            self._state = _lifecycle.advance(self._state, "running")
            self._host.nursery.start_soon(self._reader)
            self._keep_main_log()
            await self._mount_files()
        except BaseException as exc:
            self._state = _lifecycle.advance(self._state, "failed", reason=f"failed to start: {exc}")
            self._terminal.set()
            raise
        finally:
            self._started.set()

    def _raise_if_not_running(self) -> None:
        error = self._not_running_error()
        if error is not None:
            raise error

    def _not_running_error(self) -> SandboxError | None:
        """Why this sandbox cannot serve an operation now (None while it runs), with its reason."""
        state = self._state
        if state.phase in ("running",):
            return None
        if self._record is not None and self._record.extra.get("lost"):
            return self._gone_error()  # SandboxUnavailableError: its server is unreachable
        if state.stop_requested or state.status == SandboxStatus.TERMINATED:
            return SandboxNotRunningError(f"sandbox {self.sandbox_id} has been stopped ({state.reason})",
                                          sandbox_id=self.sandbox_id)
        if state.status == SandboxStatus.COMPLETED:
            return SandboxNotRunningError(f"sandbox {self.sandbox_id} has completed ({state.reason})",
                                          sandbox_id=self.sandbox_id)
        if state.phase == "stopping":
            return SandboxNotRunningError(f"sandbox {self.sandbox_id} is stopping", sandbox_id=self.sandbox_id)
        return SandboxFailedError(f"sandbox {self.sandbox_id} failed: {state.reason}",
                                  sandbox_id=self.sandbox_id, status_reason=state.reason)

    async def _ensure_running(self) -> None:
        if self._state.phase == "running":
            if self._record is not None and self._record.channel is None:
                await _shared.attach(self)  # a handle found on a shared runtime: attach on first use
            return
        if self._state.phase == "new":
            self.start()
        await self._started.wait()
        self._raise_if_not_running()

    async def _wait_async(self, timeout: float | None) -> Sandbox:
        limit = self._spec.request_timeout_seconds if timeout is None else timeout
        with trio.move_on_after(limit):
            if self._state.phase == "new":
                self.start()
            await self._started.wait()
            if self._state.status == SandboxStatus.COMPLETED:
                return self
            if self._state.stop_requested:
                raise SandboxTerminatedError(f"sandbox {self.sandbox_id} was stopped", sandbox_id=self.sandbox_id)
            self._raise_if_not_running()
            return self
        raise SandboxTimeoutError(f"sandbox did not become ready within {limit} s", sandbox_id=self.sandbox_id)

    async def _wait_complete_async(self, timeout: float | None, raise_on_termination: bool = True) -> Sandbox:
        with trio.move_on_after(math.inf if timeout is None else timeout):
            if self._state.phase == "new":
                self.start()
            elif self._state.phase == "running" and self._record is not None and self._record.channel is None:
                await _shared.watch(self)  # a found handle learns of its end through the data plane
            await self._terminal.wait()
            self._raise_if_ended_badly(raise_on_termination)
            return self
        raise SandboxTimeoutError(f"sandbox did not complete within {timeout} s", sandbox_id=self.sandbox_id)

    def _as_waitable(self) -> OperationRef[Sandbox]:
        """What ``sandpool.wait([sandbox])`` waits for: the sandbox running (starting it if needed)."""
        return self._spawn(self._wait_async, None)

    async def _stop_async(self, grace: float) -> None:
        if self._state.phase == "new":
            self._state = _lifecycle.advance(self._state, "stop")
            self._terminal.set()
            self._started.set()
        elif not self._state.terminal:
            if self._state.phase == "starting" and self._record is not None:
                self._session._runtime.abandon_start(self._record)  # e.g. a job still in Slurm's queue
            await self._started.wait()
            self._state = _lifecycle.advance(self._state, "stop")
            if self._record is not None:
                await self._session._runtime.stop(self._record, grace)
                if self._record.channel is None:  # a found handle never attached: no reader settles it
                    _shared.settle_unattached(self)
            with trio.CancelScope(shield=True), trio.move_on_after(_EXIT_REPORT_SECONDS):
                await self._terminal.wait()
        for owner in list(self._owners):
            owner._forget(self)

    # -- the connection ------------------------------------------------------------------------

    def _register(self, handler: Any) -> int:
        return self._requests.register(handler)

    def _unregister(self, req_id: int) -> None:
        self._requests.unregister(req_id)

    async def _send(self, frame: dict) -> None:
        await self._open_channel().send(frame)

    async def _send_many(self, frames: list[dict]) -> None:
        """Send several frames in one write (remote-function calls batch this way)."""
        await self._open_channel().send_many(frames)

    def _open_channel(self) -> Any:
        """The agent's channel, or the reason this sandbox no longer has one (SandboxNotRunningError,
        or its failure with the reason)."""
        channel = self._record.channel if self._record else None
        if channel is None or channel.closed or self._state.terminal:
            raise self._not_running_error() or SandboxNotRunningError(
                f"sandbox {self.sandbox_id} is not running", sandbox_id=self.sandbox_id)
        return channel

    async def _reader(self) -> None:
        """Route frames to their requests until the agent's connection ends, then settle the state."""
        record = self._record
        assert record is not None and record.channel is not None
        farewell: dict | None = None
        protocol_error: ProtocolError | None = None
        self._host.nursery.start_soon(self._requests.send_credits, record.channel.send_many)
        try:
            while True:
                batch = await record.channel.receive_batch()
                if batch is None:
                    break
                for frame in batch:
                    mine = self._requests.route(frame)
                    if mine is None:
                        continue
                    if mine["t"] == "main_exit":
                        self._state = _lifecycle.advance(self._state, "main_exit", code=mine["code"])
                    elif mine["t"] == "bye":
                        farewell = mine
        except ProtocolError as exc:
            protocol_error = exc
        finally:
            with trio.CancelScope(shield=True):
                await self._settle(record, farewell, protocol_error)

    async def _settle(self, record: SandboxRecord, farewell: dict | None, protocol_error: ProtocolError | None) -> None:
        if protocol_error is not None:  # the stream is not to be trusted further: close it, then stop
            self._state = _lifecycle.advance(self._state, "failed", reason=f"protocol error: {protocol_error}")
            await record.channel.aclose()
            await self._session._runtime.stop(record, 0.0)
        with trio.move_on_after(_EXIT_REPORT_SECONDS):
            await record.exited.wait()
        if record.extra.get("lost"):  # the server became unreachable: its state is unknown here
            self._state = _lifecycle.advance(self._state, "failed", reason=record.extra["lost"])
        if farewell is not None:
            self._state = _lifecycle.advance(self._state, "farewell", reason=farewell.get("reason"),
                                             code=farewell.get("code"))
        self._state = _lifecycle.advance(self._state, "gone", code=record.exit_code, signal=record.exit_signal,
                                         oom_killed=record.extra.get("oom_killed", False))
        if record.channel is not None:
            await record.channel.aclose()
        self._requests.close(self._gone_error())
        self._terminal.set()

    def _gone_error(self) -> SandboxError:
        state = self._state
        if self._record is not None and self._record.extra.get("lost"):
            return SandboxUnavailableError(f"sandbox {self.sandbox_id}: {self._record.extra['lost']}",
                                           sandbox_id=self.sandbox_id)
        if state.stop_requested:
            return SandboxNotRunningError(f"sandbox {self.sandbox_id} was stopped", sandbox_id=self.sandbox_id)
        return SandboxDiedError(f"sandbox {self.sandbox_id} ended: {state.reason}", sandbox_id=self.sandbox_id,
                                exit_code=self._record.exit_code if self._record else None,
                                signal=self._record.exit_signal if self._record else None)

    # -- data plane ------------------------------------------------------------------------------

    def exec(self, command: Sequence[str], *, cwd: str | None = None, env: dict[str, str] | None = None,
             timeout_seconds: float | None = None, check: bool = False, stdin: bool = False) -> Process:
        """Run ``command`` (an argv list, no shell) in the sandbox; returns at once with a Process."""
        if isinstance(command, (str, bytes)) or not command:
            raise ValueError(f"command must be a non-empty list of strings such as ['echo', 'hi'], got {command!r}")
        argv = [str(c) for c in command]
        _wire.check_field("exec", "argv", argv, "command")
        if cwd is not None:
            _wire.check_field("exec", "cwd", cwd, "cwd")
            if not cwd.startswith("/"):
                raise ValueError(f"cwd must be an absolute path inside the sandbox such as '/work', got {cwd!r}")
        if env is not None:
            _wire.check_field("exec", "env", env, "env")
        if timeout_seconds is None:
            timeout_seconds = self._spec.request_timeout_seconds
        _check_seconds(timeout_seconds, "timeout_seconds")
        self._exec_stats.count("exec_count")
        proc = Process(self, argv, cwd=cwd, env=env, timeout=timeout_seconds,
                       check=check, stdin=stdin, cap=self._spec.max_output_bytes)
        proc._launch(self._host, proc._body)
        proc.add_done_callback(self._exec_stats.outcome)
        return proc

    def read_file(self, filepath: str, *, timeout_seconds: float | None = None,
                  allow_special_files: bool = False) -> OperationRef[bytes]:
        """The contents of ``filepath`` inside the sandbox, at most ``MAX_FILE_BYTES`` (more:
        ``SandboxFileError`` ``CWSANDBOX_FILE_TOO_LARGE``). A FIFO, device or socket is refused
        (``CWSANDBOX_FILE_NOT_REGULAR``) unless ``allow_special_files``: then it is read until its end
        or the limit, however long that takes (a FIFO waits for its writer; the timeout still holds)."""
        _check_path(filepath)
        _check_seconds(timeout_seconds, "timeout_seconds")
        frame = {"t": "read_file", "path": filepath, **({"special": True} if allow_special_files else {})}
        return self._spawn(self._file_request, frame, timeout_seconds)

    def write_file(self, filepath: str, contents: bytes, *, timeout_seconds: float | None = None,
                   allow_special_files: bool = False) -> OperationRef[None]:
        """Write ``contents`` (at most ``MAX_FILE_BYTES``) to ``filepath`` inside the sandbox (parents
        created, replaced atomically). An existing FIFO, device or socket there is refused unless
        ``allow_special_files``: then the bytes are written into it."""
        _check_path(filepath)
        _check_seconds(timeout_seconds, "timeout_seconds")
        if not isinstance(contents, (bytes, bytearray, memoryview)):
            raise TypeError(f"contents must be bytes, not {type(contents).__name__}; encode text first")
        size = memoryview(contents).nbytes
        if size > _wire.MAX_FILE_BYTES:
            return OperationRef.failed(SandboxFileError(
                f"{filepath}: {size} bytes exceeds the {_wire.MAX_FILE_BYTES}-byte limit of one file operation; "
                "write it in parts", sandbox_id=self.sandbox_id, filepath=filepath, reason="CWSANDBOX_FILE_TOO_LARGE"))
        frame = {"t": "write_file", "path": filepath, "data": bytes(contents),
                 **({"special": True} if allow_special_files else {})}
        return self._spawn(self._file_request, frame, timeout_seconds)

    def _open_main_log(self) -> BinaryIO | None:
        """The main command's log from its runtime (readable after the sandbox ends while kept open),
        or None. Internal: the cwsandbox service's StreamLogs reads it."""
        return self._session._runtime.open_main_log(self._record) if self._record is not None else None

    async def _request(self, frame: dict, timeout: float | None) -> dict:
        await self._ensure_running()
        reply = _Reply()
        frame["id"] = self._register(reply)
        try:
            with trio.fail_after(self._spec.request_timeout_seconds if timeout is None else timeout):
                await self._send(frame)
                await reply.event.wait()
        except trio.TooSlowError:
            raise SandboxTimeoutError(f"{frame['t']} timed out", sandbox_id=self.sandbox_id) from None
        finally:
            self._unregister(frame["id"])
        if reply.error is not None:
            raise reply.error
        assert reply.frame is not None
        return reply.frame

    async def _file_request(self, frame: dict, timeout: float | None) -> bytes | None:
        path = frame["path"]
        reply = await self._request(frame, timeout)
        if reply["t"] == "error" and reply["kind"] == "protocol":
            raise ProtocolError(f"the sandbox refused {frame['t']} of {path!r}: {reply['message']}")
        if reply["t"] == "error":
            raise SandboxFileError(reply["message"], sandbox_id=self.sandbox_id, filepath=path, reason=reply["kind"])
        data = reply.get("data")
        if reply["t"] != "result" or (frame["t"] == "read_file" and data is None):
            raise ProtocolError(f"the sandbox answered {frame['t']} of {path!r} with {_wire.summary(reply)}")
        return data if frame["t"] == "read_file" else None

    # -- construction and discovery --------------------------------------------------------------

    @classmethod
    def list(cls, *, tags: Sequence[str] | None = None, status: str | SandboxStatus | None = None,
             show_terminated: bool = False, address: str | None = None,
             token: str | None = None) -> OperationRef[list[Sandbox]]:
        """Sandboxes carrying every tag in ``tags`` (non-terminal unless asked): this process's, or
        with ``address`` (or ``$SANDPOOL_ADDRESS``) every one of that server's, whoever made them."""
        wanted = SandboxStatus.parse(status) if status is not None else None
        if isinstance(tags, str):
            raise TypeError(f"tags must be a list of strings, not a string; use tags=[{tags!r}]")
        if _shared.selects_shared(address):
            return _shared.spawn_find(address, token, tags=tuple(tags or ()),
                                      status=wanted.value if wanted else None, show_terminated=show_terminated)
        found = [sb for sb in list(_KNOWN.values()) if _matches(sb, tags or (), wanted, show_terminated)]
        return OperationRef.completed(found)

    @classmethod
    def from_id(cls, sandbox_id: str, *, address: str | None = None,
                token: str | None = None) -> OperationRef[Sandbox]:
        """The sandbox with this id (on the server at ``address`` or ``$SANDPOOL_ADDRESS`` if set);
        SandboxNotFoundError if there is none."""
        if _shared.selects_shared(address):
            return _shared.spawn_find(address, token, sandbox_id=sandbox_id)
        sandbox = _KNOWN.get(sandbox_id)
        if sandbox is None:
            return OperationRef.failed(SandboxNotFoundError(f"no sandbox {sandbox_id!r}", sandbox_id=sandbox_id))
        return OperationRef.completed(sandbox)


def _matches(sb: Sandbox, tags: Sequence[str], status: SandboxStatus | None, show_terminated: bool) -> bool:
    if sb.status is None or not all(t in sb.tags for t in tags):
        return False
    if status is not None:
        return sb.status == status
    return show_terminated or not sb.status.is_terminal


def _check_seconds(value: object, name: str) -> None:
    """``value`` must be None or a number of seconds > 0 (inf: no limit)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise ValueError(f"{name} must be a number > 0, got {value!r}; use e.g. {name}=30 (seconds)")


def _check_path(filepath: object) -> None:
    if not isinstance(filepath, str) or not filepath:
        raise ValueError(f"filepath must be a non-empty string such as '/tmp/data.txt', got {filepath!r}")
    _wire.check_field("read_file", "path", filepath, "filepath")

