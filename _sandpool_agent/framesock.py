"""Blocking frame I/O over a socket, for the agent and the template (no trio here)."""

from __future__ import annotations

import socket

from . import wire as _wire


#: A read goes into a buffer of this size first: most are a frame or two, and a fresh 1 MiB bytes
#: object per read costs an mmap, an mremap and a munmap.
SCRATCH_BYTES = 1 << 16
#: A FrameSocket's buffer until a read fills it (then ``SCRATCH_BYTES``): an agent that is only sent
#: commands keeps one page, not sixteen, of private memory for it.
FIRST_SCRATCH_BYTES = 1 << 12
READ_BYTES = 1 << 20


def read_now(sock: socket.socket, scratch: bytearray, limit: int = READ_BYTES) -> bytes:
    """What ``sock`` has now, up to ``limit`` bytes (b"" at its end), read through ``scratch``.
    Raises BlockingIOError when it has nothing yet, and OSError as ``recv`` does."""
    size = sock.recv_into(scratch, min(limit, len(scratch)))
    data = bytes(memoryview(scratch)[:size])
    if size == len(scratch) and limit > size:  # maybe more: take it in one go
        try:
            data += sock.recv(limit - size)
        except (BlockingIOError, InterruptedError):
            pass
    return data


class FrameSocket:
    """A stream socket speaking wire frames. ``send`` blocks; ``read_available`` never blocks long."""

    def __init__(self, sock: socket.socket, *, lenient: bool = False) -> None:
        self.sock = sock
        self._decoder = _wire.FrameBuffer(lenient=lenient)  # lenient: bad frames come out as ProtocolErrors
        self.broken = False  # a send failed: the peer is gone
        self._scratch = bytearray(FIRST_SCRATCH_BYTES)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame: dict) -> None:
        """Send one frame; a vanished peer raises OSError (BrokenPipeError)."""
        try:
            self.sock.sendall(_wire.encode(frame))
        except OSError:
            self.broken = True
            raise

    def read_available(self) -> list | None:
        """Read what is there now and return the whole frames; None once the peer closed. Lenient,
        a bad frame is a ProtocolError in the list; strict, it raises one."""
        try:
            data = read_now(self.sock, self._scratch)
        except (BlockingIOError, InterruptedError):
            return []
        except ConnectionResetError:
            return None
        if not data:
            return None
        if len(data) >= len(self._scratch) < SCRATCH_BYTES:  # (big frames come: a full buffer from now)
            self._scratch = bytearray(SCRATCH_BYTES)
        return self._decoder.feed(data)

    def close(self) -> None:
        self.sock.close()
