"""The connection straight to a sandbox's call worker: wire frames over a non-blocking Unix socket.

Unlike FrameChannel it can send synchronously: ``send_now`` writes what the socket takes at once
and keeps the rest for ``flush``, so a lone call leaves in the same step of the trio loop that
scheduled it. One task reads (``receive_batch``); ``send_now`` may also be called from a sync
caller's own thread (under its pool's lock), so it and ``close`` hold a lock of their own.

The worker reads no calls while one of its calls runs, so what it has not taken may wait here for
as long: a frame not begun yet can be taken back (``take_back``), to run elsewhere or not at all.

The sync fast path, shared by pools and actors (``SyncEntry``): a sync caller's lone call that the
loop would send at once anyway (an idle connection, nothing queued or on its way before it) is
written to the worker's socket from the caller's own thread, so its round trip wakes the loop once
(for the answer), not twice. Every loop-side entry point of such an owner holds its ``lock``
(``locked``); calls that cannot go at once travel to the loop in the order they were made.

The answer's way back without the loop (``borrow``, kept by a ``ReadRole``: see
``_core.readrole``): a sync caller blocked on the result of its call, the only one its connection
holds, may read the connection itself, so the answer wakes the caller alone. The loop's reader
stays parked after, while the connection holds no call, and reads again (``unpark``) as soon as
anything else may come: the loop sends on the connection, a borrower hands it frames it cannot
settle alone or gives up waiting, or someone waits for a call by other means than blocking on it.
Whatever a borrower reads and cannot settle goes to the loop before the reader reads on, so answers
are handled in the order they came. Closed under a borrower, the socket is shut down (the borrower
reads its end) and closed once the reading is given back.
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import stat
import functools
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import trio

from . import bulk as _bulk
from _sandpool_agent import wire as _wire
from .._core.readrole import ReadRole
from .._errors import ProtocolError, SandboxNotRunningError

_READ_BYTES = 1 << 20
_F = TypeVar("_F", bound=Callable[..., Any])


class SyncEntry:
    """The sync fast path's state in its owner (a pool, an actor's link): ``lock`` (reentrant: a
    ref's callbacks may submit again) and the count of submissions on their way to the loop."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.in_transit = 0  # submissions from other threads, not yet taken in the loop's

    def enter(self, loop: Any, now: Callable[[], bool], later: Callable[[], None]) -> None:
        """From a thread other than the loop's (``loop``: the session's TaskHost): ``now()`` under
        the lock (it sends the call at once and returns True, or returns False: it cannot), else
        ``later()`` soon in the loop's thread, under the lock, after what was entered before. Called
        with nothing in transit only, ``now`` cannot overtake a call made before. Nothing happens
        if the loop has ended (the session closed, which cancelled every call)."""
        with self.lock:
            if not self.in_transit and now():
                return
            self.in_transit += 1
        try:
            loop.call_soon(self._arrive, later)
        except RuntimeError:
            with self.lock:
                self.in_transit -= 1

    def _arrive(self, later: Callable[[], None]) -> None:
        with self.lock:
            self.in_transit -= 1
            later()


def locked(method: _F) -> _F:
    """Run a method of a fast path's owner under its ``lock`` (a sync caller's thread may be
    sending a call)."""
    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)
    return run  # type: ignore[return-value]  # functools.wraps keeps the method's signature


class _Wakes(Protocol):
    wake: trio.Event  # the loop-side task's: replaced by a new one once set


def wake_from_thread(loop: Any, owner: _Wakes) -> Callable[[], None]:
    """A function that sets ``owner.wake`` (trio's alone, so in the loop's thread) from any thread."""
    def set_soon() -> None:
        try:
            loop.call_soon(lambda: owner.wake.set())
        except RuntimeError:  # the loop has ended, and the task with it
            pass
    return set_soon


def send_at_once(direct: DirectChannel, frames: list[dict[str, Any]], wake: Callable[[], None]) -> None:
    """Hand ``frames`` to ``direct``, which writes what the socket takes now; ``wake()`` the task
    that writes the rest (``flush_until``). A broken connection is not this caller's to report:
    the worker's end settles its calls."""
    try:
        direct.send_now(frames)
    except SandboxNotRunningError:
        pass
    if not direct.idle:
        wake()


async def flush_until(direct: DirectChannel, wake: trio.Event) -> None:
    """Write what ``direct`` holds until it is drained or ``wake`` is set (there is something else
    to do: the worker may read again only once a cancel that waits to be sent went out).
    SandboxNotRunningError if the connection broke."""
    if direct.idle:
        return
    error = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_when_set, wake, nursery.cancel_scope)
        try:
            await direct.flush()
        except SandboxNotRunningError as exc:  # raised below, not as an exception group
            error = exc
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


