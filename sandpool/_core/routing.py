"""A sandbox connection's requests: ids, the handler of each, and the routing of the agent's frames.

This is where frames from a sandbox meet the client, so it trusts none of them (code inside a sandbox
can take its agent over): a kind only clients send, an id this client never issued, a kind the
request does not take, or a frame its request cannot use is a :class:`ProtocolError`, which fails
that sandbox and nothing else. Frames for requests already settled (late answers after a timeout or
cancel) are dropped.

Credit for output is sent by a task of its own (``send_credits``), coalesced per request, so the
reader never waits on an agent that does not read: it keeps reading, and an agent that ignores the
missing credit breaks its window and fails.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import trio

from _sandpool_agent import wire as _wire
from .._errors import ProtocolError, SandboxError


class Handler(Protocol):
    """A pending request: told of each frame for it, and of the sandbox's end."""

    def _on_frame(self, frame: dict[str, Any]) -> int: ...  # returns output credit to acknowledge

    def _on_sandbox_gone(self, error: BaseException) -> None: ...


class Requests:
    """The requests of one sandbox connection, by id (ids start at 1 and are never reused)."""

    def __init__(self) -> None:
        self.handlers: dict[int, Any] = {}
        self.last_id = 0
        self._credits: dict[int, int] = {}
        self._credit_wake = trio.Event()
        self._closed = False
        self._lock = threading.Lock()  # a pool's sync callers register direct calls from their threads

    def register(self, handler: Handler) -> int:
        """A new request id routed to ``handler``; thread-safe."""
        with self._lock:
            self.last_id += 1
            req_id = self.last_id
        self.handlers[req_id] = handler
        return req_id

    def unregister(self, req_id: int) -> None:
        self.handlers.pop(req_id, None)

    def route(self, frame: dict[str, Any]) -> dict[str, Any] | None:
        """Hand a frame with an id to its request (credit is queued for ``send_credits``). Returns
        the frame when it is addressed to the sandbox (no id: its main command's exit, farewell)."""
        kind = frame["t"]
        if kind not in _wire.FROM_AGENT:
            raise ProtocolError(f"the agent sent a {kind!r} frame, which only a client sends",
                                frame=_wire.summary(frame))
        if "id" not in _wire.FRAMES[kind]:
            return frame
        req_id = frame["id"]  # validated: an int in range
        if req_id > self.last_id:
            raise ProtocolError(f"the agent sent a {kind!r} frame for request {req_id}, which this client never "
                                "made", frame=_wire.summary(frame))
        if kind == "ask":  # user code there calls an actor: for the sandbox, whatever the request
            return frame
        handler = self.handlers.get(req_id)
        if handler is None:  # settled already (a late answer after a timeout or cancel)
            return None
        accepts = getattr(handler, "ACCEPTS", None)
        if accepts is not None and kind not in accepts:
            raise ProtocolError(f"the agent answered a request with a {kind!r} frame", frame=_wire.summary(frame))
        try:
            credit = handler._on_frame(frame)
        except ProtocolError:
            raise
        except Exception as exc:  # the trust boundary: a frame its request cannot use fails only this sandbox
            raise ProtocolError(f"the agent sent a {kind!r} frame this client cannot use: {exc!r}"[:2000],
                                frame=_wire.summary(frame)) from exc
        if credit:
            self._credits[req_id] = self._credits.get(req_id, 0) + credit
            self._credit_wake.set()
        return None

    async def send_credits(self, send_many: Any) -> None:
        """Send queued credit until ``close``; ``send_many(frames)`` writes to the agent. Ends when
        the connection breaks (SandboxError)."""
        while not self._closed:
            await self._credit_wake.wait()
            self._credit_wake = trio.Event()
            credits, self._credits = self._credits, {}
            if credits and not self._closed:
                try:
                    await send_many([{"t": "credit", "id": i, "n": n} for i, n in credits.items()])
                except SandboxError:
                    return

    def close(self, error: BaseException) -> None:
        """The connection ended: tell every request why, and stop the credit sender."""
        self._closed = True
        self._credit_wake.set()
        handlers, self.handlers = list(self.handlers.values()), {}
        for handler in handlers:
            handler._on_sandbox_gone(error)
