"""The data plane: relays wire frames between one sandbox's agent and the clients attached to it.

Each attached client is one gRPC stream whose directions are ThreadPipes (see ``server.py``).
Frame ids are chosen by each client, so on the way in an attachment's ids move into a range of
their own (``number << 32 | id``) and on the way out back again; frames without an id (the main
command's exit, the farewell) go to every attachment. Id 0 (the main command) passes unchanged.

Clients may send only the client kinds of the wire protocol, after a ``hello``, each checked by
``frames.check`` (fields, NUL bytes, sizes); anything else, undecodable bytes or an oversized
frame end that client's stream with INVALID_ARGUMENT and the reason, and nothing else: the agent
never sees the bad frame, and the other clients carry on. Output for a client that has gone is acknowledged here, so its
processes run to the end instead of blocking on flow control.

Backpressure: a client that reads slowly fills its pipe; the hub then waits, which stops reading
this sandbox's agent (whose processes block like on a full pipe). Other sandboxes never wait.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from _sandpool_agent import wire as _wire
from .._core.channel import FrameChannel
from .._errors import ProtocolError, SandboxUnavailableError
from .._grpc.frames import ID_BITS, check as check_frame

log = logging.getLogger("sandpool.serve")
#: Rounds of a client's frames relayed without a wait, at most, before the relay yields to the loop.
_YIELD_EVERY = 16


class Pipe(Protocol):
    """One direction of an attached stream: a gRPC stream's ThreadPipe, or a fast socket's FastEnd."""

    async def receive(self) -> bytes: ...
    async def send(self, data: bytes) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Ending:
    """How an attached stream ends: with ``trailer`` (the exit report, as trailing metadata), or with
    ``error``, a (gRPC status name, message) pair."""

    trailer: Mapping[str, object] = field(default_factory=dict)
    error: tuple[str, str] | None = None


@dataclass(eq=False)
class Attachment:
    """One client stream attached to a sandbox."""

    number: int
    inbound: Pipe  # client -> server, filled by the stream's request thread
    outbound: Pipe  # server -> client, emptied by the stream's response generator
    peer: str = ""
    #: set when the stream should end
    ending: Ending | None = None
    greeted: bool = False
    #: while the client has a line straight to the sandbox's call worker (``workerlink.py``): its
    #: cancels of direct calls keep their ids, which are the ids the worker holds
    direct_line: bool = False
    done: trio.Event = field(default_factory=trio.Event)

    def end(self, ending: Ending) -> None:
        if self.ending is None:
            self.ending = ending
        self.outbound.close()
        self.inbound.close()


class Hub:
    """Relays one sandbox's agent channel to any number of attached client streams."""

    def __init__(self, sandbox_id: str, channel: FrameChannel, on_event: Callable[[dict[str, Any]], dict[str, Any]], *,
                 max_frame_bytes: int = _wire.MAX_FRAME_BYTES) -> None:
        self.sandbox_id = sandbox_id
        self.channel = channel
        self.on_event = on_event
        self.attachments: dict[int, Attachment] = {}
        self._next = 0
        self._max_frame = max_frame_bytes
        #: the frames every client gets (main_exit, bye), kept for clients that attach later
        self.history: list[bytes] = []
        self.finished = False
        self.trailer: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<Hub {self.sandbox_id} attached={len(self.attachments)}{' finished' if self.finished else ''}>"

    def attach(self, inbound: Pipe, outbound: Pipe, peer: str = "") -> Attachment:
        self._next += 1
        attachment = Attachment(self._next, inbound, outbound, peer)
        self.attachments[attachment.number] = attachment
        return attachment

    # -- client -> agent ---------------------------------------------------------------------

    async def serve(self, att: Attachment) -> None:
        """Forward one client's frames to the agent until it detaches or misbehaves."""
        decoder = _wire.FrameBuffer(max_bytes=self._max_frame)
        base = att.number << ID_BITS
        agent_gone = False
        rounds = 0
        try:
            while True:
                try:
                    data = await att.inbound.receive()
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                frames = []
                for frame in decoder.feed(data):
                    if not att.greeted:
                        _wire.check_hello(frame)
                        att.greeted = True
                        hello = _wire.encode(_wire.hello(sandbox_id=self.sandbox_id))
                        await att.outbound.send(b"".join([hello, *self.history]))
                        if self.finished:  # attached after the end: it still learns how it ended
                            att.end(Ending(self.trailer))
                            return
                        continue
                    frame_id = check_frame(frame)["id"]
                    if frame_id and not (att.direct_line and frame["t"] == "cancel" and frame.get("call")):
                        frame["id"] = base | frame_id
                    frames.append(frame)
                if frames:  # at once when the agent's socket takes them (no pass through the loop)
                    if not self.channel.send_many_now(frames):
                        await self.channel.send_many(frames)
                    elif self.channel.backlogged:
                        await self.channel.flush()
                rounds += 1
                if rounds % _YIELD_EVERY == 0:  # neither end may wait while the client keeps sending: be fair
                    await trio.lowlevel.checkpoint()
        except ProtocolError as exc:
            att.end(Ending(error=("INVALID_ARGUMENT", f"malformed data-plane message: {exc}")))
        except SandboxUnavailableError:
            agent_gone = True  # finish() ends this stream with the exit report, which comes next
        except trio.BrokenResourceError:
            pass  # the client is gone: the stream's end reports it
        except Exception as exc:  # a bug here must end this client's stream, not the server
            log.error("relaying a client's frames to %s failed", self.sandbox_id, exc_info=exc)
            att.end(Ending(error=("INTERNAL",
                                  f"the server failed relaying this stream: {type(exc).__name__}: {exc}")))
        finally:
            if not (agent_gone and not self.finished):  # ended now, the stream would miss that report
                self.attachments.pop(att.number, None)
                att.end(Ending())
            att.done.set()

    # -- agent -> clients --------------------------------------------------------------------

    async def run(self) -> None:
        """Route the agent's frames to their attachments until the agent's connection ends."""
        while True:
            try:
                batch = await self.channel.receive_batch()
            except ProtocolError as exc:  # the agent's stream cannot be trusted past this
                self.on_event({"t": "bye", "reason": f"protocol error: {exc}"})
                return
            if batch is None:
                return
            outgoing: dict[int, list[bytes]] = {}
            credits = []
            for frame in batch:
                frame_id = frame.get("id") or 0
                if frame_id:
                    number, own_id = divmod(frame_id, 1 << ID_BITS)
                    if number not in self.attachments:
                        if frame["t"] == "output":  # nobody reads it any more: keep the process going
                            credits.append({"t": "credit", "id": frame_id, "n": len(frame["data"])})
                        continue
                    frame["id"] = own_id
                    outgoing.setdefault(number, []).append(_wire.encode(frame))
                else:
                    frame = self.on_event(frame)
                    encoded = _wire.encode(frame)
                    if len(self.history) < 16:
                        self.history.append(encoded)
                    for number, att in self.attachments.items():
                        if att.greeted:  # the others get it from the history, after their hello
                            outgoing.setdefault(number, []).append(encoded)
            for number, chunks in outgoing.items():
                receiver = self.attachments.get(number)
                if receiver is not None:
                    try:
                        await receiver.outbound.send(b"".join(chunks))
                    except trio.BrokenResourceError:
                        pass  # that client went away meanwhile
            if credits:
                try:
                    await self.channel.send_many(credits)
                except SandboxUnavailableError:
                    pass

    def finish(self, trailer: dict[str, Any]) -> None:
        """The sandbox ended: end every attached stream with ``trailer`` (its exit report)."""
        self.finished, self.trailer = True, trailer
        for att in list(self.attachments.values()):
            if att.greeted:  # the others are answered, and ended, when their hello arrives
                att.end(Ending(trailer))