class WorkerRequest:
    """The pending ``worker`` request that starts a direct worker (a pool slot's or an actor's):
    answered ``started``, then ``exit`` when the worker ends (or an ``error`` refusing to start it)."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.ok = False
        self.exited = trio.Event()
        self.exit: dict[str, Any] = {}
        self.on_end: Callable[[], None] | None = None  # told when the worker or its sandbox ends

    def _on_frame(self, frame: dict[str, Any]) -> int:
        if frame["t"] == "started":
            self.ok = True
            self.started.set()
        else:  # "exit", or an "error" refusing to start it
            self.exit = frame
            self.started.set()
            self.exited.set()
            if self.on_end is not None:
                self.on_end()
        return 0

    def _on_sandbox_gone(self, error: BaseException) -> None:
        self.started.set()
        self.exited.set()
        if self.on_end is not None:
            self.on_end()


class DirectChannel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._decoder = _wire.FrameBuffer()
        self._pending = bytearray()  # encoded frames the socket has not taken yet
        self._frames: collections.deque[list[int]] = collections.deque()  # [id, size, unsent] of each, in order
        self.closed = False
        self._lock = threading.Lock()  # send_now (any thread) against close (the loop's)
        self._drained = False  # the last read took less than it asked for: the socket is empty
        # Who reads (see the module doc): the loop's reader, or a thread that borrowed the reading.
        self._role = ReadRole(self._lock, sock.fileno(), lendable=lambda: not self.closed, read=self._read,
                              woken=self._close_if_returned)
        self._close_when_returned = False  # closed while borrowed: closed once given back (wake_reader)

    @classmethod
    async def connect(cls, directory: str, name: str) -> DirectChannel:
        """Connect to the socket ``name`` in ``directory`` (through /proc/self/fd, so the address
        stays short wherever the directory is). OSError if nobody listens there. The directory is
        the sandbox's /tmp, so the sandbox may have replaced it or the socket with a link to this
        host's own sockets: neither may be a link, and ``name`` must be a socket."""
        dirfd = _bulk.open_dir(directory)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if not stat.S_ISSOCK(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
                raise OSError(errno.EINVAL, f"{name!r} in the sandbox's {directory!r} is not a socket")
            sock.setblocking(False)
            try:
                sock.connect(f"/proc/self/fd/{dirfd}/{name}")
            except BlockingIOError:  # the listener's backlog is full: wait until it accepts
                await trio.lowlevel.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error))
        except BaseException:
            sock.close()
            raise
        finally:
            os.close(dirfd)
        return cls(sock)

    @property
    def idle(self) -> bool:
        """Nothing waits to be written (or nothing will be: the connection is closed)."""
        return not self._pending or self.closed

    def send_now(self, frames: list[dict[str, Any]]) -> None:
        """Queue frames and write what the socket takes now (never blocks; ``flush`` sends the rest).
        From the loop's thread, the reader reads again (their answers are the loop's to read)."""
        self._role.on_send()
        with self._lock:
            self._send_now(frames)

    def _send_now(self, frames: list[dict[str, Any]]) -> None:
        if self.closed:
            raise SandboxNotRunningError("the connection to the sandbox's call worker is closed")
        encoded = [_wire.encode(f) for f in frames]
        data = b"".join(encoded)
        sent = 0
        if not self._pending:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                pass
            except OSError as exc:
                self.closed = True
                raise SandboxNotRunningError(f"the call worker's connection broke: {exc!r}") from exc
        if sent < len(data):
            self._pending += data[sent:]
            for frame, chunk in zip(frames, encoded):  # the ones not wholly sent, for take_back
                if sent < len(chunk):
                    self._frames.append([frame["id"], len(chunk), len(chunk) - sent])
                sent = max(0, sent - len(chunk))

    def held(self) -> set[int]:
        """The ids of the frames of which some waits here to be sent (none once closed)."""
        return set() if self.closed else {fid for fid, _, _ in self._frames}

    def take_back(self, frame_id: int) -> bool:
        """Remove the frame ``frame_id`` if none of it was sent yet; False if it was, or is unknown,
        or the connection is closed (the worker's end then settles its calls)."""
        if self.closed:
            return False
        offset = 0
        for index, (fid, size, unsent) in enumerate(self._frames):
            if fid == frame_id and unsent == size:
                del self._pending[offset:offset + size]
                del self._frames[index]
                return True
            offset += unsent
        return False

    def _sent(self, count: int) -> None:
        del self._pending[:count]
        while count and self._frames:
            head = self._frames[0]
            taken = min(count, head[2])
            head[2] -= taken
            count -= taken
            if not head[2]:
                self._frames.popleft()

    async def flush(self) -> None:
        """Write everything still queued (waiting while the worker does not read)."""
        while self._pending and not self.closed:
            await trio.lowlevel.wait_writable(self.sock)
            try:
                sent = self.sock.send(self._pending)
            except BlockingIOError:
                continue
            except OSError as exc:
                self.closed = True
                raise SandboxNotRunningError(f"the call worker's connection broke: {exc!r}") from exc
            self._sent(sent)

    async def receive_batch(self) -> list[dict[str, Any]] | None:
        """The frames available now (at least one), or None at EOF. ProtocolError if malformed.
        Waits while a thread has borrowed the reading (``borrow``)."""
        while True:
            await self._role.wait_turn()
            if self._drained:  # the last read emptied the socket: wait, rather than read in vain
                self._drained = False
                await trio.lowlevel.wait_readable(self.sock)
                continue
            if not self._role.try_take():
                continue
            try:
                frames = self._read()
            except BlockingIOError:
                frames = []
            finally:
                self._role.release()
            if frames is None or frames:
                return frames
            await trio.lowlevel.wait_readable(self.sock)

    def _read(self) -> list[dict[str, Any]] | None:
        """One read of what the socket holds, decoded: the whole frames, or None at EOF (closed).
        BlockingIOError if nothing was there; ProtocolError if a frame is malformed or not an answer."""
        try:
            data = self.sock.recv(_READ_BYTES)
        except BlockingIOError:
            raise
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return None
        self._drained = len(data) < _READ_BYTES
        frames = self._decoder.feed(data)
        for frame in frames:  # the worker is inside the sandbox: it answers calls, and says nothing else
            if frame["t"] not in ("result", "error"):
                raise ProtocolError(f"the call worker sent a {frame['t']!r} frame", frame=_wire.summary(frame))
        return frames

    # -- a sync caller reading its own answer (see the module doc) -----------------------------

    @property
    def parked(self) -> bool:
        """The loop's reader keeps off the socket (a borrower reads, or will: see the module doc)."""
        return self._role.parked

    @property
    def borrowed(self) -> bool:
        """A thread reads the socket now."""
        return self._role.borrowed

    def borrow(self) -> bool:
        """Take the reading from the loop (a thread other than the loop's); False if it cannot be
        had (closed, the loop reading now, another borrower). The reader parks until woken.
        ``give_back`` once done."""
        return self._role.borrow()

    def read_borrowed(self, deadline: float) -> list[dict[str, Any]] | None:
        """In the borrowing thread: the next frames, [] if none came by ``deadline`` (a
        time.monotonic() value) or within 50 ms (so that its caller can look at its call between
        waits), None at EOF or on a malformed frame (left for the loop to raise)."""
        return self._role.read_borrowed(deadline)

    def give_back(self, stay_parked: bool) -> bool:
        """In the borrowing thread: end the borrowing; the reader stays parked if ``stay_parked``
        (nothing more to read: the connection holds no call), the connection is open and nobody
        unparked it meanwhile. True if the reader must be woken (``wake_reader`` in the loop's
        thread), which also closes the socket if the channel was closed meanwhile."""
        return self._role.give_back(stay_parked)

    def unpark(self) -> None:
        """In the loop's thread: the reader reads again (unless a borrower reads now: it gives the
        reading back to the reader when done)."""
        self._role.unpark()

    def wake_reader(self) -> None:
        """In the loop's thread: wake the reader if it waits for the reading to come back; close
        the socket if ``close`` left that to the borrower, who is done."""
        self._role.wake_reader()

    def _close_if_returned(self) -> None:
        with self._lock:
            if self._close_when_returned and not self._role.borrowed and self.sock.fileno() >= 0:
                trio.lowlevel.notify_closing(self.sock)
                self.sock.close()

    def close(self) -> None:
        """Close the socket (in the loop's thread). A borrowing thread is woken (the socket is shut
        down); the socket is closed once it gave the reading back (``wake_reader``)."""
        with self._lock:
            self.closed = True
            if self.sock.fileno() < 0:
                return
            if self._role.borrowed:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._close_when_returned = True
                return
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
