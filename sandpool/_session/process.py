"""Exec'd processes as seen by the caller: Process and ProcessResult (its streams: ``streams``)."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import trio

from _sandpool_agent import wire as _wire
from .._core.deadlines import Deadlines
from .._core.opref import OperationCancelled, OperationRef, TaskHost
from .ownanswer import LiveOutput, ReadsOwnAnswer
from .._errors import ProtocolError, SandboxExecutionError, SandboxTimeoutError
from .streams import StdinWindow, StreamReader, StreamWriter, take

__all__ = ["Process", "ProcessResult", "SandboxLink", "StreamReader", "StreamWriter"]

_KILL_WAIT_SECONDS = 5.0
#: Output the agent may send for one process beyond what this side acknowledged: its window plus the
#: one read that crosses it. More is a broken or hostile agent, and fails its sandbox.
_MAX_OWED_BYTES = _wire.OUTPUT_WINDOW_BYTES + _wire.OUTPUT_CHUNK_BYTES


@dataclass(frozen=True)
class SandboxLink:
    """What a process uses of its sandbox, handed to it by the sandbox: the loop its operations run
    in, the sandbox's id, and the agent's connection (a process never reaches into the sandbox).

    ``send_now(handler, make)`` is the fast path: when the sandbox runs and no task of its loop is
    writing to the agent, it registers ``handler``, writes the frame ``make(req_id)`` from the
    calling thread (any thread) and returns the id; else it does nothing and returns 0. The handler
    then sees to its answer being read: it reads it itself, or calls ``reader_needed()``.

    ``read_answer(req_id, take, waiting, deadline)`` lets a sync caller blocked on request ``req_id``
    read the agent's connection itself (see ``AgentConnection._read_answer``), and ``await
    await_answer(req_id, take, waiting)`` a task of the loop awaiting it; ``reader_needed()``
    makes the loop's reader read again when an answer is awaited otherwise (any thread)."""

    host: Callable[[], TaskHost]
    sandbox_id: Callable[[], str | None]
    ensure_running: Callable[[], Awaitable[None]]
    register: Callable[[Any], int]
    unregister: Callable[[int], None]
    send: Callable[[dict[str, Any]], Awaitable[None]]
    send_now: Callable[[Any, Callable[[int], dict[str, Any]]], int]
    read_answer: Callable[[int, Callable[[list[dict[str, Any]]], bool], Callable[[], bool], float], None]
    await_answer: Callable[[int, Callable[[list[dict[str, Any]]], bool], Callable[[], bool]], Awaitable[None]]
    reader_needed: Callable[[], None]
    deadlines: Deadlines


@dataclass
class ProcessResult:
    """The outcome of one exec. Text is the UTF-8 decoding (with replacement) of the joined bytes.

    ``truncated`` is a sandpool extension: True when more output arrived than the sandbox's
    ``max_output_bytes`` and the oldest bytes were dropped from this result.
    """

    stdout: str
    stderr: str
    returncode: int
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    command: list[str] = field(default_factory=list)
    truncated: bool = False


