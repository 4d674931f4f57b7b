"""Byte pipes between threads and a trio loop: where gRPC's blocking iterators meet trio Streams.

gRPC's sync API moves stream messages in threads (it pulls a request iterator in a thread of its
own; a response iterator blocks whoever pulls it), while sandpool's frame code wants a trio Stream.
A :class:`ThreadPipe` is one direction: a bounded queue of byte chunks with blocking methods for a
thread and async methods for the trio loop. A reader of either kind takes everything queued at
once, up to a message size, so many small frames cross a thread boundary, and the network, as one
message: this is where batching happens. :class:`PipeStream` pairs two pipes into a trio Stream so
``FrameChannel`` runs over gRPC unchanged.

Wake-ups cost one ``run_sync_soon`` towards trio (a ``HostEvent``) and one condition notify towards
a thread, and only when the other side is actually waiting.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Iterator

import trio

from .._core.hosts import HostEvent

#: Bytes a pipe holds before writers wait (a single larger chunk is still accepted whole).
DEFAULT_LIMIT = 8 * 1024 * 1024
#: Largest chunk a reader takes at once: the size of one gRPC message.
DEFAULT_MESSAGE = 1024 * 1024
#: Pacing of thread readers that make gRPC messages: at most one message per PACE_SECONDS while
#: less than PACE_BYTES is queued. A message after a quiet gap goes at once (no added latency for
#: one-at-a-time calls); a busy stream sends fewer, larger messages, which is what gRPC's
#: per-message cost (thousands per second, not more) needs.
PACE_SECONDS = float(os.environ.get("SANDPOOL_PACE", "0.001"))
PACE_BYTES = 64 * 1024


class ThreadPipe:
    """One direction of bytes between a thread and a trio loop. Thread-safe.

    ``close()`` ends the pipe: readers get what is left, then EOF; writers get
    ``trio.BrokenResourceError`` (trio side) or False (thread side). ``close(error)`` makes the
    reader raise ``error`` (wrapped in BrokenResourceError on the trio side) once drained.
    """

    def __init__(self, *, limit: int = DEFAULT_LIMIT, message_bytes: int = DEFAULT_MESSAGE, pace: float = 0.0) -> None:
        self._cond = threading.Condition()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._limit = limit
        self._message = message_bytes
        self._pace = pace
        self._last_take = 0.0
        self._closed = False
        self.error: BaseException | None = None
        self._trio_waiter: HostEvent | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ThreadPipe {state} {len(self._chunks)} chunks {self._size} bytes>"

    @property
    def closed(self) -> bool:
        return self._closed

    # -- shared, under the lock ------------------------------------------------------------

    def _changed(self) -> HostEvent | None:
        """Wake waiting threads now; return the trio waiter to wake after the lock is released."""
        self._cond.notify_all()
        event, self._trio_waiter = self._trio_waiter, None
        return event

    def _take(self, max_bytes: int) -> bytes:
        pieces, taken = [], 0
        while self._chunks and taken < max_bytes:
            chunk = self._chunks[0]
            room = max_bytes - taken
            if len(chunk) <= room:
                self._chunks.popleft()
            else:
                self._chunks[0] = chunk[room:]
                chunk = chunk[:room]
            pieces.append(chunk)
            taken += len(chunk)
        self._size -= taken
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def close(self, error: BaseException | None = None) -> None:
        """End the pipe (idempotent; the first error given is kept). Callable from any thread."""
        with self._cond:
            if not self._closed:
                self._closed = True
                self.error = error
            event = self._changed()
        if event is not None:
            event.set()

    # -- thread side -------------------------------------------------------------------------

    def put_blocking(self, data: bytes) -> bool:
        """Queue ``data``, waiting while the pipe is full. False if the pipe is closed."""
        with self._cond:
            while self._size >= self._limit and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            if data:
                self._chunks.append(data)
                self._size += len(data)
            event = self._changed()
        if event is not None:
            event.set()
        return True

    def get_blocking(self) -> bytes | None:
        """Everything queued (at least one byte, at most one message), or None at the end."""
        with self._cond:
            while not self._chunks and not self._closed:
                self._cond.wait()
            if not self._chunks:
                return None
            small = self._size < PACE_BYTES
        pause = self._last_take + self._pace - time.monotonic()
        if small and pause > 0:  # messages follow each other closely: gather more per message
            time.sleep(pause)
        with self._cond:
            data = self._take(self._message)
            self._last_take = time.monotonic()
            event = self._changed()
        if event is not None:
            event.set()
        return data

    def drain_iter(self) -> Iterator[bytes]:
        """A blocking iterator of messages until the pipe ends: a gRPC request iterator."""
        while (data := self.get_blocking()) is not None:
            yield data

    # -- trio side ---------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Queue ``data``, waiting while the pipe is full. BrokenResourceError once closed."""
        while True:
            with self._cond:
                if self._closed:
                    raise trio.BrokenResourceError("the pipe is closed") from self.error
                if self._size < self._limit:
                    self._chunks.append(data)
                    self._size += len(data)
                    self._cond.notify_all()
                    break
                waiter = self._trio_waiter = self._trio_waiter or HostEvent.for_trio()
            await waiter.wait()
        await trio.lowlevel.checkpoint()

    async def receive(self, max_bytes: int | None = None) -> bytes:
        """Everything queued up to ``max_bytes`` (at least one byte); b"" at EOF.

        Raises BrokenResourceError (from the error) if the pipe was closed with one."""
        while True:
            with self._cond:
                if self._chunks:
                    data = self._take(max_bytes or self._message)
                    self._cond.notify_all()
                    break
                if self._closed:
                    if self.error is not None:
                        raise trio.BrokenResourceError(str(self.error)) from self.error
                    data = b""
                    break
                waiter = self._trio_waiter = self._trio_waiter or HostEvent.for_trio()
            await waiter.wait()
        await trio.lowlevel.checkpoint()
        return data


class PipeStream(trio.abc.Stream):
    """A trio Stream over two ThreadPipes: bytes in from ``inbound``, out to ``outbound``."""

    def __init__(self, inbound: ThreadPipe, outbound: ThreadPipe,
                 on_close: Callable[[], object] | None = None) -> None:
        self.inbound, self.outbound = inbound, outbound
        self._on_close = on_close

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.outbound.send(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inbound.receive(max_bytes)

    async def aclose(self) -> None:
        self.outbound.close()
        self.inbound.close()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()
        await trio.lowlevel.checkpoint()
