"""The client's side of the same-host fast plane (see ``_service/fastpath.py``; the handshake: ``fastplane.py``): redeem an offer for a socket,
and read it as a trio Stream whose end is the Attach call's end.

The offer comes from the server, so it is checked like anything a server sends: a path of bounded
size and a ticket of the right length, nothing else used.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import trio

from .._errors import ProtocolError
from .threadpipe import ThreadPipe
from . import fastplane, limits
from . import rawsocket
from .rawsocket import RawSocketStream

#: Seconds to connect and be admitted before the client falls back to gRPC.
ADMIT_SECONDS = 5.0
ENV_DATA_PLANE = "SANDPOOL_DATA_PLANE"


def wanted(advert: object) -> bool:
    """True if a lease reply's ``fast`` advert names this very machine (and the fast plane is not
    turned off with ``SANDPOOL_DATA_PLANE=grpc``)."""
    if os.environ.get(ENV_DATA_PLANE, "auto") == "grpc":
        return False
    host = advert.get("host") if isinstance(advert, dict) else None
    return isinstance(host, str) and bool(host) and host == fastplane.host_id()


def check_offer(offer: dict[str, Any]) -> tuple[str, bytes, bytes]:
    """``(path, ticket, key)`` of an offer; ProtocolError naming what is wrong."""
    path, ticket, key = offer.get("path"), offer.get("ticket"), offer.get("key")
    if (not isinstance(path, str) or not path.startswith("/") or "\x00" in path
            or len(path.encode(errors="replace")) > limits.MAX_PATH_BYTES):
        raise ProtocolError(f"the server's fast-plane offer has no usable socket path: {limits.short(path)}")
    if not (isinstance(ticket, bytes) and len(ticket) == fastplane.TICKET_BYTES
            and isinstance(key, bytes) and len(key) == fastplane.TICKET_BYTES):
        raise ProtocolError(f"the server's fast-plane ticket and key must be {fastplane.TICKET_BYTES} bytes")
    return path, ticket, key


async def redeem(offer: dict[str, Any]) -> RawSocketStream:
    """Connect to the offered socket and show the ticket. OSError if the socket cannot be reached
    or the server does not admit this process (the caller then uses gRPC); ProtocolError for a bad offer."""
    path, ticket, _key = check_offer(offer)
    return RawSocketStream(await _admitted(path, fastplane.ATTACH + ticket, "its fast socket"))


async def open_worker_line(offer: dict[str, Any], name: str) -> socket.socket:
    """A non-blocking socket to the sandbox's call worker ``name``, relayed by the server (see
    ``workerlink.py``), for a ``DirectChannel``. OSError if the server does not open it."""
    path, _ticket, key = check_offer(offer)
    encoded = name.encode()
    return await _admitted(path, fastplane.WORKER + key + bytes([len(encoded)]) + encoded,
                           f"a line to the call worker {name}")


async def _admitted(path: str, request: bytes, what: str) -> socket.socket:
    """A socket to the fast plane at ``path`` that sent ``request`` and was admitted (ACK)."""
    sock = None
    try:
        with trio.fail_after(ADMIT_SECONDS):
            sock = await rawsocket.connect_unix(path)
            sock.sendall(request)  # small: the socket's buffer takes it at once
            while True:
                try:
                    reply = sock.recv(1)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
        if reply != fastplane.ACK:
            raise OSError(f"the server did not admit this process to {what} ({path})")
    except trio.TooSlowError:
        if sock is not None:
            sock.close()
        raise OSError(f"the server did not admit this process to {what} ({path}) in time") from None
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    return sock


class FastStream(trio.abc.Stream):
    """A trio Stream over the fast socket. Its EOF comes only after the Attach call ended (``control``:
    the pipe the call's messages go to, closed with the call's error if it failed), so a reader
    sees the attachment's end exactly as over gRPC."""

    def __init__(self, stream: RawSocketStream, control: ThreadPipe,
                 on_close: Callable[[], object] | None = None) -> None:
        self._stream = stream
        self._control = control
        self._on_close = on_close

    @property
    def socket(self) -> socket.socket:
        """The fast socket (a FrameChannel writes a sync caller's frame to it from that thread)."""
        return self._stream.socket

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self._stream.receive_some(max_bytes)
        if data:
            return data
        while await self._control.receive():  # the call's end: b"", or its error raised
            pass
        return b""

    async def aclose(self) -> None:
        self._control.close()
        await self._stream.aclose()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()
