"""Exec'd processes as seen by the caller: Process, ProcessResult, StreamReader, StreamWriter."""

from __future__ import annotations

import codecs
import collections
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from _sandpool_agent import wire as _wire
from .._errors import ProtocolError, SandboxExecutionError, SandboxTimeoutError
from .._core.hosts import call_in
from .._core.opref import OperationCancelled, OperationRef, TaskHost, check_not_in_trio
from .._core.output import OutputBuffer

_KILL_WAIT_SECONDS = 5.0
#: Output the agent may send for one process beyond what this side acknowledged: its window plus the
#: one read that crosses it. More is a broken or hostile agent, and fails its sandbox.
_MAX_OWED_BYTES = _wire.OUTPUT_WINDOW_BYTES + _wire.OUTPUT_CHUNK_BYTES


@dataclass(frozen=True)
class SandboxLink:
    """What a process uses of its sandbox, handed to it by the sandbox: the loop its operations run
    in, the sandbox's id, and the agent's connection (a process never reaches into the sandbox)."""

    host: Callable[[], TaskHost]
    sandbox_id: Callable[[], str | None]
    ensure_running: Callable[[], Awaitable[None]]
    register: Callable[[Any], int]
    unregister: Callable[[int], None]
    send: Callable[[dict], Awaitable[None]]


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


async def _take(buffer: OutputBuffer, credit: Callable[[int], None]) -> bytes | None:
    """The next chunk of ``buffer`` (None at EOF), its bytes acknowledged through ``credit``."""
    chunk, owed = await buffer.next_chunk()
    if owed:
        credit(owed)
    return chunk


class StreamReader:
    """Live output of one stream as text chunks: ``for chunk in proc.stdout``, or ``async for`` (trio
    or asyncio; cancelling the iterating task stops the read, not the process).

    The stream ends when the process exits; if the process never ran to its end (its sandbox died or
    was stopped, or the exec timed out or failed to start), reading past the last chunk raises that
    error instead of ending quietly.
    """

    def __init__(self, loop: TaskHost, buffer: OutputBuffer, credit: Callable[[int], None],
                 failure: Callable[[], BaseException | None]) -> None:
        self._loop = loop
        self._buffer = buffer
        self._credit = credit  # acknowledges bytes taken to the agent
        self._failure = failure  # why the process never ran to its end, once it is known
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._done = False
        self._unread: collections.deque[str | None] = collections.deque()  # taken for an awaiter that gave up

    async def _next_bytes(self) -> bytes | None:
        """The next chunk of output as the process wrote it (None at EOF), acknowledged as it is taken.
        The text iterators decode these; byte-exact consumers (the cwsandbox service) read them as is."""
        return await _take(self._buffer, self._credit)

    async def _next(self) -> str | None:
        if self._unread:
            return self._unread.popleft()
        while not self._done:
            chunk = await self._next_bytes()
            if chunk is None:
                failure = self._failure()
                if failure is not None:  # it never ran to its end: say why
                    raise failure
                self._done = True
                tail = self._decoder.decode(b"", final=True)
                return tail or None
            text = self._decoder.decode(chunk)
            if text:
                return text
        return None

    def __aiter__(self) -> StreamReader:
        return self

    async def __anext__(self) -> str:
        # The buffer lives in the sandbox's loop: read there, awaited from this trio or asyncio task.
        text = await call_in(self._loop, self._next, abandoned=self._keep_unread)
        if text is None:
            raise StopAsyncIteration
        return text

    def _keep_unread(self, ref: OperationRef[str | None]) -> None:
        # A done callback, in the sandbox's loop (where _next runs too).
        try:
            if ref.exception() is None:
                self._unread.append(ref.result())
        except OperationCancelled:  # cancelled while it waited: it took nothing
            pass

    def __iter__(self) -> StreamReader:
        return self

    def __next__(self) -> str:
        check_not_in_trio("iterating a stream", "'async for chunk in proc.stdout'")
        text = trio.from_thread.run(self._next, trio_token=self._loop.token)
        if text is None:
            raise StopIteration
        return text


