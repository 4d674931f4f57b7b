"""A FrameChannel over a stream that never waits while data comes (a sandbox's socket, the fast
plane's) still lets the rest of its loop run: its reader yields every few reads, and after each
large one, so a peer that keeps sending cannot starve the loop."""

from __future__ import annotations

import trio

from _sandpool_agent import wire as _wire
from sandpool._core.channel import FrameChannel


class Endless(trio.abc.Stream):
    """Always has ``chunk`` to read, at once: never a checkpoint."""

    def __init__(self, frames: int) -> None:
        self.chunk = b"".join(_wire.encode({"t": "pong", "id": i + 1}) for i in range(frames))

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return self.chunk

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("nothing is sent here")

    async def wait_send_all_might_not_block(self) -> None:
        raise AssertionError("nothing is sent here")

    async def aclose(self) -> None:
        pass


def _ticks_while_reading(frames_per_read: int, reads: int) -> int:
    """How often another task ran while the reader took ``reads`` reads of the endless stream."""

    async def main() -> int:
        channel = FrameChannel(Endless(frames_per_read))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.sleep(0)
            before = ticks
            for _ in range(reads):
                batch = await channel.receive_batch()
                assert batch is not None and len(batch) == frames_per_read
            ran = ticks - before
            nursery.cancel_scope.cancel()
        return ran

    return trio.run(main)


#: The first read does not yield, and trio runs a batch of ready tasks in either order, so the
#: ticker's turn at the last yield may come after the count is taken: two fewer ticks than yields
#: at worst (without the yields there would be none at all).
_LAST_YIELD = 2


def test_small_reads_yield_every_few():
    """Small reads: the reader yields at least once every 16 reads."""
    assert _ticks_while_reading(frames_per_read=2, reads=320) >= 320 // 16 - _LAST_YIELD


def test_large_reads_yield_each_time():
    """A read of 64 KiB or more: the next read yields first."""
    frames = 1 + (1 << 16) // len(_wire.encode({"t": "pong", "id": 1}))
    assert _ticks_while_reading(frames_per_read=frames, reads=20) >= 20 - 1 - _LAST_YIELD
