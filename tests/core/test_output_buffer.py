"""Exec output buffering: bounded retention, live reading, flow-control credit."""

import trio
import trio.testing

from sandpool._core.output import OutputBuffer


def test_without_reader_everything_is_acknowledged_and_oldest_dropped():
    """Nobody reading: each chunk is credited at once; retention stays within the cap."""
    buf = OutputBuffer(cap=10)
    credits = [buf.append(b"abcd") for _ in range(5)]
    assert credits == [4] * 5
    assert buf.retained <= 10 and buf.dropped == 12
    assert buf.joined() == b"abcd" * 2


def test_live_reader_credits_on_consumption_and_never_loses_unread_chunks():
    """With a reader active, chunks are credited only when read and are never dropped unread."""
    async def reader_flow():
        buf = OutputBuffer(cap=4)
        got = []
        async with trio.open_nursery() as n:
            async def read():
                while True:
                    chunk, credit = await buf.next_chunk()
                    if chunk is None:
                        return
                    got.append((chunk, credit))
            n.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()  # the reader waits for output
            assert buf.append(b"1234") == 0
            assert buf.append(b"5678") == 0
            await trio.testing.wait_all_tasks_blocked()  # and has taken what there was
            buf.close()
        assert got == [(b"1234", 4), (b"5678", 4)]
    trio.run(reader_flow)


def test_drain_releases_held_credit():
    """drain() hands back every unacknowledged byte and stops holding the producer."""
    async def main():
        buf = OutputBuffer(cap=100)
        with trio.move_on_after(0.01):  # on the virtual clock: no real wait
            await buf.next_chunk()  # becomes a live reader, then gives up
        buf.append(b"x" * 30)
        assert buf.drain() == 30
        assert buf.append(b"y") == 1
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
