"""Blocking frame I/O over a socket, for the agent and the template (no trio here)."""

from __future__ import annotations

import socket

from . import wire as _wire


class FrameSocket:
    """A stream socket speaking wire frames. ``send`` blocks; ``read_available`` never blocks long."""

    def __init__(self, sock: socket.socket, *, lenient: bool = False) -> None:
        self.sock = sock
        self._decoder = _wire.FrameBuffer(lenient=lenient)  # lenient: bad frames come out as ProtocolErrors
        self.broken = False  # a send failed: the peer is gone

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
            data = self.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return []
        except ConnectionResetError:
            return None
        if not data:
            return None
        return self._decoder.feed(data)

    def close(self) -> None:
        self.sock.close()
