"""A trio frame channel: wire frames over any trio stream, with one reader and many senders.

Over a socket, a sync caller's thread may also write a frame itself (``send_now``), when no task of
the loop is writing: the loop keeps owning the connection (it settles its end), and a frame never
interleaves with another, as every write happens either under the loop's send lock with ``_busy``
set, or under ``_wire`` with ``_busy`` clear.

The reading may be borrowed the same way (``borrow``, kept by a ``ReadRole``: see ``readrole``): a
sync caller blocked on the answer to its request reads the socket itself, so that answer wakes the
caller alone. The loop's reader reads again as soon as the loop sends (``send``, or ``send_now``
from its thread), on ``unpark``, when a borrower hands it frames it did not take (``give_back``:
the reader takes them first, so frames are handled in the order they came), and at the latest
``PARK_SECONDS`` after it parked (the peer may speak unasked: its end, above all). It holds the
reading from its read until it next waits for the socket. ``aclose`` under a borrower shuts the
socket down (the borrower reads its end and gives the reading back) and closes it only then, or
after a second at most.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
from typing import Any

import trio

from _sandpool_agent import wire as _wire
from .._errors import SandboxUnavailableError
from .readrole import ReadRole


#: A stream may return data without yielding to the scheduler (the fast plane's, a sandbox's): every
#: so many reads, and after a large one, the reader yields all the same, so a peer that keeps sending
#: cannot starve the loop.
_YIELD_EVERY = 16
_LARGE_READ = 1 << 16
#: How long the reader stays parked before it looks again, and reads unless a thread does (s): the
#: longest a frame the peer sends unasked (its end, a main command's exit) waits after a sync caller's
#: request, and how often a thread's long borrowing wakes the loop (as often as the thread itself).
PARK_SECONDS = 0.05


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
        self._wire = threading.Lock()  # guards _busy, _backlog, closed and the reading's role against other threads
        # A plain socket's reading may be borrowed by a sync caller's thread (see the module doc).
        self._sock: socket.socket | None = sock if isinstance(sock, socket.socket) else None
        self._role = ReadRole(self._wire, self._fd, lendable=self._lendable, read=self._read_lent)
        self._shut = False  # aclose was called: the reader reads no more
        self._busy = False  # a task of the loop is writing
        self._backlog = bytearray()  # the end of a frame send_now began: it goes out before anything else
        self._reads = 0
        # The last read emptied the socket: wait before the next one (a borrowable channel also
        # waits before its first, so that a thread may borrow the reading from the start).
        self._drained = self._sock is not None

    async def send(self, frame: dict[str, Any]) -> None:
        """Send one frame. Raises ProtocolError if it is too large, SandboxUnavailableError if the peer is gone."""
        await self.send_bytes(_wire.encode(frame, max_bytes=self._max))

    async def send_many(self, frames: list[dict[str, Any]]) -> None:
        """Send several frames in one write (batching for small frames)."""
        await self.send_bytes(b"".join(_wire.encode(f, max_bytes=self._max) for f in frames))

    async def send_bytes(self, data: bytes) -> None:
        if self.closed:
            raise SandboxUnavailableError("the sandbox's connection is closed")
        self.unpark()  # its answer is the loop's to read
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

    def send_now(self, frame: dict[str, Any], *, answer_seen_to: bool = False) -> bool:
        """Write ``frame`` from this thread (any thread), if no task of the loop is writing: True if
        it went (what the socket did not take at once stays as the backlog, which a task of the loop
        must ``flush``), False if nothing was done (not a socket, closed, busy, a backlog already:
        send it from the loop). Raises ProtocolError if the frame is too large,
        SandboxUnavailableError if the socket broke. From the loop's thread a parked reader reads
        again, unless ``answer_seen_to`` (the sender reads its answer itself, or ``unpark``s the
        reader once it is awaited otherwise)."""
        return self.send_many_now([frame], answer_seen_to=answer_seen_to)

    def send_many_now(self, frames: list[dict[str, Any]], *, answer_seen_to: bool = False) -> bool:
        """``send_now`` for several frames in one write."""
        if self._fd < 0 or self.closed:
            return False
        if not answer_seen_to:
            self._role.on_send()  # from a task of the loop, its answer is the loop's to read
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
            if self._sock is not None:
                if await self._role.take(PARK_SECONDS):
                    self._drained = True  # a thread read meanwhile: wait for the socket again
                if self._ready:
                    continue  # frames a borrower handed back come first
            if self._shut:  # closed here (the reader was woken to see it): the socket's number may be another's
                return None
            self._reads += 1
            try:
                if self._drained and self._fd >= 0:
                    # Wait, rather than try a read that finds nothing: that read would let a sync
                    # caller this loop just woke take the GIL, only to hand it back at once.
                    self._reads = 0
                    if self._sock is not None:  # a thread may borrow the reading meanwhile
                        if await self._role.wait_readable():  # (cut short: nothing may be there: wait again)
                            self._drained = False
                        continue
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

    # -- a sync caller reading the answer to its own request (see ``readrole``) ------------------

    def _lendable(self) -> bool:
        # (under _wire) open, and holding no frames: those the loop must hand on first
        return not self.closed and not self._ready

    def borrow(self) -> bool:
        """Take the reading from the loop (from a thread other than the loop's): False if it cannot
        be had now (not a plain socket, closed, the loop reading or holding frames, another borrower).
        Then ``read_borrowed``, and ``give_back`` once done."""
        return self._sock is not None and self._role.borrow()

    def read_borrowed(self, deadline: float) -> list[dict[str, Any]] | None:
        """In the borrowing thread: the next whole frames; [] if none came by ``deadline`` (a
        time.monotonic() value) or within 50 ms (so that the caller may look at its request between
        waits); None at the end of the stream, or on a malformed frame (left for the reader to raise)."""
        return self._role.read_borrowed(deadline)

    def _read_lent(self) -> list[dict[str, Any]] | None:
        """One read in the borrowing thread (``ReadRole``'s ``read``)."""
        assert self._sock is not None
        try:
            data = self._sock.recv(_LARGE_READ)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            return None
        if not data:
            return None
        return self._decoder.feed(data)

    async def receive_lent(self) -> list[dict[str, Any]] | None:
        """``read_borrowed`` for a task of the loop that borrowed the reading (``ReadRole.receive_lent``)."""
        return await self._role.receive_lent()

    def give_back(self, unread: list[dict[str, Any]], stay_parked: bool) -> bool:
        """In the borrowing thread: end the borrowing. ``unread``: frames it read and did not take,
        which the reader takes first. The reader stays parked if ``stay_parked`` (nothing is awaited
        but what the peer may say unasked), nothing was handed back and nobody unparked it meanwhile.
        True if the reader must be woken: ``wake_reader`` in the loop's thread."""
        return self._role.give_back(stay_parked, lambda: self._ready.extend(unread))

    @property
    def parked(self) -> bool:
        """The loop's reader keeps off the socket (a thread reads, or may soon)."""
        return self._role.parked

    def unpark(self) -> None:
        """In the loop's thread: the reader reads again (once a borrower, if any, gives the reading back)."""
        self._role.unpark()

    def wake_reader(self) -> None:
        """In the loop's thread: wake the reader if it waits for the reading to come back, or for
        the socket (a borrower may have read what it waits for, and handed it back)."""
        self._role.wake_reader()

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
        self._shut = True
        self._role.wake_reader()  # a parked reader sees the end
        with trio.CancelScope(shield=True):
            if self._role.borrowed:  # wake the borrower (it reads the end) and close once it gave the socket back
                assert self._sock is not None
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                with trio.move_on_after(1.0):
                    await self._role.given_back()
            await self._stream.aclose()
