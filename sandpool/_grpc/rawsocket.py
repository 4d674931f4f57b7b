"""A trio Stream over a connected non-blocking socket that goes through trio's scheduler only to wait.

trio's own ``SocketStream`` yields to the scheduler on every send and receive, even when the kernel
takes or has the bytes at once: a pass through the run loop each time. A relayed exec makes about
ten of them between the client, the server's hub and back. Here a send or receive the kernel can
serve at once returns without yielding; only a full send buffer or an empty receive buffer waits
(``wait_writable``/``wait_readable``). Sends are kept whole: one that must wait holds a lock that
any later send waits for, so frames from several tasks never interleave.

Errors follow ``SocketStream``: a send on a broken or closed socket raises BrokenResourceError; a
receive returns b"" at the end, and also once the socket is broken or closed (by ``close()``, which
wakes any waiting task).
"""

from __future__ import annotations

import socket
import threading

import trio

from _sandpool_agent.framesock import READ_BYTES, SCRATCH_BYTES, read_now

_local = threading.local()


def _scratch() -> bytearray:
    """This thread's read buffer (a read copies out of it before anything else runs in the thread)."""
    buffer: bytearray | None = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = _local.buffer = bytearray(SCRATCH_BYTES)
    return buffer


class RawSocketStream(trio.abc.Stream):
    """``sock`` (connected, made non-blocking here) as a trio Stream; see the module docstring."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._lock = trio.Lock()
        self.closed = False

    def __repr__(self) -> str:
        return f"<RawSocketStream fd={self.socket.fileno()}{' closed' if self.closed else ''}>"

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self.closed:
            try:
                if max_bytes is None or max_bytes > SCRATCH_BYTES:
                    return read_now(self.socket, _scratch(), max_bytes or READ_BYTES)
                return self.socket.recv(max_bytes)
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(self.socket)
                except trio.ClosedResourceError:
                    return b""
            except OSError:
                return b""
        return b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if not self._lock.locked():
            view = view[self._send_now(view):]
            if not view:
                return
            self._lock.acquire_nowait()  # the rest goes before any later send (no yield since the check)
        else:
            await self._lock.acquire()
        try:
            while view:
                try:
                    await trio.lowlevel.wait_writable(self.socket)
                except trio.ClosedResourceError as exc:
                    raise trio.BrokenResourceError("the socket is closed") from exc
                view = view[self._send_now(view):]
        finally:
            self._lock.release()

    def _send_now(self, view: memoryview) -> int:
        if self.closed:
            raise trio.BrokenResourceError("the socket is closed")
        try:
            return self.socket.send(view)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"the socket broke: {exc!r}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.socket)

    def close(self) -> None:
        """Close now (in the trio thread): tasks waiting on the socket wake up."""
        if not self.closed:
            self.closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


async def connect_unix(path: str) -> socket.socket:
    """A non-blocking unix socket connected to ``path``; OSError if nobody listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError:  # the listener's backlog is full: wait until it accepts
            await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, f"cannot connect to {path}") from None
    except BaseException:
        sock.close()
        raise
    return sock
