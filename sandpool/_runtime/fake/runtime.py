"""FakeRuntime: an in-memory runtime for tests. No process, no file, no socket: trio tasks only.

Each sandbox is a fake agent (``_fakeagent``) on an in-memory stream, speaking the same wire frames
as a real one, so everything above the runtime (sessions, sandboxes, processes, pools, retries)
runs unchanged. What commands print, which files exist, how remote calls fare, how long starting
takes and when sandboxes fail are scripted (``_fakescript``). Every delay is a trio sleep: under
``trio.testing.MockClock(autojump_threshold=0)`` a test of minutes of timeouts runs in
milliseconds.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from typing import Any

import trio
import trio.testing

from ..._core.channel import FrameChannel
from ..._config import SandboxSpec
from ..._errors import SandboxFailedError, SandboxUnavailableError
from . import script as _fakescript
from ..contract import Runtime, SandboxRecord
from .agent import FakeAgent
from .script import FakeCall, FakeCommand, FakeExec

__all__ = ["FakeCall", "FakeCommand", "FakeExec", "FakeRuntime", "FakeSandbox"]

class _Script:
    """What every sandbox of one FakeRuntime does (read by its agents)."""

    def __init__(self, execs: Any, calls: Any, die_after: float | None) -> None:
        self.execs = _fakescript.check_table(execs)
        if calls is not None and not callable(calls):
            raise TypeError(f"calls must be a function (name, args, kwargs) -> FakeCall | None, got {calls!r}")
        self.calls = calls
        self.die_after = None if die_after is None else _fakescript.check_delay("die_after", die_after)


class FakeSandbox:
    """One fake sandbox as a test sees it: its ``files`` (absolute path -> bytes, read and written
    by the sandbox), the argv of every command it ran (``execs``), the names of the remote
    functions it ran (``calls``), the commands its stop had to SIGKILL (``escalated``), and
    ``kill()`` to make it die now."""

    def __init__(self, in_loop: Callable[..., None], record: SandboxRecord, script: _Script,
                 files: dict[str, bytes]) -> None:
        spec = record.spec
        self.record = record
        self.script = script
        self.files = files
        self.execs: list[list[str]] = []
        self.calls: list[str] = []
        self.escalated: list[list[str]] = []
        self.main_log = bytearray()  # what the main command wrote (stdout and stderr)
        self.cwd = _fakescript.normalize("/", spec.working_dir or "/")
        self.env = {"SANDPOOL_SANDBOX_ID": record.sandbox_id, **dict(spec.environment_variables or {})}
        self._in_loop = in_loop  # its runtime's: runs a function in the runtime's trio loop
        self._agent: FakeAgent | None = None

    def __repr__(self) -> str:
        state = "running" if self.alive else "ended" if self.record.exited.is_set() else "not started"
        return f"<FakeSandbox {self.sandbox_id} {state} {len(self.files)} files {len(self.execs)} execs>"

    @property
    def sandbox_id(self) -> str:
        return self.record.sandbox_id

    @property
    def spec(self) -> SandboxSpec:
        return self.record.spec

    @property
    def alive(self) -> bool:
        return self._agent is not None and not self.record.exited.is_set()

    @property
    def started(self) -> bool:
        """True once its runtime connected it (its agent runs, or ran)."""
        return self._agent is not None

    def connect(self, stream: Any) -> FakeAgent:
        """Its agent, speaking over ``stream`` (its runtime runs ``agent.run`` as a task)."""
        self._agent = FakeAgent(self, stream)
        return self._agent

    def die_now(self) -> None:
        """Die at once, in the runtime's loop (its runtime's stop, when it cannot tell it to stop)."""
        if self._agent is not None:
            self._agent.die()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Make the sandbox die now (as an OOM kill would): its connection ends without a farewell,
        its processes and calls fail with SandboxDiedError. From any thread; nothing if it ended."""
        agent = self._agent
        if agent is not None:
            self._in_loop(agent.die, int(sig))


