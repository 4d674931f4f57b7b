"""Who reads a connection now: the loop's reader task, or a sync caller's thread that borrowed it.

A sync caller blocked on the answer to its own request may read its connection itself
(``borrow``), so that the answer wakes the caller alone rather than the loop's thread, which then
wakes the caller. The loop's reader keeps off the socket while the reading is borrowed, and after,
while it is *parked*, so that the caller's next request costs the loop nothing either. It reads
again when woken (``unpark``, ``wake_reader``): the loop sends, a borrower gives the reading back
with something left for it, or someone waits for an answer otherwise than by blocking on it; and,
where the connection asks for it, at the latest a bound after it parked (``take``). The loop never
reads while a thread does, and no thread while the loop reads or holds frames it has not handed on
(between ``take`` and ``release``).

One ``ReadRole`` serves one connection (the agent's ``FrameChannel``, a call worker's
``DirectChannel``), under that connection's own lock; the connection says, through three small
functions, whether its reading may be lent (``lendable``: it is open and holds no frames), how a
borrower reads it once (``read``) and what else a woken reader needs (``woken``).
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from typing import Any

import trio

from .._errors import ProtocolError

#: A borrower's poll returns this often (s), so that its caller may look at its request between waits.
BORROW_SLICE = 0.05

Frames = list[dict[str, Any]]


class ReadRole:
    """The reading of one connection's socket ``fd``, lent to threads by its loop's reader.

    ``lock`` is the connection's own (it guards the connection's state too: ``lendable`` is called
    under it); ``read()`` reads the socket once in a borrowing thread: the whole frames ([] if
    none yet), None at the end, raising BlockingIOError if nothing was there and ProtocolError on a
    malformed frame; ``woken()`` runs in the loop's thread after each ``wake_reader``. Made in the
    loop's thread.
    """

    def __init__(self, lock: threading.Lock, fd: int, *, lendable: Callable[[], bool],
                 read: Callable[[], Frames | None], woken: Callable[[], None] | None = None) -> None:
        self._lock = lock
        self._fd = fd
        self._lendable = lendable
        self._read = read
        self._woken = woken
        self._borrowed = False  # a thread reads now
        self._parked = False  # the loop's reader keeps off the socket
        self._loop_reading = False  # the loop reads, or holds frames it has not handed on
        self._lent = False  # a thread borrowed the reading since the reader last waited for the socket
        self._loop_thread = threading.get_ident()
        self._returned = trio.Event()  # set (and replaced) to wake a parked reader
        self._socket_wait: trio.CancelScope | None = None  # the reader's wait for the socket (``wait_readable``)
        self._error: ProtocolError | None = None  # a borrower met a malformed frame: the reader raises it

    def __repr__(self) -> str:
        state = ("borrowed" if self._borrowed else "parked" if self._parked
                 else "loop reading" if self._loop_reading else "loop's")
        return f"<ReadRole fd={self._fd} {state}>"

    @property
    def borrowed(self) -> bool:
        """A thread reads now (read it under the connection's lock to act on it)."""
        return self._borrowed

    @property
    def error(self) -> ProtocolError | None:
        """The malformed frame a borrower met, which the loop's reader raises (``take``)."""
        return self._error

    @property
    def parked(self) -> bool:
        """The loop's reader keeps off the socket (a thread reads, or may soon)."""
        return self._parked

    # -- the loop's reader ------------------------------------------------------------------------

    async def take(self, park_seconds: float | None = None) -> bool:
        """In the loop's reader: wait while a thread reads or the reader is parked, then hold the
        reading until ``release``. Parked, it looks again every ``park_seconds`` (None: only when
        woken) and reads unless a thread does (the peer may speak unasked); a connection no longer
        ``lendable`` unparks it at once. Returns True if a thread borrowed the reading since the
        reader last waited for the socket (``wait_readable``): the socket it saw readable may be
        empty now: the reader waits for it again rather than read (a read that waits would hold the
        reading all that time). Raises the ProtocolError a borrower met."""
        while True:
            with self._lock:
                returned = self._turn()
                if returned is None:
                    self._loop_reading = True
                    return self._lent
            await self._wait(returned, park_seconds)

    async def wait_turn(self, park_seconds: float | None = None) -> None:
        """``take`` without taking the reading: for a reader that may wait for the socket first
        and then ``try_take`` it."""
        while True:
            with self._lock:
                returned = self._turn()
            if returned is None:
                return
            await self._wait(returned, park_seconds)

    def try_take(self) -> bool:
        """In the loop's reader: hold the reading until ``release``; False if a thread borrowed
        it meanwhile (``wait_turn`` again)."""
        with self._lock:
            if self._borrowed or self._parked:
                return False
            self._loop_reading = True
            return True

    def _turn(self) -> trio.Event | None:
        """Under the lock: None if the loop's reader may read now, else the event to wait on."""
        if self._error is not None:
            raise self._error
        if not self._borrowed:
            if not self._lendable():  # (it holds frames, or is closed: read the end)
                self._parked = False
            if not self._parked:
                return None
        return self._returned

    async def _wait(self, returned: trio.Event, park_seconds: float | None) -> None:
        if park_seconds is None:
            await returned.wait()
            return
        with trio.move_on_after(park_seconds):
            await returned.wait()
            return
        with self._lock:  # parked long enough with nobody reading: the peer may have spoken unasked
            if not self._borrowed:
                self._parked = False

    def release(self) -> None:
        """In the loop's reader: it handed on what it read; a thread may borrow the reading."""
        with self._lock:
            self._loop_reading = False

    async def wait_readable(self) -> bool:
        """In the loop's reader, holding the reading: release it and wait for the socket; False
        if ``wake_reader`` cut the wait short (a borrower may have read what it waited for)."""
        with self._lock:
            self._loop_reading = self._lent = False
        try:
            with trio.CancelScope() as scope:
                self._socket_wait = scope
                await trio.lowlevel.wait_readable(self._fd)
            return not scope.cancelled_caught
        finally:
            self._socket_wait = None

    # -- a sync caller's thread -------------------------------------------------------------------

    def borrow(self) -> bool:
        """Take the reading from the loop (a thread other than the loop's); False if it cannot be
        had now (not ``lendable``, the loop reading or holding frames, another borrower, a borrower's
        error unraised). The reader parks until woken. Then ``read_borrowed``; ``give_back`` once done."""
        with self._lock:
            if self._loop_reading or self._borrowed or self._error is not None or not self._lendable():
                return False
            self._borrowed = self._parked = self._lent = True
            return True

    def read_borrowed(self, deadline: float) -> Frames | None:
        """In the borrowing thread: the next whole frames; [] if none came by ``deadline`` (a
        time.monotonic() value) or within ``BORROW_SLICE`` (so that the caller may look at its
        request between waits); None at the end, or on a malformed frame (left for the reader to
        raise)."""
        poller = select.poll()  # not select(): it fails on fds >= 1024
        poller.register(self._fd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(min(left, BORROW_SLICE) * 1000):
                return []
            frames = self._read_once()
            if frames is None or frames:
                return frames

    async def receive_lent(self) -> Frames | None:
        """``read_borrowed`` for a task of the loop that borrowed the reading: waits as a trio
        checkpoint, not a blocking poll, for the next whole frames; None at the end, or on a
        malformed frame (left for the reader to raise). A cancellation lands while it waits, before
        anything is read. A reader waiting on the socket is taken off it (it sees the reading lent,
        and waits for it); a parked one is left asleep."""
        while True:
            if self._socket_wait is not None:
                self._socket_wait.cancel()
            try:
                await trio.lowlevel.wait_readable(self._fd)
            except trio.ClosedResourceError:  # closed under it (``aclose`` waited a second for it)
                return None
            frames = self._read_once()
            if frames is None or frames:
                return frames

    def _read_once(self) -> Frames | None:
        """One read by a borrower: the whole frames ([] if none yet, or nothing was there), None at
        the end or on a malformed frame (kept for the reader to raise)."""
        try:
            return self._read()
        except BlockingIOError:
            return []
        except ProtocolError as exc:
            self._error = exc
            return None

    def give_back(self, stay_parked: bool, hand_over: Callable[[], None] | None = None) -> bool:
        """In the borrowing thread: end the borrowing, first running ``hand_over()`` under the lock
        (the connection takes what the borrower read and did not settle). The reader stays parked
        if ``stay_parked`` (nothing is awaited but what the peer may say unasked), the connection is
        still ``lendable``, no error waits and nobody unparked it meanwhile. True if the reader
        must be woken: ``wake_reader`` in the loop's thread."""
        with self._lock:
            self._borrowed = False
            if hand_over is not None:
                hand_over()
            if stay_parked and self._parked and self._error is None and self._lendable():
                return False
            self._parked = False
            return True

    async def given_back(self) -> None:
        """In the loop's thread: return once no thread reads (a borrower wakes it, ``wake_reader``)."""
        while self._borrowed:
            await self._returned.wait()

    # -- waking the reader ------------------------------------------------------------------------

    def on_send(self) -> None:
        """A request is sent from this thread: from the loop's, its answer is the loop's to read
        (``unpark``); a sync caller's own thread reads it itself, or says it does not."""
        if self._parked and threading.get_ident() == self._loop_thread:
            self.unpark()

    def unpark(self) -> None:
        """In the loop's thread: the reader reads again (once a borrower, if any, gives the reading back)."""
        if self._parked:
            with self._lock:
                self._parked = False
            self.wake_reader()

    def wake_reader(self) -> None:
        """In the loop's thread: wake the reader if it waits for the reading to come back, or for
        the socket (``wait_readable``); then ``woken()``."""
        returned, self._returned = self._returned, trio.Event()
        returned.set()
        if self._socket_wait is not None:
            self._socket_wait.cancel()
        if self._woken is not None:
            self._woken()
