"""The same-host data plane: a client on the server's machine moves its wire frames over a unix socket.

gRPC costs a same-host client two thread handoffs and an HTTP/2 frame each way per message. So a
client that shares the server's machine (its lease reply names the machine's boot id) asks, when
it attaches, for the fast plane (``META_DATA_PLANE``). The Attach call is then authorized exactly
as any other (the token, the peer gate, NotFound for a sandbox that is not there), and its first
and only message is an *offer*: the path of the server's fast socket and a one-time ticket
(``TICKET_BYTES`` random bytes, good for ``TICKET_SECONDS`` and for this attachment only). The
client connects to that socket and sends the ticket; the server answers ``ACK`` and from then on
the socket carries the attachment's wire frames both ways, through the same ``Hub.serve`` as a
gRPC stream (hello first, ``frames.check`` on every frame, malformed data ends only this client).

The offer also holds a *key*, good while the attachment lasts, for the direct line to the sandbox's
call worker that a client opens like a local one does (see ``workerlink.py``): a connection that
sends ``WORKER``, the key and the worker's socket name.

The Attach call stays open beside the socket, as the attachment's control: it ends when the
attachment ends, with the same trailer (exit report) or status (INVALID_ARGUMENT and the reason)
a gRPC data plane would end with; the server closes the socket at the same moment. Either side
going away (socket or call) ends both.

Who may connect: the socket lies in a 0700 directory of the server's user and is 0600, so only
that user and root reach it; the server also checks the peer's uid (``SO_PEERCRED``) against the
same two, and a connection without a valid ticket is closed without a word. Clients of other
users (``--allow-uid``) and of other machines keep gRPC.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from .._functions import bulk as _bulk
from .._errors import ProtocolError
from . import workerlink
from .peergate import peer_uid
from .._grpc.fastplane import ACK, ATTACH, TICKET_BYTES, WORKER, host_id
from .._grpc.rawsocket import RawSocketStream
from .dataplane import Attachment

if TYPE_CHECKING:
    from .control import Fleet

log = logging.getLogger("sandpool.serve")

TICKET_SECONDS = 10.0
SOCKET_NAME = "fast.sock"
#: connections that have not shown a ticket yet, at most (more are closed at accept)
MAX_PENDING = 64
#: the same prefix as the listener's private directories, so a killed server's are swept alike
PRIVATE_PREFIX = "sandpool-serve-"


class FastEnd:
    """One attachment's transport over the fast socket: ``Hub.serve`` and ``Hub.run`` use it as
    they use a gRPC stream's ThreadPipes (``receive``/``send``/``close``). Until the client shows
    its ticket, ``receive`` waits (at most ``TICKET_SECONDS``, then it is the end)."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._stream: RawSocketStream | None = None
        self._connected = trio.Event()
        self._on_close: list[Callable[[], None]] = []
        self.closed = False
        #: (the sandbox's /tmp as the server sees it, its agent's pid, the Attachment), for worker
        #: lines; None when the sandbox's /tmp is out of reach (then calls go through the agent)
        self.worker_target: tuple[str, int, Attachment] | None = None
        self._links: set[trio.CancelScope] = set()
        #: set once the attachment ended: the Attach call's thread then sends the trailer
        self.ended = threading.Event()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "connected" if self._stream is not None else "waiting for its ticket"
        return f"<FastEnd {state}>"

    def connect(self, stream: RawSocketStream) -> bool:
        """Give the end its socket (the ticket matched); False if it ended meanwhile."""
        if self.closed:
            return False
        self._stream = stream
        self._connected.set()
        return True

    async def receive(self) -> bytes:
        """The next bytes from the client; b"" once the socket or the attachment ended."""
        if self._stream is None:
            with trio.move_on_after(TICKET_SECONDS):
                await self._connected.wait()
            if self._stream is None:  # never redeemed, or ended first
                self.close()
                return b""
        return await self._stream.receive_some(1 << 20)

    async def send(self, data: bytes) -> None:
        """Send ``data`` to the client; BrokenResourceError once it is gone (as a ThreadPipe's)."""
        if self._stream is None or self.closed:
            raise trio.BrokenResourceError("the client's fast socket is not open")
        await self._stream.send_all(data)  # whole, even when the hello and relayed frames meet

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    async def run_worker_line(self, client: RawSocketStream, name: str) -> None:
        """Connect to this attachment's sandbox's worker ``name`` and relay (``workerlink``) until
        either side ends, or this attachment does. Without a worker to reach, closes ``client``."""
        if self.closed or self.worker_target is None:
            await client.aclose()
            return
        directory, agent_pid, attachment = self.worker_target
        with trio.CancelScope() as scope:
            self._links.add(scope)
            try:
                try:
                    with trio.fail_after(TICKET_SECONDS):
                        worker = await workerlink.connect_worker(directory, name, agent_pid)
                    await client.send_all(ACK)
                except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                        ProtocolError):
                    await client.aclose()
                    return
                attachment.direct_line = True
                await workerlink.relay(client, worker)
            finally:
                self._links.discard(scope)
                attachment.direct_line = False

    def close(self) -> None:
        """End it (idempotent, in the trio thread): the socket closes, the Attach call ends."""
        if self.closed:
            return
        self.closed = True
        if self._stream is not None:
            self._stream.close()  # wakes a task waiting on it
        self._connected.set()
        for scope in self._links:
            scope.cancel()
        for callback in self._on_close:
            callback()
        self.ended.set()

    def close_from_thread(self) -> None:
        """``close()`` from a gRPC thread (the Attach call ended: the client cancelled or went away)."""
        try:
            self._token.run_sync_soon(self.close)
        except trio.RunFinishedError:
            self.ended.set()


