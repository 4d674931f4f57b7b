"""A trio frame channel: wire frames over any trio stream, with one reader and many senders."""

from __future__ import annotations

import collections
from typing import Any

import trio

from _sandpool_agent import wire as _wire
from .._errors import SandboxUnavailableError


class FrameChannel:
    """Sends and receives wire frames on ``stream``.

    ``receive`` is for exactly one reader task; ``send`` may be called by any number of tasks (a
    lock keeps frames whole). Transport errors become :class:`SandboxUnavailableError`.
    """

    def __init__(self, stream: trio.abc.Stream, *, max_frame_bytes: int = _wire.MAX_FRAME_BYTES) -> None:
        self._stream = stream
        self._decoder = _wire.FrameBuffer(max_bytes=max_frame_bytes)
        self._ready: collections.deque[dict[str, Any]] = collections.deque()
        self._send_lock = trio.Lock()
        self._max = max_frame_bytes
        self.closed = False

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
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.closed = True
                raise SandboxUnavailableError(f"the sandbox's connection broke: {exc!r}") from exc

    async def receive(self) -> dict[str, Any] | None:
        """The next frame, or None at EOF. A malformed frame raises ProtocolError."""
        while not self._ready:
            try:
                data = await self._stream.receive_some(1 << 20)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                self.closed = True
                return None
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
        self.closed = True
        with trio.CancelScope(shield=True):
            await self._stream.aclose()
