"""A trio frame channel: wire frames over any trio stream, with one reader and many senders.

Over a socket, a sync caller's thread may also write a frame itself (``send_now``), when no task of
the loop is writing: the loop keeps owning the connection (it reads every frame, and settles its
end), and a frame never interleaves with another, as every write happens either under the loop's
send lock with ``_busy`` set, or under ``_wire`` with ``_busy`` clear.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any

import trio

from _sandpool_agent import wire as _wire
from .._errors import SandboxUnavailableError


#: A stream may return data without yielding to the scheduler (the fast plane's, a sandbox's): every
#: so many reads, and after a large one, the reader yields all the same, so a peer that keeps sending
#: cannot starve the loop.
_YIELD_EVERY = 16
_LARGE_READ = 1 << 16


class FrameChannel:
    """Sends and receives wire frames on ``stream``.

    ``receive`` is for exactly one reader task; ``send`` may be called by any number of tasks (a
    lock keeps frames whole), and ``send_now`` by any thread. Transport errors become
    :class:`SandboxUnavailableError`.
    """

    def __init__(self, stream: trio.abc.Stream, *, max_frame_bytes: int = _wire.MAX_FRAME_BYTES) -> None:
        self._stream = stream
        self._decoder = _wire.FrameBuffer(max_bytes=max_frame_bytes)
        self._ready: collections.deque[dict[str, Any]] = collections.deque()
        self._send_lock = trio.Lock()
        self._max = max_frame_bytes
        self.closed = False
        # The socket's descriptor, for writes from other threads (-1: not a socket, never then). A
        # stream with a ``socket`` (trio's SocketStream, the fast plane's) closes it only when this
        # channel closes it, so the number is never another file's while the channel is open.
        sock = getattr(stream, "socket", None)
        self._fd = sock.fileno() if sock is not None else -1
        self._wire = threading.Lock()  # guards _busy, _backlog and closed against send_now's thread
        self._busy = False  # a task of the loop is writing
        self._backlog = bytearray()  # the end of a frame send_now began: it goes out before anything else
        self._reads = 0
        self._drained = False  # the last read emptied the socket: wait before the next one

    async def send(self, frame: dict[str, Any]) -> None:
        """Send one frame. Raises ProtocolError if it is too large, SandboxUnavailableError if the peer is gone."""
        await self.send_bytes(_wire.encode(frame, max_bytes=self._max))

    async def send_many(self, frames: list[dict[str, Any]]) -> None:
        """Send several frames in one write (batching for small frames)."""
        await self.send_bytes(b"".join(_wire.encode(f, max_bytes=self._max) for f in frames))

    async def send_bytes(self, data: bytes) -> None:
        if self.closed:
            raise SandboxUnavailableError("the sandbox's connection is closed")
        async with self._send_lock:
            with self._wire:
                self._busy = True
                if self._backlog:
                    data, self._backlog = bytes(self._backlog) + data, bytearray()
            try:
                if data:
                    await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._close_now()
                raise SandboxUnavailableError(f"the sandbox's connection broke: {exc!r}") from exc
            finally:
                with self._wire:
                    self._busy = False

    @property
    def backlogged(self) -> bool:
        """Part of a frame ``send_now`` began waits to be sent: ``flush`` sends it."""
        return bool(self._backlog)

    async def flush(self) -> None:
        """Send what ``send_now`` left (a task of the loop); errors are the reader's to report."""
        try:
            await self.send_bytes(b"")
        except SandboxUnavailableError:
            pass

    def send_now(self, frame: dict[str, Any]) -> bool:
        """Write ``frame`` from this thread (any thread), if no task of the loop is writing: True if
        it went (what the socket did not take at once stays as the backlog, which a task of the loop
        must ``flush``), False if nothing was done (not a socket, closed, busy, a backlog already:
        send it from the loop). Raises ProtocolError if the frame is too large,
        SandboxUnavailableError if the socket broke."""
        return self.send_many_now([frame])

    def send_many_now(self, frames: list[dict[str, Any]]) -> bool:
        """``send_now`` for several frames in one write."""
        if self._fd < 0 or self.closed:
            return False
        data = b"".join([_wire.encode(f, max_bytes=self._max) for f in frames])
        with self._wire:
            if self.closed or self._busy or self._backlog:
                return False
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.closed = True
                raise SandboxUnavailableError(f"the sandbox's connection broke: {exc!r}") from exc
            if sent < len(data):
                self._backlog += data[sent:]
        return True

    def _close_now(self) -> None:
        with self._wire:
            self.closed = True

    async def receive(self) -> dict[str, Any] | None:
        """The next frame, or None at EOF. A malformed frame raises ProtocolError."""
        while not self._ready:
            self._reads += 1
            try:
                if self._drained and self._fd >= 0:
                    # Wait, rather than try a read that finds nothing: that read would let a sync
                    # caller this loop just woke take the GIL, only to hand it back at once.
                    self._reads = 0
                    await trio.lowlevel.wait_readable(self._fd)
                elif self._reads >= _YIELD_EVERY:  # a stream that never waits while data comes: be fair
                    self._reads = 0
                    await trio.lowlevel.checkpoint()
                data = await self._stream.receive_some(1 << 20)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                self._close_now()
                return None
            self._drained = len(data) < _LARGE_READ
            if not self._drained:
                self._reads = _YIELD_EVERY - 1  # the next read yields first
            self._ready.extend(self._decoder.feed(data))
        return self._ready.popleft()

    async def receive_batch(self) -> list[dict[str, Any]] | None:
        """Every frame available now (at least one), or None at EOF."""
        first = await self.receive()
        if first is None:
            return None
        batch = [first, *self._ready]
        self._ready.clear()
        return batch

    async def handshake(self, **extra: object) -> dict[str, Any]:
        """Exchange hello frames; return the peer's. ProtocolError on a bad or missing hello.

        A peer that spoke and ended before our hello reached it (an agent whose main command finished
        within milliseconds) is still heard: its hello, and what it said after, remain readable.
        """
        try:
            await self.send(_wire.hello(**extra))
        except SandboxUnavailableError:
            pass  # if it said nothing either, the receive below reports the broken connection
        frame = await self.receive()
        if frame is None:
            raise SandboxUnavailableError("the sandbox closed its connection before the handshake")
        return _wire.check_hello(frame)

    async def aclose(self) -> None:
        self._close_now()
        with trio.CancelScope(shield=True):
            await self._stream.aclose()
