"""The fake agent: trio tasks that answer a client's wire frames as the real agent does, in memory.

It speaks the protocol of ``_sandpool_agent.agent`` over an in-memory stream: the handshake,
``exec`` (scripted, see ``_fakescript``), ``stdin``, ``signal``, ``cancel``, files, calls (run in
this process after a cloudpickle round trip, see ``_fakecodec``), ``ping``, ``stop``; it enforces
the sandbox's lifetime and idle timeout; and it can die as a real sandbox dies (its connection
ends without a farewell and the runtime reports a SIGKILL). Every wait is a trio sleep, so a
virtual clock drives it.
"""

from __future__ import annotations

import collections
import math
import signal
from typing import Any, Protocol, TYPE_CHECKING

import trio

from _sandpool_agent import wire as _wire
from ..._core.channel import FrameChannel
from ..._errors import SandboxUnavailableError
from . import codec as _fakecodec, script as _fakescript
from .script import FakeCall, FakeCommand, FakeExec

if TYPE_CHECKING:
    from ..contract import SandboxRecord

#: The fake pid of exec'd processes starts here (the agent itself is ``FAKE_PID``).
FAKE_PID = 1


class Box(Protocol):
    """What an agent reads and records of its sandbox (``runtime.FakeSandbox``, which builds agents)."""

    record: SandboxRecord
    script: Any  # the runtime's script: ``execs`` (a checked table), ``calls``, ``die_after``
    cwd: str
    env: dict[str, str]
    files: dict[str, bytes]
    execs: list[list[str]]
    calls: list[str]
    escalated: list[list[str]]
    main_log: bytearray


class _Proc:
    """One scripted process (id 0 is the sandbox's main command)."""

    def __init__(self, req_id: int, argv: list[str], pid: int) -> None:
        self.id, self.argv, self.pid = req_id, argv, pid
        self.scope = trio.CancelScope()
        self.stdin = bytearray()
        self.stdin_eof = False
        self.stdin_changed = trio.Event()
        self.ignore_sigterm = False
        self.killed_by: int | None = None
        self.done = trio.Event()

    def signal(self, sig: int) -> None:
        if sig == 0 or self.done.is_set() or (sig == signal.SIGTERM and self.ignore_sigterm):
            return
        self.killed_by = sig
        self.scope.cancel()