async def attach(fleet: Fleet, plane: FastPlane, sandbox_id: str, end: FastEnd,
                 peer: str) -> tuple[Attachment, dict[str, Any]]:
    """``fleet.attach`` with ``end`` as both directions, and the offer that redeems it: (attachment,
    offer). In the trio thread, as everything that touches tickets."""
    att = await fleet.attach(sandbox_id, end, end, peer)
    record = fleet.sandboxes[sandbox_id].record
    directory = _bulk.record_dir(record)
    if directory is not None and record.agent_pid is not None:
        end.worker_target = (directory, record.agent_pid, att)
    return att, plane.offer(end)


class FastPlane:
    """The server's fast socket: hands out tickets, admits the connections that bring one."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._dir = tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-fast-")  # 0700
        self.path = os.path.join(self._dir, SOCKET_NAME)
        self.host = host_id()
        self.allowed = frozenset({0, os.geteuid()})
        self._tickets: dict[bytes, FastEnd] = {}  # sha256(ticket) -> the end it opens, once
        self._keys: dict[bytes, FastEnd] = {}  # sha256(key) -> the end whose worker lines it opens
        self._pending = 0
        self._logged: set[int] = set()
        self._listener: trio.socket.SocketType | None = None

    def __repr__(self) -> str:
        return f"<FastPlane {self.path} tickets={len(self._tickets)}>"

    def advert(self) -> dict[str, Any]:
        """What a lease reply tells clients: where the fast plane is served (machine)."""
        return {"host": self.host}

    def offer(self, end: FastEnd) -> dict[str, Any]:
        """A ticket and a key for ``end``: the Attach call's first message."""
        ticket, key = secrets.token_bytes(TICKET_BYTES), secrets.token_bytes(TICKET_BYTES)
        # looked up by digest: no timing hint about either secret
        ticket_digest, key_digest = hashlib.sha256(ticket).digest(), hashlib.sha256(key).digest()
        self._tickets[ticket_digest] = end
        self._keys[key_digest] = end
        end.on_close(lambda: self._forget(ticket_digest, key_digest))
        return {"path": self.path, "ticket": ticket, "key": key}

    def _forget(self, *digests: bytes) -> None:
        for digest in digests:
            self._tickets.pop(digest, None)
            self._keys.pop(digest, None)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and admit connections until cancelled; then remove the socket's directory."""
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await listener.bind(self.path)
            os.chmod(self.path, 0o600)
            listener.listen(128)
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await listener.accept()
                    if self._pending >= MAX_PENDING:
                        conn.close()
                        continue
                    self._pending += 1
                    nursery.start_soon(self._admit, conn)
        finally:
            listener.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    async def _admit(self, conn: trio.socket.SocketType) -> None:
        """Admit one connection (or close it without a word): the peer's uid, then its ticket or key."""
        stream = RawSocketStream(socket.socket(fileno=conn.detach()))
        owned = False  # by an attachment or a worker line, once admitted
        pending = [True]

        def settled() -> None:  # admitted or refused: it no longer counts against MAX_PENDING
            if pending[0]:
                pending[0] = False
                self._pending -= 1

        try:
            try:
                uid = peer_uid(stream.socket)
            except OSError:
                uid = -1
            if uid not in self.allowed:
                if uid not in self._logged:
                    self._logged.add(uid)
                    log.info("refused a fast data-plane connection from uid %d", uid)
                return
            end, kind, name = None, b"", ""
            with trio.move_on_after(TICKET_SECONDS):
                head = await _read_exactly(stream, 1 + TICKET_BYTES)
                kind, digest = head[:1], hashlib.sha256(head[1:]).digest()
                if kind == WORKER:
                    size = (await _read_exactly(stream, 1))[0]
                    name = (await _read_exactly(stream, size)).decode("ascii", "replace")
                end = self._tickets.pop(digest, None) if kind == ATTACH else self._keys.get(digest)
            if end is None:
                return
            settled()
            if kind == ATTACH:
                await stream.send_all(ACK)
                owned = end.connect(stream)
            else:
                owned = True
                await end.run_worker_line(stream, name)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, EOFError):
            pass
        finally:
            settled()
            if not owned:
                stream.close()


async def _read_exactly(stream: RawSocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise EOFError("the peer closed before it said enough")
        data += chunk
    return data
