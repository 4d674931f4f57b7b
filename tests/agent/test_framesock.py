"""The agent's frame socket: frames of any size arrive whole and in order, whatever its read buffer
(one page until a read fills it, then ``SCRATCH_BYTES``)."""

from __future__ import annotations

import socket
import threading

from _sandpool_agent import framesock, wire


def _read_frames(chan: framesock.FrameSocket, count: int) -> list[dict]:
    got: list[dict] = []
    while len(got) < count:
        frames = chan.read_available()
        assert frames is not None, "the peer closed before every frame came"
        got.extend(frames)
    return got


def test_small_then_large_frames_arrive_whole_and_in_order():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        chan = framesock.FrameSocket(ours)
        small = [{"t": "stdin", "id": i, "data": b"x" * 100} for i in range(3)]
        for frame in small:
            theirs.sendall(wire.encode(frame))
        assert _read_frames(chan, 3) == small
        assert len(chan._scratch) == framesock.FIRST_SCRATCH_BYTES  # only small frames so far: one page
        large = [{"t": "stdin", "id": 10 + i, "data": bytes([i]) * (300_000 + i)} for i in range(3)]
        sender = threading.Thread(target=lambda: [theirs.sendall(wire.encode(f)) for f in large])
        sender.start()
        assert _read_frames(chan, 3) == large
        sender.join()
        assert len(chan._scratch) == framesock.SCRATCH_BYTES  # a read filled the first buffer
        theirs.sendall(wire.encode(small[0]))
        assert _read_frames(chan, 1) == [small[0]]
