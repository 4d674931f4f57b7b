"""Exposed ports of a bridge sandbox: a small forwarder in the client, one listener per port on
the host's 127.0.0.1 (a port the kernel picks), each connection relayed to the sandbox's address.

Why userspace and not an nftables DNAT: a DNAT from 127.0.0.1 needs ``route_localnet=1`` on the
host, which makes every service bound to the host's loopback reachable from outside the loopback
(the Kubernetes CVE-2020-8558); a forwarder needs no sysctl, gets a free port from the kernel (no
collisions between clients), and its sockets die with the client, SIGKILL included.
"""

from __future__ import annotations

import trio

#: Bytes read per hop, and how long a connect to the sandbox may take.
_CHUNK = 65536
_CONNECT_SECONDS = 10.0


class Forwarder:
    """Listeners for one sandbox; ``serve`` runs them until ``close``."""

    def __init__(self, address: str, ports: tuple[int, ...]) -> None:
        self.address = address
        self.ports = ports
        self.listeners: list[tuple[int, trio.SocketListener]] = []
        self._scope = trio.CancelScope()

    async def open(self) -> None:
        """Bind a listener per port on 127.0.0.1 (before the sandbox is reported running)."""
        for port in self.ports:
            sock = trio.socket.socket()
            await sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            self.listeners.append((port, trio.SocketListener(sock)))

    @property
    def mapped(self) -> tuple[tuple[int, str], ...]:
        """(sandbox port, "127.0.0.1:host port") pairs."""
        return tuple((port, "127.0.0.1:%d" % lst.socket.getsockname()[1]) for port, lst in self.listeners)

    async def serve(self) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                for port, listener in self.listeners:
                    nursery.start_soon(self._accept, listener, port, nursery)

    async def _accept(self, listener: trio.SocketListener, port: int, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except (OSError, trio.ClosedResourceError):
                return
            nursery.start_soon(self._relay, stream, port)

    async def _relay(self, client: trio.SocketStream, port: int) -> None:
        async with client:
            try:
                with trio.fail_after(_CONNECT_SECONDS):
                    upstream = await trio.open_tcp_stream(self.address, port)
            except (OSError, trio.TooSlowError):
                return  # the sandbox serves nothing there: the client sees the connection close
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(_pump, client, upstream)
                nursery.start_soon(_pump, upstream, client)

    def close(self) -> None:
        self._scope.cancel()
        for _port, listener in self.listeners:
            listener.socket.close()


async def _pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        while data := await source.receive_some(_CHUNK):
            await sink.send_all(data)
        await sink.send_eof()
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
