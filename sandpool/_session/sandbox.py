"""Sandbox: one isolated process tree with an agent at its root, owned by a Session."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import trio

from _sandpool_agent import wire as _wire
from .._config import SandboxDefaults, SandboxSpec, SandboxStatus, resolve_spec
from .._core.deadlines import Deadlines
from .._core.lifecycle import Event, Lifecycle, Phase, advance
from .._core.opref import OperationRef, TaskHost, check_not_in_trio
from .._core.routing import Requests
from .._errors import (
    SandboxError,
    SandboxFailedError,
    SandboxFileError,
    SandboxNotRunningError,
    SandboxTerminatedError,
    SandboxTimeoutError,
)
from .blocks import SandboxBlocks
from .connection import AgentConnection
from .logs import LogsMixin
from .pod import PodMixin
from .process import Process, SandboxLink
from .shared import KNOWN, FoundHandles
from .streamfiles import StreamFilesMixin, check_path
from .surface import ExecStats, SurfaceMixin
from .snapshots import SnapshotsMixin

if TYPE_CHECKING:
    from collections.abc import Generator
    from typing import BinaryIO

    from .._runtime.contract import Runtime, SandboxRecord
    from .home import SandboxHome
    from .session import Session

_EXIT_REPORT_SECONDS = 3.0


@dataclass(frozen=True)
class AgentLink(SandboxLink):
    """A sandbox's connection as the package's request makers use it (processes, pool slots,
    actors, the cwsandbox service): a process's link, plus frames sent in one write, the runtime's
    record of the sandbox (where a direct worker is reached) and its main command's log. Handed out
    by ``Sandbox.link``; no user API."""

    send_many: Callable[[list[dict[str, Any]]], Awaitable[None]]
    record: Callable[[], SandboxRecord | None]
    open_main_log: Callable[[], BinaryIO | None]


class Sandbox(SandboxBlocks, SnapshotsMixin, PodMixin, SurfaceMixin, LogsMixin, StreamFilesMixin, AgentConnection, FoundHandles):
    """A sandbox. Construction does no I/O; the first use (exec, files, wait, ``await``) starts it."""

    @staticmethod
    def _hidden() -> Any:
        """The module of the hidden sessions behind ``Sandbox()``, ``Sandbox.run()``, ``list``,
        ``from_id`` and ``delete`` without a session. The one import that runs up the session
        layer, lazily: the session module builds Sandboxes (tests/core/test_layers.py LAZY_EDGES)."""
        from . import default

        return default

    def __init__(self, *, defaults: SandboxDefaults | None = None, address: str | None = None,
                 token: str | None = None, _session: Session | None = None, _home: SandboxHome | None = None,
                 _spec: SandboxSpec | None = None, _pod_join: Callable[[], Awaitable[SandboxRecord]] | None = None,
                 **overrides: Any) -> None:
        standalone = _home is None and _session is None
        if _home is None:
            if _session is None:  # standalone: owned by the hidden session (stopped at exit at the latest)
                _session = cast("Session", self._hidden().default_session(address=address, token=token))
            _home = _session._home
        self._home = _home  # its session as it sees it: task host, runtime, who stops it
        self._homes: set[SandboxHome] = set()  # the sessions that stop this sandbox when they close
        self._spec = _spec or resolve_spec(defaults if defaults is not None else _home.defaults, **overrides)
        self._state = Lifecycle()
        self._record: SandboxRecord | None = None
        self._requests = Requests()
        self._started = trio.Event()  # start attempt finished (running or failed)
        self._terminal = trio.Event()  # its end is settled: state terminal, requests told
        self._attach_lock = trio.Lock()  # a found handle attaches once
        self._start_ref: OperationRef[None] | None = None
        self._stop_ref: OperationRef[None] | None = None
        self._exec_stats = ExecStats()
        self._link = AgentLink(host=_home.host, sandbox_id=lambda: self.sandbox_id,
                               ensure_running=self._ensure_running, register=self._register,
                               unregister=self._unregister, send=self._send, send_now=self._send_now,
                               read_answer=self._read_answer, await_answer=self._await_answer,
                               reader_needed=self._reader_needed,
                               deadlines=Deadlines(lambda: self._host),
                               send_many=self._send_many,
                               record=lambda: self._record, open_main_log=self._open_main_log)
        self._init_pod(_pod_join)  # a pod's further containers (or, in one of them, how to join its primary)
        if standalone:  # a session's own sandboxes are tracked by the session (found handles: on adopt)
            self._belong_to(_home)

    def _opened(self) -> bool:
        """True once its session runs (so starting it never blocks to open the session)."""
        return self._home.opened

    def _belong_to(self, home: SandboxHome) -> None:
        """Be stopped by ``home``'s session when it closes (its creator's, or one that adopted it)."""
        home.track(self)
        self._homes.add(home)

    def _advance(self, event: Event, *, settle: bool = False, **info: Any) -> None:
        """The one way this sandbox's state changes: the lifecycle's transition for ``event``. With
        ``settle``, a terminal state is also announced (nothing else will settle its end)."""
        self._state = advance(self._state, event, **info)
        if settle and self._state.terminal:
            self._terminal.set()

    # -- state, as properties (no I/O) -------------------------------------------------------

    @property
    def sandbox_id(self) -> str | None:
        return (self._record.sandbox_id or None) if self._record else None

    @property
    def status(self) -> SandboxStatus | None:
        if self._state.phase is Phase.STARTING and self._record is not None and self._record.status == "pending":
            return SandboxStatus.PENDING  # waiting in an engine's queue (Slurm), as its runtime reports
        return self._state.status

    @property
    def status_reason(self) -> str | None:
        if self._state.phase is Phase.STARTING and self._record is not None and self._record.status_reason:
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
    def link(self) -> AgentLink:
        """Its agent's connection, for sandpool's own request makers (pool slots, actors, the CLI's
        record fields, the cwsandbox service's logs); not a user API: use exec, the file methods and
        remote functions."""
        return self._link

    @property
    def _host(self) -> TaskHost:
        return self._home.host()

    @property
    def _runtime(self) -> Runtime:
        runtime = self._home.runtime
        assert runtime is not None, "a sandbox's runtime is used only once its session is open"
        return runtime

    def _spawn(self, async_fn: Callable[..., Awaitable[Any]], *args: object) -> OperationRef[Any]:
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

    def __await__(self) -> Generator[Any, None, Sandbox]:
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
        if self._state.phase is not Phase.NEW:
            await self._started.wait()
            return self._raise_if_not_running()
        self._advance(Event.START)
        try:
            runtime = await self._home.ready()
            self._record = runtime.create(self._spec)
            await self._join_pod(runtime)  # a pod's further container: into its primary's network
            if self._pod_join is None:  # (a pod's further containers are not listed)
                KNOWN[self._record.sandbox_id] = self
            await runtime.start(self._record)
            if self._pod_join is None:
                KNOWN[self._record.sandbox_id] = self  # again: a remote runtime names it in start()
            self._record.started_at = time.time()
            self._advance(Event.RUNNING)
            self._host.nursery.start_soon(self._reader)
            self._keep_main_log()
            await self._mount_files()
            await self._start_members()  # a pod's further containers
        except BaseException as exc:
            self._advance(Event.FAILED, settle=True, reason=f"failed to start: {exc}")
            raise
        finally:
            self._agent_up.set()
            self._started.set()

    def _raise_if_not_running(self) -> None:
        error = self._not_running_error()
        if error is not None:
            raise error

    def _not_running_error(self) -> SandboxError | None:
        """Why this sandbox cannot serve an operation now (None while it runs), with its reason."""
        state = self._state
        if state.phase is Phase.RUNNING:
            return None
        if self._record is not None and self._record.lost:
            return self._gone_error()  # SandboxUnavailableError: its server is unreachable
        if state.stop_requested or state.status == SandboxStatus.TERMINATED:
            return SandboxNotRunningError(f"sandbox {self.sandbox_id} has been stopped ({state.reason})",
                                          sandbox_id=self.sandbox_id)
        if state.status == SandboxStatus.COMPLETED:
            return SandboxNotRunningError(f"sandbox {self.sandbox_id} has completed ({state.reason})",
                                          sandbox_id=self.sandbox_id)
        if state.phase is Phase.STOPPING:
            return SandboxNotRunningError(f"sandbox {self.sandbox_id} is stopping", sandbox_id=self.sandbox_id)
        return SandboxFailedError(f"sandbox {self.sandbox_id} failed: {state.reason}",
                                  sandbox_id=self.sandbox_id, status_reason=state.reason)

    async def _ensure_running(self) -> None:
        if self._state.phase is Phase.RUNNING:
            if self._record is not None and self._record.channel is None:
                await self._attach()  # a handle found on a shared runtime: attach on first use
            return
        if self._state.phase is Phase.NEW:
            self.start()
        await self._started.wait()
        self._raise_if_not_running()

    async def _wait_async(self, timeout: float | None) -> Sandbox:
        limit = self._spec.request_timeout_seconds if timeout is None else timeout
        with trio.move_on_after(limit):
            if self._state.phase is Phase.NEW:
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
            if self._state.phase is Phase.NEW:
                self.start()
            elif self._state.phase is Phase.RUNNING and self._record is not None and self._record.channel is None:
                await self._watch()  # a found handle learns of its end through the data plane
            await self._terminal.wait()
            self._raise_if_ended_badly(raise_on_termination)
            return self
        raise SandboxTimeoutError(f"sandbox did not complete within {timeout} s", sandbox_id=self.sandbox_id)

    def _as_waitable(self) -> OperationRef[Sandbox]:
        """What ``sandpool.wait([sandbox])`` waits for: the sandbox running (starting it if needed)."""
        return self._spawn(self._wait_async, None)

    async def _stop_async(self, grace: float) -> None:
        await self._stop_members(grace)  # a pod's further containers
        if self._state.phase is Phase.NEW:
            self._advance(Event.STOP, settle=True)
            self._started.set()
        elif not self._state.terminal:
            if self._state.phase is Phase.STARTING and self._record is not None:
                self._runtime.abandon_start(self._record)  # e.g. a job still in Slurm's queue
            await self._started.wait()
            self._advance(Event.STOP)
            if self._record is not None:
                await self._runtime.stop(self._record, grace)
                if self._record.channel is None:  # a found handle never attached: no reader settles it
                    self._settle_unattached()
            with trio.CancelScope(shield=True), trio.move_on_after(_EXIT_REPORT_SECONDS):
                await self._terminal.wait()
        for home in list(self._homes):
            home.forget(self)

    # -- data plane ------------------------------------------------------------------------------

    def exec(self, command: Sequence[str], *, cwd: str | None = None, env: dict[str, str] | None = None,
             timeout_seconds: float | None = None, check: bool = False, stdin: bool = False,
             container: str | None = None) -> Process:
        """Run ``command`` (an argv list, no shell) in the sandbox (in its container ``container``,
        default the primary); returns at once with a Process."""
        if container:
            return self._in(container).exec(command, cwd=cwd, env=env, timeout_seconds=timeout_seconds,
                                            check=check, stdin=stdin)
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
        proc = Process(self._link, argv, cwd=cwd, env=env, timeout=timeout_seconds,
                       check=check, stdin=stdin, cap=self._spec.max_output_bytes, on_done=self._exec_stats.outcome)
        return proc

    def read_file(self, filepath: str, *, timeout_seconds: float | None = None,
                  allow_special_files: bool = False, container: str | None = None) -> OperationRef[bytes]:
        """The contents of ``filepath`` inside the sandbox, at most ``MAX_FILE_BYTES`` (more:
        ``SandboxFileError`` ``CWSANDBOX_FILE_TOO_LARGE``). A FIFO, device or socket is refused
        (``CWSANDBOX_FILE_NOT_REGULAR``) unless ``allow_special_files``: then it is read until its end
        or the limit, however long that takes (a FIFO waits for its writer; the timeout still holds).
        ``container``: which container's file (default the primary)."""
        if container:
            return self._in(container).read_file(filepath, timeout_seconds=timeout_seconds,
                                                 allow_special_files=allow_special_files)
        check_path(filepath)
        _check_seconds(timeout_seconds, "timeout_seconds")
        frame = {"t": "read_file", "path": filepath, **({"special": True} if allow_special_files else {})}
        return self._spawn(self._file_request, frame, timeout_seconds)

    def write_file(self, filepath: str, contents: bytes, *, timeout_seconds: float | None = None,
                   allow_special_files: bool = False, container: str | None = None) -> OperationRef[None]:
        """Write ``contents`` (at most ``MAX_FILE_BYTES``) to ``filepath`` inside the sandbox (parents
        created, replaced atomically). An existing FIFO, device or socket there is refused unless
        ``allow_special_files``: then the bytes are written into it. ``container``: which container's
        file (default the primary)."""
        if container:
            return self._in(container).write_file(filepath, contents, timeout_seconds=timeout_seconds,
                                                  allow_special_files=allow_special_files)
        check_path(filepath)
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
        or None. Internal: the cwsandbox service's StreamLogs reads it (``link.open_main_log``)."""
        return self._runtime.open_main_log(self._record) if self._record is not None else None


def _check_seconds(value: object, name: str) -> None:
    """``value`` must be None or a number of seconds > 0 (inf: no limit)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise ValueError(f"{name} must be a number > 0, got {value!r}; use e.g. {name}=30 (seconds)")



