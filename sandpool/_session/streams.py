"""A process's streams as the caller sees them: StreamReader (stdout, stderr) and StreamWriter (stdin),
with the flow-control window of its stdin. The process makes them and hands them what they need."""

from __future__ import annotations

import codecs
import collections
from collections.abc import Awaitable, Callable

import trio

from _sandpool_agent import wire as _wire
from .._core.hosts import Operation, call_in
from .._core.opref import OperationCancelled, OperationRef, TaskHost, check_not_in_trio
from .._core.output import OutputBuffer
from .._errors import SandboxExecutionError

__all__ = ["StdinWindow", "StreamReader", "StreamWriter", "take"]


async def take(buffer: OutputBuffer, credit: Callable[[int], None]) -> bytes | None:
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
        return await take(self._buffer, self._credit)

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

    def _keep_unread(self, ref: Operation[str | None]) -> None:
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
