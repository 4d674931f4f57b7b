"""``read_file_streaming`` / ``write_file_streaming``: files of any size in constant memory.

Both move one chunk (``CHUNK_BYTES``) per request over the ordinary file frames, using their
``offset``/``length`` fields: a read asks for the next ``length`` bytes at ``offset`` until a short
answer ends the file; a write sends each chunk at its offset, the first one creating (or
truncating) the file. So the client holds one chunk at a time, whatever the size. As with
cwsandbox, a write that fails half-way leaves a partial file (``write_file`` is the atomic one).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

import trio

from _sandpool_agent import wire as _wire
from .._core.chunkstream import ChunkStream
from .._core.opref import OperationRef
from .parts import SandboxParts

__all__ = ["CHUNK_BYTES", "StreamFilesMixin"]

#: Bytes per request: large enough for throughput, small enough to keep frames and memory modest.
CHUNK_BYTES = 4 * 1024 * 1024


def _rechunk(buffer: bytearray, data: object) -> Iterator[bytes]:
    """Append ``data`` to ``buffer``; yield every full CHUNK_BYTES piece it now holds."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_file_streaming chunks must be bytes, got {type(data).__name__}; encode text first")
    buffer += data
    while len(buffer) >= CHUNK_BYTES:
        piece = bytes(buffer[:CHUNK_BYTES])
        del buffer[:CHUNK_BYTES]
        yield piece


async def _pull_sync(source: Iterable[Any]) -> AsyncIterator[Any]:
    """Items of a sync iterable, each pulled in a worker thread (a generator may block)."""
    iterator = iter(source)
    done = object()
    while (item := await trio.to_thread.run_sync(next, iterator, done)) is not done:
        yield item


class StreamFilesMixin(SandboxParts):
    """The streaming file methods of Sandbox."""

    def read_file_streaming(self, filepath: str, *, timeout_seconds: float | None = None,
                            container: str | None = None) -> ChunkStream[bytes]:
        """The contents of ``filepath`` as chunks of bytes, for a file of any size:
        ``for chunk in sb.read_file_streaming(path)`` or ``async for``.

        ``timeout_seconds`` bounds each chunk's request (default: request_timeout_seconds).
        Raises (while iterating) SandboxFileError as ``read_file`` does; a FIFO or device is refused.
        """
        check_path(filepath)
        if container:
            return self._in(container).read_file_streaming(filepath, timeout_seconds=timeout_seconds)

        async def produce() -> AsyncIterator[bytes]:
            offset = 0
            while True:
                frame = {"t": "read_file", "path": filepath, "offset": offset, "length": CHUNK_BYTES}
                data = await self._file_request(frame, timeout_seconds)
                if data:
                    offset += len(data)
                    yield data
                if len(data or b"") < CHUNK_BYTES:
                    return

        return ChunkStream(lambda: self._host, produce, "a streamed file")

    def write_file_streaming(self, filepath: str,
                             source: bytes | Iterable[bytes] | AsyncIterable[bytes], *,
                             timeout_seconds: float | None = None,
                             container: str | None = None) -> OperationRef[None]:
        """Write ``source`` (bytes, an iterable of bytes, or from trio an async iterable) to
        ``filepath`` chunk by chunk; resolves when all is written. Sync iterables are pulled in a
        worker thread. ``timeout_seconds`` bounds each chunk's request.

        Raises TypeError for a chunk that is not bytes (the file then holds what came before it),
        SandboxFileError as ``write_file`` does.
        """
        check_path(filepath)
        if container:
            return self._in(container).write_file_streaming(filepath, source, timeout_seconds=timeout_seconds)
        if isinstance(source, (bytes, bytearray, memoryview)):
            chunks: AsyncIterable[Any] = _pull_sync([bytes(source)])
        elif isinstance(source, AsyncIterable):
            if not trio.lowlevel.in_trio_run():
                raise TypeError("an async iterable can be streamed from trio only; from asyncio or threads pass "
                                "bytes or a (sync) iterable of bytes")
            chunks = source
        elif isinstance(source, Iterable) and not isinstance(source, str):
            chunks = _pull_sync(source)
        else:
            raise TypeError(f"source must be bytes or an iterable of bytes, got {type(source).__name__}")

        async def write() -> None:
            offset, buffer = 0, bytearray()

            async def put(piece: bytes) -> None:
                nonlocal offset
                frame = {"t": "write_file", "path": filepath, "data": piece, "offset": offset}
                await self._file_request(frame, timeout_seconds)
                offset += len(piece)

            async for data in chunks:
                for piece in _rechunk(buffer, data):
                    await put(piece)
            if buffer or offset == 0:  # the rest, or an empty file
                await put(bytes(buffer))

        return self._spawn(write)


assert CHUNK_BYTES <= _wire.MAX_FILE_BYTES


def check_path(filepath: object) -> None:
    if not isinstance(filepath, str) or not filepath:
        raise ValueError(f"filepath must be a non-empty string such as '/tmp/data.txt', got {filepath!r}")
    _wire.check_field("read_file", "path", filepath, "filepath")