class FakeAgent:
    """Serves one fake sandbox's frames until it is stopped, its main command ends, or it dies."""

    def __init__(self, box: Box, stream: trio.abc.Stream) -> None:
        self.box = box
        self.script = box.script
        self.chan = FrameChannel(stream)
        self.procs: dict[int, _Proc] = {}
        self.calls: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()
        self.calls_changed = trio.Event()
        self.fns: dict[bytes, Any] = {}
        self.running_call: tuple[int, trio.CancelScope] | None = None
        self.serving = trio.CancelScope()
        self.ending: tuple[str, float] | None = None  # (reason, grace) once it leaves
        self.died: int | None = None  # the signal of a scripted death
        self.last_active = 0.0
        self.next_pid = FAKE_PID + 1
        self.work: trio.Nursery | None = None
        self.outbox, self.outgoing = trio.open_memory_channel(math.inf)  # frames leave in the order posted
        self.flushed = trio.Event()

    # -- running -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve; always ends with every process gone, the connection closed and the exit reported."""
        record = self.box.record
        try:
            async with trio.open_nursery() as work:
                self.work = work
                self.last_active = trio.current_time()
                work.start_soon(self._sender)
                self._post(_wire.hello(pid=FAKE_PID, sandbox_id=record.sandbox_id))
                with self.serving:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._read_owner)
                        nursery.start_soon(self._watch_time)
                        nursery.start_soon(self._run_calls)
                        argv = record.spec.argv()
                        if argv:
                            self._spawn(0, argv, self.box.cwd, {}, stdin=False)
                await self._shutdown()
                work.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if self.died is not None:
                    record.exit_code, record.exit_signal = 128 + self.died, self.died
                else:
                    record.exit_code, record.exit_signal = 0, None
                record.exited.set()
                await self.chan.aclose()

    def end(self, reason: str, grace: float = 0.0) -> None:
        """Leave the serving loop: ``reason`` goes into the farewell frame."""
        if self.ending is None:
            self.ending = (reason, grace)
        self.serving.cancel()

    def die(self, sig: int = signal.SIGKILL) -> None:
        """The sandbox dies at once: no farewell, its processes and calls cut short."""
        if self.died is None and not self.box.record.exited.is_set():
            self.died = sig
            self.ending = ("died", 0.0)
            self.serving.cancel()
            if self.work is not None:
                self.work.cancel_scope.cancel()

    async def _shutdown(self) -> None:
        """Escalating teardown, as the real agent's: SIGTERM, wait ``grace``, SIGKILL; then farewell."""
        reason, grace = self.ending or ("owner_gone", 0.0)
        if self.died is not None:
            return
        for proc in list(self.procs.values()):
            proc.signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            for proc in list(self.procs.values()):
                await proc.done.wait()
        for proc in list(self.procs.values()):
            proc.signal(signal.SIGKILL)
            self.box.escalated.append(proc.argv)
        if self.running_call is not None:
            self.running_call[1].cancel()
        if reason != "owner_gone":
            self._post({"t": "bye", "reason": reason})
        self.outbox.close()
        await self.flushed.wait()

    def _post(self, frame: dict[str, Any]) -> None:
        """Queue a frame for the owner; frames leave in the order they were posted."""
        if self.died is None:
            try:
                self.outbox.send_nowait(frame)
            except trio.ClosedResourceError:
                pass  # shutting down: the farewell was the last frame

    async def _sender(self) -> None:
        async for frame in self.outgoing:
            try:
                await self.chan.send(frame)
            except SandboxUnavailableError:
                self.end("owner_gone")
                break
        self.flushed.set()

    def _touch(self) -> None:
        self.last_active = trio.current_time()

    @property
    def busy(self) -> bool:
        return bool(self.procs or self.calls or self.running_call)

    async def _watch_time(self) -> None:
        """The sandbox's lifetime, idle timeout and scripted death, on trio's clock."""
        spec, start = self.box.record.spec, trio.current_time()
        lifetime = start + spec.max_lifetime_seconds if spec.max_lifetime_seconds else math.inf
        death = start + self.script.die_after if self.script.die_after is not None else math.inf
        idle = spec.idle_timeout_seconds
        while True:
            wake = min(lifetime, death, self.last_active + idle if idle else math.inf)
            if wake == math.inf:
                return
            await trio.sleep_until(wake)
            now = trio.current_time()
            if now >= death:
                self.die()
                return
            if now >= lifetime:
                return self.end("max_lifetime")
            if self.busy:
                self._touch()
            elif idle and now - self.last_active >= idle:
                return self.end("idle_timeout")

    async def _read_owner(self) -> None:
        try:
            while True:
                frame = await self.chan.receive()
                if frame is None:
                    return self.end("owner_gone")
                self._touch()
                self._dispatch(frame)
        except Exception as exc:  # a bad frame: the stream can't be trusted past it, as in the real agent
            self.end(f"protocol error: {exc}")

    def _dispatch(self, frame: dict[str, Any]) -> None:
        handler = getattr(self, f"_on_{frame['t']}", None)
        if handler is None:
            self._post(_fakecodec.error(frame.get("id", 0), "protocol",
                                                              f"the agent does not accept {frame['t']!r} frames"))
            return
        handler(frame)

    # -- processes -------------------------------------------------------------------------------

    def _on_exec(self, frame: dict[str, Any]) -> None:
        cwd = _fakescript.normalize(self.box.cwd, frame["cwd"]) if frame.get("cwd") else self.box.cwd
        self._spawn(frame["id"], [str(a) for a in frame["argv"]], cwd, frame.get("env") or {}, bool(frame.get("stdin")))

    def _spawn(self, req_id: int, argv: list[str], cwd: str, env: dict[str, Any], stdin: bool) -> None:
        proc = _Proc(req_id, argv, self.next_pid)
        proc.stdin_eof = not stdin
        self.next_pid += 1
        self.procs[req_id] = proc
        if req_id:
            self.box.execs.append(argv)
        assert self.work is not None  # (``run`` serves frames only inside its work nursery)
        self.work.start_soon(self._run_proc, proc, cwd, {**self.box.env, **env})

    async def _run_proc(self, proc: _Proc, cwd: str, env: dict[str, Any]) -> None:
        script = _fakescript.find_script(self.script.execs, proc.argv)
        try:
            if script is None:
                message = f"sandpool: cannot run {proc.argv[0]!r}: No such file or directory\n".encode()
                if proc.id:
                    self._post({"t": "output", "id": proc.id, "fd": 2, "data": message})
                return await self._finish(proc, 127, None)
            if proc.id:
                self._post({"t": "started", "id": proc.id, "pid": proc.pid})

            async def write(data: bytes, fd: int) -> None:
                if proc.id:
                    self._post({"t": "output", "id": proc.id, "fd": fd, "data": data})
                else:
                    self.box.main_log.extend(data)

            async def read_stdin() -> bytes:
                while not proc.stdin_eof:
                    await proc.stdin_changed.wait()
                return bytes(proc.stdin)

            command = FakeCommand(proc.argv, cwd, env, self.box.files, read_stdin, write)
            exit_code = 1  # (set below: only a signal, which sets ``killed_by``, cancels the scope)
            with proc.scope:
                try:
                    outcome = await _fakescript.play(script, command)
                except Exception as exc:  # a broken handler crashes its command, not the sandbox
                    outcome = FakeExec(stderr=f"fake command handler raised: {exc!r}\n", exit_code=1)
                proc.ignore_sigterm = outcome.ignore_sigterm
                for delay, data in outcome.chunks:
                    assert isinstance(data, bytes)  # (FakeExec made each text bytes)
                    await _fakescript.sleep(delay)
                    await write(data, 1)
                for fd, data in ((1, outcome.stdout), (2, outcome.stderr)):
                    assert isinstance(data, bytes)
                    if data:
                        await write(data, fd)
                await _fakescript.sleep(outcome.delay)
                if outcome.kill_sandbox:
                    return self.die()
                exit_code = outcome.exit_code
            if proc.killed_by is not None:
                return await self._finish(proc, 128 + proc.killed_by, proc.killed_by)
            await self._finish(proc, exit_code, None)
        finally:
            self.procs.pop(proc.id, None)
            proc.done.set()

    async def _finish(self, proc: _Proc, code: int, sig: int | None) -> None:
        self.procs.pop(proc.id, None)
        self._touch()
        if self.ending is not None:
            return  # the real agent sends no exit frames while it shuts down, only its farewell
        if proc.id == 0:
            self._post({"t": "main_exit", "code": code, "signal": sig})
            return self.end("main_exited", grace=1.0)
        self._post({"t": "exit", "id": proc.id, "code": code, "signal": sig})

    def _on_stdin(self, frame: dict[str, Any]) -> None:
        proc = self.procs.get(frame["id"])
        if proc is None or proc.stdin_eof:
            return
        proc.stdin += frame["data"]
        proc.stdin_eof = bool(frame.get("eof"))
        proc.stdin_changed.set()
        proc.stdin_changed = trio.Event()

    def _on_signal(self, frame: dict[str, Any]) -> None:
        proc = self.procs.get(frame["id"])
        if proc is not None:
            proc.signal(frame["sig"])

    def _on_credit(self, frame: dict[str, Any]) -> None:
        """Flow control: the fake sends at once (its output is in memory), so credit needs nothing."""

    def _on_cancel(self, frame: dict[str, Any]) -> None:
        if self._cancel_call(frame["id"], bool(frame.get("steal"))):
            return
        proc = self.procs.get(frame["id"])
        if proc is not None:
            proc.signal(signal.SIGKILL)

    # -- calls -----------------------------------------------------------------------------------

    def _on_call(self, frame: dict[str, Any]) -> None:
        self.calls[frame["id"]] = frame
        self.calls_changed.set()

    def _on_worker(self, frame: dict[str, Any]) -> None:
        self._post(_fakecodec.error(
            frame["id"], "protocol", "the fake runtime has no direct workers; send calls through the agent"))

    def _cancel_call(self, call_id: int, steal: bool) -> bool:
        if self.calls.pop(call_id, None) is not None:
            kind, message = ("lost", "given back before it started") if steal else \
                ("cancelled", "cancelled before it started")
            self._post(_fakecodec.error(call_id, kind, message))
            return True
        if self.running_call is not None and self.running_call[0] == call_id:
            if not steal:
                self.running_call[1].cancel()
            return True
        return steal

    async def _run_calls(self) -> None:
        """Run calls one at a time, in the order they came (as the sandbox's one worker does)."""
        while True:
            while not self.calls:
                await self.calls_changed.wait()
                self.calls_changed = trio.Event()
            call_id, frame = self.calls.popitem(last=False)
            answer: dict[str, Any] | None = None
            with trio.CancelScope() as scope:
                self.running_call = (call_id, scope)
                try:
                    answer = await self._run_call(frame)
                finally:
                    self.running_call = None
            if scope.cancelled_caught:
                answer = _fakecodec.error(call_id, "cancelled", "interrupted by cancellation")
            if answer is not None:
                self._post(answer)
            self._touch()

    async def _run_call(self, frame: dict[str, Any]) -> dict[str, Any] | None:
        loaded = _fakecodec.load_call(frame, self.fns)
        if isinstance(loaded, dict):
            return loaded
        fn, args, kwargs = loaded
        name = getattr(fn, "__qualname__", repr(fn))
        self.box.calls.append(name)
        try:
            plan = self.script.calls(name, args, kwargs) if self.script.calls is not None else None
            if plan is not None and not isinstance(plan, FakeCall):
                raise TypeError(f"the calls hook must return a FakeCall or None, got {plan!r}")
        except Exception as exc:  # a broken hook fails its call, where the test sees it
            return _fakecodec.user_error(frame["id"], exc, bool(frame.get("pickle")))
        plan = plan or FakeCall()
        timeout = frame.get("timeout")
        started = trio.current_time()
        with trio.move_on_after(timeout if timeout else math.inf) as timer:
            await _fakescript.sleep(plan.delay)
        if timer.cancelled_caught:
            return _fakecodec.error(frame["id"], "timeout", f"the call did not finish within {timeout} s")
        if plan.kill_sandbox:
            self.die()
            return None
        if plan.kill_worker:
            return _fakecodec.error(frame["id"], "worker_died", "the function's worker process killed by signal 9",
                                    code=128 + signal.SIGKILL, signal=signal.SIGKILL)
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - the user's exception travels back
            if exc.__traceback__ is not None:  # drop this module's own frame, as the worker does
                exc.__traceback__ = exc.__traceback__.tb_next
            return _fakecodec.user_error(frame["id"], exc, bool(frame.get("pickle")))
        return _fakecodec.result(frame["id"], value, int((trio.current_time() - started) * 1e6),
                                 bool(frame.get("pickle")))

    # -- files, liveness, stop -----------------------------------------------------------------------

    def _on_read_file(self, frame: dict[str, Any]) -> None:
        path = _fakescript.normalize(self.box.cwd, frame["path"])
        data = self.box.files.get(path)
        if data is not None:
            answer = {"t": "result", "id": frame["id"], "data": data}
        elif _fakescript.is_directory(self.box.files, path):
            answer = self._file_error(frame, "CWSANDBOX_FILE_IS_DIRECTORY", "is a directory; read a file inside it")
        else:
            answer = self._file_error(frame, "CWSANDBOX_FILE_NOT_FOUND", "No such file or directory")
        self._post(answer)

    def _on_write_file(self, frame: dict[str, Any]) -> None:
        path = _fakescript.normalize(self.box.cwd, frame["path"])
        if _fakescript.is_directory(self.box.files, path):
            answer = self._file_error(frame, "CWSANDBOX_FILE_IS_DIRECTORY", "Is a directory")
        else:
            self.box.files[path] = frame["data"]
            answer = {"t": "result", "id": frame["id"]}
        self._post(answer)

    @staticmethod
    def _file_error(frame: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
        return {"t": "error", "id": frame["id"], "kind": reason, "message": f"{frame['path']}: {message}",
                "path": frame["path"]}

    def _on_ping(self, frame: dict[str, Any]) -> None:
        self._post({"t": "pong", "id": frame["id"]})

    def _on_stop(self, frame: dict[str, Any]) -> None:
        self.end("stopped", grace=float(frame["grace"]))

    def _on_hello(self, frame: dict[str, Any]) -> None:
        _wire.check_hello(frame)