class Process(ReadsOwnAnswer):
    """A command running in a sandbox. Awaitable / ``.result()`` gives a :class:`ProcessResult`."""

    def __init__(self, link: SandboxLink, argv: list[str], *, cwd: str | None, env: dict[str, str] | None,
                 timeout: float | None, check: bool, stdin: bool, cap: int, exec_extra: dict[str, Any] | None = None,
                 on_done: Callable[[Process], None] | None = None) -> None:
        """Make the process and send it at once when it can (from any thread: see ``_detach``), or
        start its task in the sandbox's loop; ``exec_extra`` adds fields to its exec frame (a
        terminal's "tty"); ``on_done(process)`` is called once it is done, in the thread that
        settles it (any thread: unlike a done callback, it costs no hop into the loop)."""
        super().__init__()
        self._link = link
        self._loop: TaskHost = link.host()
        self._argv = argv
        self._cwd, self._env, self._timeout, self._check = cwd, env, timeout, check
        self._exec_extra = exec_extra or {}
        self._out = {1: LiveOutput(cap, self._live_reader), 2: LiveOutput(cap, self._live_reader)}
        self._readers: dict[int, StreamReader] = {}  # stdout's and stderr's, made when first read
        self._window = StdinWindow(self._send_stdin, self._check_stdin_open)
        self.stdin: StreamWriter | None = StreamWriter(self._loop, self._window) if stdin else None
        self._pid: int | None = None
        self._sent = self._window.sent
        self._exited = trio.Event()
        self._exit_code: int | None = None
        self._failure: BaseException | None = None  # why it ended without an exit code
        self._owed = 0  # output bytes received and not yet acknowledged to the agent
        # Sent at once (from any thread), it has no task of its own: the agent's frames, its
        # deadline or a cancel settle it. Set before the frame goes: its answer may come at once.
        self._detached = True
        self._ending = False  # detached: a task of the loop kills it (timeout, cancel) and settles it
        self._init_reading(on_done)
        # The exec frame goes out from the calling thread when it can (SandboxLink.send_now): a
        # sync caller's, or the loop's own.
        self._req_id = link.send_now(self, self._exec_frame)  # 0: the task sends it
        if self._req_id:
            self._detach()
        else:  # the loop's task sends the frame, waits, bounds and cleans up
            self._detached = False
            self._launch(self._loop, self._body)

    def _detach(self) -> None:
        """An exec sent at once: no task, and from a sync caller's thread no hop into the loop. The reader
        settles it from the agent's frames (``_conclude``, maybe already), the sandbox's deadlines
        time it out (``_expire``), ``cancel`` kills it, each as the task of ``_body`` would have."""
        self._sent.set()  # nobody else holds this process yet: no task waits on the event
        if self._timeout is not None and not self.done():
            try:
                self._link.deadlines.add(self, self._timeout, self._expire)
            except RuntimeError:  # the loop has finished: the sandbox's end settles this process
                pass
            if self.done():  # it was settled meanwhile, and its deadline maybe not yet discarded
                self._link.deadlines.discard(self)

    @property
    def stdout(self) -> StreamReader:
        """The live output of its stdout (see ``StreamReader``)."""
        return self._reader(1)

    @property
    def stderr(self) -> StreamReader:
        """The live output of its stderr (see ``StreamReader``)."""
        return self._reader(2)

    def _reader(self, fd: int) -> StreamReader:
        # Made on first use, not with every process: most execs are only waited for.
        reader = self._readers.get(fd)
        if reader is None:
            with self._guard:  # (two threads may look at once: both get the one reader)
                reader = self._readers.get(fd)
                if reader is None:
                    reader = StreamReader(self._loop, self._out[fd], self._send_credit, self._failure_now)
                    self._readers[fd] = reader
        return reader

    def _exec_frame(self, req_id: int) -> dict[str, Any]:
        self._req_id = req_id
        return {"t": "exec", "id": req_id, "argv": self._argv, "cwd": self._cwd, "env": self._env,
                "stdin": self.stdin is not None, **self._exec_extra}

    async def _next_output(self) -> bytes | None:
        """The next raw chunk of stdout (None at EOF), acknowledged as it is taken."""
        return await take(self._out[1], self._send_credit)

    def _failure_now(self) -> BaseException | None:
        return self._failure

    def _check_stdin_open(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._exit_code is not None:
            raise SandboxExecutionError("the process has exited; its stdin is closed")

    async def _send_stdin(self, chunk: bytes, eof: bool) -> None:
        await self._link.send({"t": "stdin", "id": self._req_id, "data": chunk, "eof": eof})

    def __repr__(self) -> str:
        state = "running" if self._exit_code is None else f"exited {self._exit_code}"
        return f"<Process {self._argv!r} {state}>"

    @property
    def command(self) -> list[str]:
        return list(self._argv)

    @property
    def returncode(self) -> int | None:
        return self._exit_code

    def poll(self) -> int | None:
        """The exit code, or None while the process runs. Never blocks."""
        if self._exit_code is None and not self.done():  # its answer is looked for: the loop reads it
            self._link.reader_needed()
        return self._exit_code

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process exits; return its exit code."""
        return self.result(timeout).returncode

    def send_signal(self, sig: int) -> OperationRef[None]:
        """Deliver ``sig`` (e.g. ``signal.SIGINT``) to the process's whole process group. ValueError
        for a number that is no signal (1 to 64)."""
        _wire.check_field("signal", "sig", int(sig), "sig")
        return OperationRef.spawn(self._loop, self._signal, int(sig))

    def terminate(self) -> OperationRef[None]:
        """Send SIGTERM."""
        return self.send_signal(signal.SIGTERM)

    def kill(self) -> OperationRef[None]:
        """Send SIGKILL."""
        return self.send_signal(signal.SIGKILL)

    async def _signal(self, sig: int) -> None:
        await self._sent.wait()
        if self._exit_code is None and self._failure is None:
            await self._link.send({"t": "signal", "id": self._req_id, "sig": sig})

    def result(self, timeout: float | None = None) -> ProcessResult:
        self._request_drain()
        return super().result(timeout)

    def __await__(self) -> Generator[Any, None, ProcessResult]:
        self._request_drain()
        return super().__await__()

    def _request_drain(self) -> None:
        if self.done() or all(buffer.ack_from is None for buffer in self._out.values()):
            return  # nothing is held back (no live reader began): no hop to the loop for nothing
        if self._loop.in_loop_thread():
            self._drain()
        else:
            try:
                self._loop.call_soon(self._drain)
            except RuntimeError:  # the loop is gone; result() reports why
                pass

    # -- inside the loop ---------------------------------------------------------------------

    def _drain(self) -> None:
        """Someone wants the result: stop holding the producer back for a live reader."""
        credit = sum(buffer.drain() for buffer in self._out.values())
        if credit and self._req_id:
            self._send_credit(credit)

    def _send_credit(self, n: int) -> None:
        """Acknowledge ``n`` output bytes by a task of its own: a reader must not meet a checkpoint
        between taking a chunk and returning it (a cancellation there would lose the chunk)."""
        try:
            self._loop.nursery.start_soon(self._credit, n)
        except RuntimeError:  # the session's nursery is closing: nothing reads on
            pass

    async def _credit(self, n: int) -> None:
        self._owed -= n  # before it is sent: the agent can only have heard of credit counted here
        await self._ack(n)

    async def _ack(self, n: int) -> None:
        if self._exit_code is None and not self._exited.is_set():
            try:
                await self._link.send({"t": "credit", "id": self._req_id, "n": n})
            except Exception:  # the sandbox is gone; its exit handling reports that
                pass

    def _on_frame(self, frame: dict[str, Any]) -> int:
        """Handle a frame for this process; return credit to acknowledge at once. ProtocolError for a
        frame no agent may send for an exec (which fails the sandbox)."""
        kind = frame["t"]
        if self._exited.is_set():
            if kind == "output":  # late output of a process given up on (timeout): acknowledge, drop
                return len(frame["data"])
            return 0
        if kind == "output":
            self._owed += len(frame["data"])
            if self._owed > _MAX_OWED_BYTES:
                raise ProtocolError(f"the agent sent {self._owed} bytes of output for {self._argv[0]!r} without "
                                    f"waiting for credit (at most {_MAX_OWED_BYTES} are allowed)")
            credit = self._out[frame["fd"]].append(frame["data"])
            self._owed -= credit
            return credit
        if kind == "started":
            self._pid = frame["pid"]
        elif kind == "stdin_taken":
            self._window.taken(frame["n"])
        elif kind == "exit":
            self._exit_code = frame["code"]
            self._mark_exited()
        elif kind == "error":  # the agent refused the exec frame (only a broken client sends one it refuses)
            self._failure = ProtocolError(f"the sandbox refused command {self._argv!r}: {frame['message']}")
            self._mark_exited()
        else:
            raise ProtocolError(f"the agent answered an exec with a {kind!r} frame")
        return 0

    def _on_sandbox_gone(self, error: BaseException) -> None:
        with self._guard:  # (a sync caller may be settling it from its answer)
            if not self._exited.is_set():
                self._failure = error
                self._mark_exited()

    def _end_streams(self) -> None:
        if not self._exited.is_set():
            try:
                error = self.exception()  # done: it answers at once
            except OperationCancelled:
                error = None
            self._failure = error or SandboxExecutionError(
                f"command {self._argv!r} was cancelled before it ran", sandbox_id=self._link.sandbox_id())
            self._mark_exited()

    def _mark_exited(self) -> None:
        for buffer in self._out.values():
            buffer.close()
        self._exited.set()
        self._sent.set()  # stdin writers and signals waiting for the exec to go out: it never will now
        self._window.taken(0)  # writers waiting for the window: it will not open any more
        if self._detached and not self._ending:
            self._conclude()

    # -- detached (sent at once, from any thread; in the loop's thread) --------------------------

    def _conclude(self) -> None:
        """It exited, or its sandbox ended: settle it as ``_execute`` would have."""
        self._link.unregister(self._req_id)
        self._link.deadlines.discard(self)
        try:
            result = self._outcome()
        except Exception as exc:
            self._set_error(exc)
        else:
            self._set_result(result)

    def _expire(self) -> None:
        """Its deadline passed (a Deadlines callback: it must not raise)."""
        self._end_by(self._time_out)

    def _end_by(self, ending: Callable[[], Awaitable[None]], why: Exception | None = None) -> None:
        """Start ``ending`` (in the loop's thread); from then on, its streams end with ``why`` if given,
        not as if it had run to its end (even if its exit comes before that task has run)."""
        with self._guard:  # (a sync caller may be settling it from its answer)
            if self._ending or self.done():
                return
            try:
                self._loop.nursery.start_soon(ending)
            except RuntimeError:  # the session is closing: its sandbox's end settles this process
                return
            self._ending = True
            if why is not None and not self._exited.is_set():
                self._failure = why
        self._stop_own_wait()

    async def _time_out(self) -> None:
        await self._kill()
        self._link.unregister(self._req_id)
        error = SandboxTimeoutError(f"command {self._argv!r} timed out after {self._timeout} s; its process tree "
                                    "was killed", sandbox_id=self._link.sandbox_id())
        if not self._exited.is_set():
            self._failure = error
            self._mark_exited()
        self._set_error(error)

    async def _cancelled(self) -> None:
        self._link.deadlines.discard(self)
        await self._kill()
        self._link.unregister(self._req_id)
        if not self._exited.is_set():
            self._mark_exited()
        self._set_cancelled()

    def cancel(self) -> bool:
        """As ``OperationRef.cancel``: a running command is killed (its tree), then the process
        raises OperationCancelled; False if it was done already."""
        if not self._detached:
            return super().cancel()
        if self.done():
            return False
        why = SandboxExecutionError(f"command {self._argv!r} was cancelled", sandbox_id=self._link.sandbox_id())
        try:
            if self._loop.in_loop_thread():
                self._end_by(self._cancelled, why)
            else:
                self._loop.call_soon(self._end_by, self._cancelled, why)
        except RuntimeError:  # the loop has finished, and the sandbox's connection with it
            return super().cancel()
        return True

    async def _body(self) -> ProcessResult:
        try:
            return await self._execute()
        except BaseException as exc:
            if not self._exited.is_set():  # it never ran to its end: readers and writers end with why
                self._failure = exc if isinstance(exc, Exception) else SandboxExecutionError(
                    f"command {self._argv!r} was cancelled", sandbox_id=self._link.sandbox_id())
                self._mark_exited()
            raise

    async def _execute(self) -> ProcessResult:
        link = self._link
        await link.ensure_running()
        self._req_id = link.register(self)
        try:
            await link.send(self._exec_frame(self._req_id))
            self._sent.set()
            with trio.move_on_after(self._timeout if self._timeout is not None else float("inf")):
                await self._exited.wait()
            if not self._exited.is_set():
                await self._kill()
                raise SandboxTimeoutError(
                    f"command {self._argv!r} timed out after {self._timeout} s; its process tree was killed",
                    sandbox_id=link.sandbox_id(),
                )
        finally:
            if not self._exited.is_set():
                await self._kill()
            link.unregister(self._req_id)
        return self._outcome()

    def _outcome(self) -> ProcessResult:
        """The result of the exited process, or the error it ends with."""
        if self._failure is not None:
            raise self._failure
        result = self._result()
        if self._check and result.returncode != 0:
            raise SandboxExecutionError(
                f"command {self._argv!r} failed with exit code {result.returncode}",
                sandbox_id=self._link.sandbox_id(), exec_result=result,
            )
        return result

    async def _kill(self) -> None:
        """Kill the remote process tree (cancellation or timeout) and wait, bounded, for its exit."""
        with trio.CancelScope(shield=True):
            try:
                with trio.fail_after(_KILL_WAIT_SECONDS):  # an agent that stops reading cannot hold us here
                    await self._link.send({"t": "cancel", "id": self._req_id})
            except Exception:
                return
            self._drain()
            with trio.move_on_after(_KILL_WAIT_SECONDS):
                await self._exited.wait()

    def _result(self) -> ProcessResult:
        out, err = self._out[1].joined(), self._out[2].joined()
        return ProcessResult(
            stdout=out.decode("utf-8", "replace"), stderr=err.decode("utf-8", "replace"),
            returncode=self._exit_code if self._exit_code is not None else -1,
            stdout_bytes=out, stderr_bytes=err, command=list(self._argv),
            truncated=bool(self._out[1].dropped or self._out[2].dropped),
        )