class StreamWriter:
    """The process's stdin. ``write``/``writeline``/``close`` return OperationRefs, applied in call order.

    Flow control: at most ``STDIN_WINDOW_BYTES`` are on their way (sent, not yet taken by the process,
    as the agent reports with ``stdin_taken``); a write beyond that resolves once the process reads,
    so a process that never reads its stdin holds a bounded amount of it, in the agent or here.
    """

    def __init__(self, loop: TaskHost, window: StdinWindow) -> None:
        self._loop = loop
        self._window = window
        self._issued = 0
        self._turn = 0
        self._turn_changed = trio.Event()
        self.closed = False

    def write(self, data: bytes) -> OperationRef[None]:
        """Queue ``data`` for the process's stdin."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"stdin data must be bytes, not {type(data).__name__}; use writeline() for text")
        return self._submit(bytes(data), eof=False)

    def writeline(self, line: str, encoding: str = "utf-8") -> OperationRef[None]:
        return self._submit((line + "\n").encode(encoding), eof=False)

    def close(self) -> OperationRef[None]:
        """Send EOF. Idempotent."""
        if self.closed:
            return OperationRef.completed(None)
        self.closed = True
        return self._submit(b"", eof=True)

    def _submit(self, data: bytes, eof: bool) -> OperationRef[None]:
        if self.closed and not eof:
            raise SandboxExecutionError("stdin is closed; data can no longer be written to this process")
        seq = self._issued
        self._issued += 1
        return OperationRef.spawn(self._loop, self._send, seq, data, eof)

    async def _send(self, seq: int, data: bytes, eof: bool) -> None:
        while self._turn != seq:
            await self._turn_changed.wait()
        try:
            await self._window.sent.wait()
            view = memoryview(data)
            while True:
                chunk, view = view[:_wire.STDIN_CHUNK_BYTES], view[_wire.STDIN_CHUNK_BYTES:]
                await self._window.put(bytes(chunk), eof and not view)
                if not view:
                    return
        finally:
            self._turn += 1
            self._turn_changed.set()
            self._turn_changed = trio.Event()



class StdinWindow:
    """Flow control of one process's stdin: at most ``STDIN_WINDOW_BYTES`` on their way. The process
    owns it, reports what the agent took (``taken``), and gives it the way to send a chunk."""

    def __init__(self, send: Callable[[bytes, bool], Awaitable[None]], check_open: Callable[[], None]) -> None:
        self._send = send
        self._check_open = check_open  # raises once the process can take no more input
        self.sent = trio.Event()  # the exec frame went out (or never will)
        self._in_flight = 0  # bytes sent and not reported taken
        self._taken = trio.Event()

    async def put(self, chunk: bytes, eof: bool) -> None:
        """Send ``chunk`` once the window has room for it."""
        while self._in_flight and self._in_flight + len(chunk) > _wire.STDIN_WINDOW_BYTES:
            self._check_open()
            await self._taken.wait()
        self._check_open()
        await self._send(chunk, eof)
        self._in_flight += len(chunk)

    def taken(self, n: int) -> None:
        """The agent reports ``n`` more bytes taken by the process (or dropped when it closed stdin)."""
        self._in_flight = max(0, self._in_flight - n)
        self._taken.set()
        self._taken = trio.Event()


class Process(OperationRef[ProcessResult]):
    """A command running in a sandbox. Awaitable / ``.result()`` gives a :class:`ProcessResult`."""

    def __init__(self, link: SandboxLink, argv: list[str], *, cwd: str | None, env: dict | None,
                 timeout: float | None, check: bool, stdin: bool, cap: int, exec_extra: dict | None = None) -> None:
        """Make the process and start its task in the sandbox's loop; ``exec_extra`` adds fields to
        its exec frame (a terminal's "tty")."""
        super().__init__()
        self._link = link
        self._loop: TaskHost = link.host()
        self._argv = argv
        self._cwd, self._env, self._timeout, self._check = cwd, env, timeout, check
        self._exec_extra = exec_extra or {}
        self._out = {1: OutputBuffer(cap), 2: OutputBuffer(cap)}
        self.stdout = StreamReader(self._loop, self._out[1], self._send_credit, self._failure_now)
        self.stderr = StreamReader(self._loop, self._out[2], self._send_credit, self._failure_now)
        self._window = StdinWindow(self._send_stdin, self._check_stdin_open)
        self.stdin: StreamWriter | None = StreamWriter(self._loop, self._window) if stdin else None
        self._req_id = 0
        self._pid: int | None = None
        self._sent = self._window.sent
        self._exited = trio.Event()
        self._exit_code: int | None = None
        self._failure: BaseException | None = None  # why it ended without an exit code
        self._owed = 0  # output bytes received and not yet acknowledged to the agent
        # An exec cancelled before its task ran, or refused by a closing session, never runs _body:
        # its streams must end all the same, or a reader would wait for ever.
        self.add_done_callback(type(self)._end_streams)
        self._launch(self._loop, self._body)

    async def _next_output(self) -> bytes | None:
        """The next raw chunk of stdout (None at EOF), acknowledged as it is taken."""
        return await _take(self._out[1], self._send_credit)

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

    def __await__(self):
        self._request_drain()
        return super().__await__()

    def _request_drain(self) -> None:
        if self.done():
            return
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
        if self._exit_code is None and not self._exited.is_set():
            try:
                await self._link.send({"t": "credit", "id": self._req_id, "n": n})
            except Exception:  # the sandbox is gone; its exit handling reports that
                pass

    def _on_frame(self, frame: dict) -> int:
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
            await link.send({"t": "exec", "id": self._req_id, "argv": self._argv, "cwd": self._cwd,
                                 "env": self._env, "stdin": self.stdin is not None, **self._exec_extra})
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
        if self._failure is not None:
            raise self._failure
        result = self._result()
        if self._check and result.returncode != 0:
            raise SandboxExecutionError(
                f"command {self._argv!r} failed with exit code {result.returncode}",
                sandbox_id=link.sandbox_id(), exec_result=result,
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
