"""The read role of a connection (``ReadRole``): who reads its socket now, the loop's reader or a
sync caller's thread that borrowed the reading; parking; waking. Real socketpairs, real threads,
real trio loops (trio's virtual clock where the park's bound is the point)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import trio
import trio.testing

from _sandpool_agent import wire as _wire
from sandpool._core.readrole import ReadRole
from sandpool._errors import ProtocolError


class Connection:
    """What a channel gives its read role: one end of a socketpair (``peer`` writes the other), its
    lock, whether it is closed and the frames it holds for the loop. Made in a trio loop."""

    def __init__(self) -> None:
        self.sock, self.peer = socket.socketpair()
        self.sock.setblocking(False)
        self.lock = threading.Lock()
        self.closed = False
        self.held: list[dict] = []
        self.decoder = _wire.FrameBuffer()
        self.woken = 0
        # Who holds the reading by the harness's own account (the loop's reader from ``take`` to
        # its release, a thread from ``borrow`` to ``give_back``), and how often both did at once.
        self.loop_holds = self.thread_holds = False
        self.overlaps = 0
        self.role = ReadRole(self.lock, self.sock.fileno(), lendable=self.lendable, read=self.read,
                             woken=self.on_woken)

    def lendable(self) -> bool:
        assert self.lock.locked(), "lendable is asked under the connection's lock"
        return not self.closed and not self.held

    def read(self) -> list[dict] | None:
        data = self.sock.recv(1 << 16)
        return self.decoder.feed(data) if data else None

    def on_woken(self) -> None:
        self.woken += 1

    def send(self, *ids: int) -> None:
        self.peer.sendall(b"".join(_wire.encode({"t": "result", "id": i}) for i in ids))

    async def loop_read(self, seen: Tally | None = None) -> list[dict] | None:
        """The loop's reader, as a channel's: hold the reading, read what is there (waiting for the
        socket meanwhile, the reading released), note it in ``seen``, and only then release it."""
        while True:
            await self.role.take()
            self.hold("loop")
            try:
                frames = self.read()
            except BlockingIOError:
                self.loop_holds = False
                await self.role.wait_readable()
                continue
            if seen is not None and frames:
                seen.note(frames)
            self.loop_holds = False
            self.role.release()
            return frames

    def hold(self, who: str) -> None:
        """``who`` (the loop, a thread) took the reading: count it if the other holds it too."""
        if self.thread_holds if who == "loop" else self.loop_holds:
            self.overlaps += 1
        if who == "loop":
            self.loop_holds = True
        else:
            self.thread_holds = True

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


class Tally:
    """The ids of the frames read so far, whoever read them, in the order they were noted."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self._changed = threading.Condition()

    def note(self, frames: list[dict]) -> None:
        with self._changed:
            self.ids.extend(frame["id"] for frame in frames)
            self._changed.notify_all()

    def wait_for(self, count: int) -> bool:
        """Until ``count`` frames were noted (False after 30 s: the test fails on what was seen)."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self.ids) >= count, timeout=30)


def run(main, **kwargs) -> None:
    trio.run(main, **kwargs)


async def returns_only_after(wait, free) -> None:
    """``wait()``, in a task of the loop, returns only once ``free()`` (awaited) ran."""
    done = trio.Event()

    async def waiter() -> None:
        await wait()
        done.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            await free()
    assert done.is_set()


def given_back(role: ReadRole, stay_parked: bool):
    """What a borrowing thread does when done (``stay_parked`` must wake the reader), then the loop."""
    async def give_back() -> None:
        assert await trio.to_thread.run_sync(role.give_back, stay_parked)
        role.wake_reader()

    return give_back


def test_a_borrowed_reading_keeps_the_loop_reader_off_until_unparked():
    """A thread borrows the reading while the loop's reader waits for the socket: the thread reads
    the peer's frame, the loop's reader none; given back parked, the reader reads nothing more until
    ``unpark``, then the next frame."""
    async def main() -> None:
        conn = Connection()
        sent, received = trio.open_memory_channel[list](10)

        async def reader() -> None:
            while True:
                await sent.send(await conn.loop_read())

        def borrower() -> tuple[list[dict] | None, bool]:
            assert conn.role.borrow()
            conn.send(1)
            frames = conn.role.read_borrowed(time.monotonic() + 30)
            return frames, conn.role.give_back(True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            frames, wake = await trio.to_thread.run_sync(borrower)
            assert frames == [{"t": "result", "id": 1}]
            assert wake is False and conn.role.parked and not conn.role.borrowed
            conn.send(2)
            await trio.testing.wait_all_tasks_blocked()  # (trio looks at the socket before this returns)
            with pytest.raises(trio.WouldBlock):
                received.receive_nowait()
            conn.role.unpark()
            assert await received.receive() == [{"t": "result", "id": 2}]
            assert not conn.role.parked
            nursery.cancel_scope.cancel()
        conn.close()

    run(main)


def test_the_reading_is_lent_to_one_thread_and_never_while_the_loop_holds_it():
    """``borrow`` fails while the loop's reader holds the reading (from ``take`` to ``release``),
    while another thread has it, and while the connection is not lendable (closed, or holding
    frames for the loop); else it succeeds and parks the reader."""
    async def main() -> None:
        conn = Connection()
        borrow = conn.role.borrow
        await conn.role.take()
        assert not await trio.to_thread.run_sync(borrow)
        conn.role.release()
        assert await trio.to_thread.run_sync(borrow)
        assert conn.role.borrowed and conn.role.parked
        assert not await trio.to_thread.run_sync(borrow)  # another borrower
        assert conn.role.give_back(False)
        conn.held.append({"t": "result", "id": 1})
        assert not await trio.to_thread.run_sync(borrow)
        conn.held.clear()
        conn.closed = True
        assert not await trio.to_thread.run_sync(borrow)
        conn.closed = False
        assert await trio.to_thread.run_sync(borrow)
        conn.role.give_back(False)
        conn.close()

    run(main)


@pytest.mark.parametrize("meanwhile, stays", [
    ("nothing", True),
    ("unparked", False),
    ("closed", False),
    ("handed over", False),
])
def test_give_back_keeps_the_reader_parked_only_when_nothing_else_may_come(meanwhile, stays):
    """Given back with ``stay_parked``, the reader stays parked (False: no need to wake it) unless
    it was unparked meanwhile, the connection closed, or the borrower handed it frames; then
    True and the reader is unparked. ``hand_over`` runs under the lock, before that decision."""
    async def main() -> None:
        conn = Connection()
        assert await trio.to_thread.run_sync(conn.role.borrow)
        if meanwhile == "unparked":
            conn.role.unpark()
            assert conn.role.borrowed  # (the borrower still reads: only its end gives the reading back)
        elif meanwhile == "closed":
            conn.closed = True

        def hand_over() -> None:
            assert conn.lock.locked()
            if meanwhile == "handed over":
                conn.held.append({"t": "result", "id": 1})

        wake = await trio.to_thread.run_sync(conn.role.give_back, True, hand_over)
        assert wake is not stays
        assert conn.role.parked is stays and not conn.role.borrowed
        conn.close()

    run(main)


def test_give_back_without_stay_parked_always_wakes():
    """A borrower that gives up (``stay_parked`` False) always hands the reading back to the loop."""
    async def main() -> None:
        conn = Connection()
        assert await trio.to_thread.run_sync(conn.role.borrow)
        assert await trio.to_thread.run_sync(conn.role.give_back, False)
        assert not conn.role.parked
        conn.close()

    run(main)


def test_a_parked_reader_looks_again_after_its_bound_unless_a_thread_reads():
    """Parked with nobody reading, ``take(park_seconds)`` takes the reading back after that bound
    (the peer may speak unasked); with a thread reading, it waits on past the bound; with no bound
    (None) it waits until woken."""
    async def main() -> None:
        conn = Connection()
        role = conn.role
        assert role.borrow() and not role.give_back(True)  # parked, nobody reading
        start = trio.current_time()
        with trio.fail_after(2 * 3600):
            await role.take(park_seconds=3600)
        assert trio.current_time() - start == pytest.approx(3600)
        assert not role.parked
        role.release()

        assert role.borrow()  # a thread reads: the bound passes, the reader waits on
        with trio.move_on_after(3 * 3600) as scope:
            await role.take(park_seconds=3600)
        assert scope.cancelled_caught and role.parked and role.borrowed
        assert not role.give_back(True)

        with trio.move_on_after(10 ** 6) as scope:  # no bound: parked until woken
            await role.take()
        assert scope.cancelled_caught and role.parked
        conn.close()

    run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_an_unparked_reader_still_waits_for_the_borrower():
    """Unparked while a thread reads (the loop sent something), the reader takes the reading only
    once the thread gave it back and woke it."""
    async def main() -> None:
        conn = Connection()
        assert await trio.to_thread.run_sync(conn.role.borrow)
        conn.role.unpark()
        assert not conn.role.parked and conn.role.borrowed
        await returns_only_after(conn.role.take, given_back(conn.role, True))
        conn.role.release()
        conn.close()

    run(main)


def test_a_reader_may_wait_its_turn_without_holding_the_reading():
    """``wait_turn`` waits while the reading is lent, as ``take`` does, but holds nothing: a thread
    may borrow after it, and ``try_take`` then fails until the reading is given back."""
    async def main() -> None:
        conn = Connection()
        role = conn.role
        assert role.borrow() and not role.give_back(True)  # parked

        async def unpark() -> None:
            role.unpark()

        await returns_only_after(role.wait_turn, unpark)
        assert await trio.to_thread.run_sync(role.borrow)
        assert not role.try_take()
        assert await trio.to_thread.run_sync(role.give_back, False)
        assert role.try_take()
        assert not await trio.to_thread.run_sync(role.borrow)
        role.release()
        conn.close()

    run(main)


def test_a_closed_connection_unparks_its_reader():
    """A parked reader of a connection that closed (nothing more to lend) reads at once: its end."""
    async def main() -> None:
        conn = Connection()
        assert conn.role.borrow() and not conn.role.give_back(True)
        conn.closed = True
        with trio.fail_after(10):
            await conn.role.take()
        assert not conn.role.parked
        conn.close()

    run(main)


def test_the_readers_wait_for_the_socket_lends_the_reading_and_is_cut_short_by_a_wake():
    """While the loop's reader waits for the socket (``wait_readable``), a thread may borrow the
    reading; ``wake_reader`` cuts that wait short (False) and runs ``woken``; data ends it (True).
    ``take`` tells whether the reading was lent since the reader last waited for the socket."""
    async def main() -> None:
        conn = Connection()
        results: list[bool] = []

        async def wait() -> None:
            results.append(await conn.role.wait_readable())

        assert await conn.role.take() is False
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                assert await trio.to_thread.run_sync(conn.role.borrow)
                assert conn.role.give_back(False)
                conn.role.wake_reader()
        assert results == [False] and conn.woken == 1

        assert await conn.role.take() is True  # lent meanwhile: what the reader saw may be stale
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                conn.send(1)
        assert results == [False, True]
        assert await conn.role.take() is False
        conn.close()

    run(main)


def test_a_malformed_frame_a_borrower_reads_is_the_loop_readers_to_raise():
    """A borrower that reads a malformed frame gets None; the reading is not lent again, giving it
    back wakes the reader even if asked to stay parked, and the reader raises the ProtocolError."""
    async def main() -> None:
        conn = Connection()
        role = conn.role

        def borrower() -> tuple[list[dict] | None, bool]:
            assert role.borrow()
            conn.peer.sendall(b"\xff" * 16)  # a header announcing a frame above every limit
            frames = role.read_borrowed(time.monotonic() + 30)
            return frames, role.give_back(True)

        frames, wake = await trio.to_thread.run_sync(borrower)
        assert frames is None and wake and not role.parked
        assert isinstance(role.error, ProtocolError)
        assert not await trio.to_thread.run_sync(role.borrow)
        with pytest.raises(ProtocolError):
            await role.take()
        conn.close()

    run(main)


def test_read_borrowed_returns_between_waits_and_at_the_end():
    """A borrower's read returns [] when nothing came within a slice (well before a far deadline),
    or at once past its deadline; None once the peer closed."""
    async def main() -> None:
        conn = Connection()
        role = conn.role

        def borrower() -> list:
            assert role.borrow()
            start = time.monotonic()
            slice_ = role.read_borrowed(start + 20)
            waited = time.monotonic() - start
            late = role.read_borrowed(time.monotonic() - 1)
            conn.peer.shutdown(socket.SHUT_WR)
            end = role.read_borrowed(time.monotonic() + 20)
            role.give_back(False)
            return [slice_, waited, late, end]

        slice_, waited, late, end = await trio.to_thread.run_sync(borrower)
        assert slice_ == [] and waited < 10
        assert late == [] and end is None
        conn.close()

    run(main)


def test_only_a_send_from_the_loops_thread_unparks():
    """A request sent from the loop's thread is the loop's to read: ``on_send`` unparks there; from
    a sync caller's thread it leaves the reader parked (that thread reads its own answer)."""
    async def main() -> None:
        conn = Connection()
        role = conn.role
        assert role.borrow() and not role.give_back(True)
        await trio.to_thread.run_sync(role.on_send)
        assert role.parked and conn.woken == 0
        role.on_send()
        assert not role.parked and conn.woken == 1
        conn.close()

    run(main)