class FakeRuntime(Runtime):
    """An in-memory runtime for tests: ``Session(runtime=FakeRuntime(...))``.

    Args:
        execs: what commands do: a dict from an argv tuple (exact) or a glob string (matched
            against the shell-quoted command line, e.g. ``"pip install *"``) to a ``FakeExec``,
            an exit code, or a handler ``(FakeCommand) -> FakeExec | int`` (plain or async); or one
            handler for every command. Built-ins otherwise: echo, true, false, sleep, cat.
            Anything else exits 127, as a missing program does.
        files: the files every new sandbox starts with (absolute path -> str or bytes).
        calls: a hook ``(function name, args, kwargs) -> FakeCall | None`` run before each
            remote call, to delay it or make its worker or sandbox die.
        start_delay: seconds each sandbox takes to start (trio time).
        fail_starts: how many starts fail first (an int), or a function ``(spec, attempt) -> bool``
            (attempt counts this runtime's starts from 1) saying which fail.
        die_after: every sandbox dies this many seconds after it started (None: never).

    Raises TypeError/ValueError for bad arguments. A Session closes the runtime it is given when
    it ends; a closed FakeRuntime refuses further use (SandboxUnavailableError): make one per session.
    """

    name = "fake"

    def __init__(self, *, execs: Mapping[Any, Any] | Callable[..., Any] | None = None,
                 files: Mapping[str, str | bytes] | None = None,
                 calls: Callable[[str, tuple[Any, ...], dict[str, Any]], FakeCall | None] | None = None,
                 start_delay: float = 0.0, fail_starts: int | Callable[[SandboxSpec, int], bool] = 0,
                 die_after: float | None = None) -> None:
        self._script = _Script(execs, calls, die_after)
        self._files = _fakescript.seed_files(files)
        self._start_delay = _fakescript.check_delay("start_delay", start_delay)
        if not callable(fail_starts) and (isinstance(fail_starts, bool) or not isinstance(fail_starts, int)
                                          or fail_starts < 0):
            raise ValueError(f"fail_starts must be an int >= 0 or a function (spec, attempt) -> bool, "
                             f"got {fail_starts!r}")
        self._fail_starts = fail_starts
        self._boxes: dict[str, FakeSandbox] = {}
        self._starts = 0
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._nursery is not None else "not opened"
        live = sum(1 for box in self._boxes.values() if box.alive)
        return f"<FakeRuntime {state} sandboxes={len(self._boxes)} live={live}>"

    # -- what tests look at ----------------------------------------------------------------------

    @property
    def sandboxes(self) -> list[FakeSandbox]:
        """Every sandbox this runtime created, in creation order."""
        return list(self._boxes.values())

    def sandbox(self, sandbox_id: str) -> FakeSandbox:
        """The fake sandbox with ``sandbox_id`` (``Sandbox.sandbox_id`` of a started sandbox)."""
        try:
            return self._boxes[sandbox_id]
        except KeyError:
            known = ", ".join(self._boxes) or "none yet"
            raise ValueError(f"this FakeRuntime has no sandbox {sandbox_id!r}; it has: {known}") from None

    # -- the runtime contract ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxUnavailableError(
                "this FakeRuntime is closed (a Session closes the runtime it was given when it ends); "
                "create a new FakeRuntime for each session")
        if self._nursery is None:
            raise SandboxUnavailableError("this FakeRuntime is not open; pass it to a Session: Session(runtime=...)")

    def _in_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the runtime's trio loop: now if called there, else soon."""
        try:
            here = trio.lowlevel.current_trio_token() is self._token
        except RuntimeError:
            here = False
        if here or self._token is None:
            fn(*args)
        else:
            self._token.run_sync_soon(fn, *args)

    async def open(self, nursery: trio.Nursery) -> None:
        if self._closed:
            self._check_open()
        if self._nursery is None:  # several sync sessions may share one runtime: the first nursery serves
            self._nursery, self._token = nursery, trio.lowlevel.current_trio_token()

    def create(self, spec: SandboxSpec) -> SandboxRecord:
        self._check_open()
        record = SandboxRecord(sandbox_id=f"fake-{len(self._boxes) + 1}", spec=spec, isolation="fake")
        self._boxes[record.sandbox_id] = FakeSandbox(self._in_loop, record, self._script, dict(self._files))
        return record

    async def start(self, record: SandboxRecord) -> FrameChannel:
        self._check_open()
        self._starts += 1
        attempt = self._starts
        await _fakescript.sleep(self._start_delay)
        self._check_open()
        fails = self._fail_starts(record.spec, attempt) if callable(self._fail_starts) else attempt <= self._fail_starts
        if fails:
            record.exited.set()
            raise SandboxFailedError(f"sandbox {record.sandbox_id} failed to start: a scripted start failure "
                                     f"(FakeRuntime fail_starts, start {attempt})", sandbox_id=record.sandbox_id)
        box = self._boxes[record.sandbox_id]
        ours, theirs = trio.testing.memory_stream_pair()
        agent = box.connect(theirs)
        assert self._nursery is not None
        self._nursery.start_soon(agent.run)
        channel = FrameChannel(ours)
        await channel.handshake()
        record.channel = channel
        return channel

    async def stop(self, record: SandboxRecord, grace_seconds: float) -> None:
        with trio.CancelScope(shield=True):
            box = self._boxes.get(record.sandbox_id)
            if box is None or not box.started:
                record.exited.set()
                return
            # The fake agent always obeys: it leaves within the grace (its SIGKILL ends any process),
            # so unlike LocalRuntime there is no agent to kill afterwards; one we cannot tell dies now.
            channel = record.channel
            try:
                if channel is None or channel.closed:
                    raise SandboxUnavailableError("no connection to tell it to stop")
                await channel.send({"t": "stop", "grace": float(grace_seconds)})
            except SandboxUnavailableError:
                box.die_now()
            await record.exited.wait()
            if channel is not None:
                await channel.aclose()

    def list(self) -> list[SandboxRecord]:
        return [box.record for box in self._boxes.values()]

    async def aclose(self) -> None:
        """Stop every live sandbox at once (no grace); afterwards the runtime refuses use."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for box in self._boxes.values():
                    if box.alive:
                        nursery.start_soon(self.stop, box.record, 0.0)
