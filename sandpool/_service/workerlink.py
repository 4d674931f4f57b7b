"""A fast-plane client's direct line to a sandbox's call worker, relayed and checked by the server.

A local client sends its calls straight to the sandbox's call worker (``_slot.py``, direct mode):
the agent's relay is the slow part of a call. A same-host client of the server does the same
through the server: it asks the agent for a worker (a ``worker`` frame on its attachment, as a
local client does), then opens a second connection to the fast socket naming that worker, and the
server connects to the worker's socket and relays, frame by frame:

- client -> worker: only ``call`` frames, each through ``frames.check``, forwarded byte for byte
  once whole and checked. Their ids stay the client's own: a sandbox has one direct worker, and
  it serves this line only (it accepts one connection), so no other client's ids meet them there.
  The client's cancels of these calls (``cancel`` with ``call``, through its attachment and the
  agent) keep their ids too (``Hub.serve``, for an attachment with a line), and name the same calls;
- worker -> client: as it comes (the client checks it, as it checks a local worker's answers).

A bad frame from the client ends this link only (the client's calls then go through the agent).
The worker's socket is reached through an ``O_NOFOLLOW`` descriptor of the sandbox's ``/tmp``, and
its listener must be the sandbox's agent (``SO_PEERCRED``), so a sandbox cannot turn the server's
connection towards a socket of the host.
"""

from __future__ import annotations

import contextlib
import os
import socket

import trio

from _sandpool_agent import wire as _wire
from .._errors import ProtocolError
from .._grpc.frames import WORKER_LISTEN, check as check_frame
from .peergate import _CRED



def check_name(name: str) -> str:
    """``name`` if it names a worker socket; ProtocolError otherwise."""
    if not WORKER_LISTEN.fullmatch(f"/tmp/{name}"):
        raise ProtocolError(f"worker socket name {name[:80]!r} is not '.sandpool-worker-<hex>'")
    return name


def _peer_pid(sock: trio.socket.SocketType) -> int:
    pid: int
    pid, _uid, _gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return pid


async def connect_worker(directory: str, name: str, agent_pid: int) -> trio.SocketStream:
    """A connection to the worker socket ``name`` in the sandbox's ``directory`` (as the server sees
    it). OSError if it is not there, or if whoever listens there is not the sandbox's agent."""
    check_name(name)
    dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.connect(f"/proc/self/fd/{dir_fd}/{name}")
        pid = _peer_pid(sock)
        if pid != agent_pid:
            raise OSError(f"the socket {name} in the sandbox is not its agent's (listener pid {pid})")
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(dir_fd)
    return trio.SocketStream(sock)


async def relay(client: trio.abc.Stream, worker: trio.abc.Stream,
                max_frame_bytes: int = _wire.MAX_FRAME_BYTES) -> None:
    """Relay calls and answers between ``client`` and ``worker`` until either ends or the client
    sends something else than a valid call; then close both."""
    async with client, worker, trio.open_nursery() as nursery:
        nursery.start_soon(_calls, client, worker, max_frame_bytes, nursery.cancel_scope)
        nursery.start_soon(_answers, worker, client, nursery.cancel_scope)


async def _calls(src: trio.abc.Stream, dst: trio.abc.Stream, max_bytes: int, done: trio.CancelScope) -> None:
    """Forward the bytes of whole frames once each is checked (a call, valid): the bytes as sent."""
    decoder = _wire.FrameBuffer(max_bytes=max_bytes)
    held = bytearray()
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError, OSError):
        while data := await src.receive_some(1 << 20):
            held += data
            for frame in decoder.feed(data):
                if frame["t"] != "call":
                    raise ProtocolError(f"only 'call' frames go to a call worker, not {frame['t']!r}")
                check_frame(frame)
            whole = len(held) - decoder.pending
            if whole:
                await dst.send_all(held[:whole])
                del held[:whole]
    done.cancel()


async def _answers(src: trio.abc.Stream, dst: trio.abc.Stream, done: trio.CancelScope) -> None:
    """The worker's answers go to the client as they are: the client checks them (as it checks a local
    worker's), and they concern its own calls only."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        while data := await src.receive_some(1 << 20):
            await dst.send_all(data)
    done.cancel()