def test_given_back_waits_for_the_borrower():
    """``given_back`` (a closing connection's wait) returns once the borrowing thread gave the
    reading back and the reader was woken, not before."""
    async def main() -> None:
        conn = Connection()
        assert await trio.to_thread.run_sync(conn.role.borrow)
        await returns_only_after(conn.role.given_back, given_back(conn.role, False))
        conn.close()

    run(main)


def test_the_loop_and_a_thread_never_read_at_once():
    """The loop's reader and a thread that borrows whenever it can share one socket and one decoder
    while a peer sends numbered frames, a few at a time once the last were read: every frame is
    read once, in order, and both read some; half the time the loop unparks its reader while the
    thread reads."""
    count = 1500

    async def main() -> None:
        conn = Connection()
        seen = Tally()
        by_thread = 0

        def peer() -> None:
            for first in range(0, count, 3):
                conn.send(*range(first, min(first + 3, count)))
                if not seen.wait_for(min(first + 3, count)):
                    return

        def borrower() -> None:
            nonlocal by_thread
            borrows = 0
            while len(seen.ids) < count:
                if not conn.role.borrow():
                    trio.from_thread.run_sync(lambda: None)  # let the loop's reader go on
                    continue
                conn.hold("thread")
                borrows += 1
                if borrows % 2:  # the loop sends meanwhile: its reader reads once the thread is done
                    trio.from_thread.run_sync(conn.role.unpark)
                try:
                    frames = conn.role.read_borrowed(time.monotonic() + 0.01)
                    if frames:
                        by_thread += len(frames)
                        seen.note(frames)
                finally:
                    conn.thread_holds = False
                    if conn.role.give_back(False):
                        trio.from_thread.run_sync(conn.role.wake_reader)

        async def reader() -> None:
            while True:
                await conn.loop_read(seen)

        sender = threading.Thread(target=peer)
        sender.start()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.to_thread.run_sync(borrower)  # until every frame was seen, by either
                nursery.cancel_scope.cancel()
        sender.join()
        assert seen.ids == list(range(count))
        assert conn.overlaps == 0
        assert 0 < by_thread < count
        conn.close()

    run(main)


def test_repr_tells_who_reads():
    """``repr`` names the descriptor and who reads it now."""
    async def main() -> None:
        conn = Connection()
        fd = conn.sock.fileno()
        assert repr(conn.role) == f"<ReadRole fd={fd} loop's>"
        await conn.role.take()
        assert repr(conn.role) == f"<ReadRole fd={fd} loop reading>"
        conn.role.release()
        assert conn.role.borrow()
        assert repr(conn.role) == f"<ReadRole fd={fd} borrowed>"
        conn.role.give_back(True)
        assert repr(conn.role) == f"<ReadRole fd={fd} parked>"
        conn.close()

    run(main)
