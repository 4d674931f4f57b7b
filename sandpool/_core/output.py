"""Output of one exec'd stream: kept for the result (bounded), readable live, with flow control.

Frames arrive from the sandbox as fast as the reader task can take them and are never refused, so
one slow consumer can't stall other processes. Memory stays bounded two ways: while nobody reads
the stream live, bytes are acknowledged at once and the retained copy keeps only the newest
``cap`` bytes (``dropped`` counts the rest); while a live reader is behind, bytes are acknowledged
only as it consumes them, so the agent stops reading the pipe after its window and the process
blocks, exactly like a full pipe.
"""

from __future__ import annotations

import collections

import trio


class OutputBuffer:
    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.chunks: collections.deque[bytes] = collections.deque()
        self.first = 0  # absolute index of chunks[0]
        self.retained = 0
        self.dropped = 0
        self.read_at: int | None = None  # absolute index of the live reader's next chunk
        self.ack_from: int | None = None  # chunks from this index on are acknowledged when read
        self.unacked = 0
        self.eof = False
        self._changed = trio.Event()

    @property
    def end(self) -> int:
        return self.first + len(self.chunks)

    def append(self, data: bytes) -> int:
        """Store a chunk; return how many bytes to acknowledge to the agent now."""
        self.chunks.append(data)
        self.retained += len(data)
        credit = len(data)
        if self.ack_from is not None:
            credit = 0
            self.unacked += len(data)
        self._trim()
        self._wake()
        return credit

    def close(self) -> None:
        self.eof = True
        self._wake()

    def drain(self) -> int:
        """Stop holding back the producer (someone waits for the result); return the credit to send."""
        credit, self.unacked, self.ack_from = self.unacked, 0, None
        self._trim()
        return credit

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _trim(self) -> None:
        keep_from = self.read_at if self.ack_from is not None else None
        while self.retained > self.cap and self.chunks and (keep_from is None or self.first < keep_from):
            chunk = self.chunks.popleft()
            self.first += 1
            self.retained -= len(chunk)
            self.dropped += len(chunk)

    async def next_chunk(self) -> tuple[bytes | None, int]:
        """The live reader's next chunk (None at EOF) and the credit its consumption frees."""
        if self.read_at is None:
            self.read_at = self.first
            self.ack_from = self.end
        while True:
            self.read_at = max(self.read_at, self.first)
            if self.read_at < self.end:
                chunk = self.chunks[self.read_at - self.first]
                credit = 0
                if self.ack_from is not None and self.read_at >= self.ack_from:
                    credit = len(chunk)
                    self.unacked -= credit
                self.read_at += 1
                self._trim()
                return chunk, credit
            if self.eof:
                return None, 0
            await self._changed.wait()

    def joined(self) -> bytes:
        return b"".join(self.chunks)
