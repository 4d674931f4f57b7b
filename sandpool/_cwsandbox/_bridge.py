"""Calls from gRPC's server threads into the backend's trio loop, each tied to the life of its RPC.

A unary call runs as ``trio.from_thread.run``; a streaming call runs its producer as a task of the
backend's nursery (started with ``run_sync_soon``: the server thread does not wait for that) and
hands its messages to the server thread through an :class:`Outbox`, a bounded queue whose thread
side blocks on a condition and whose trio side waits only when it is full (so a slow client slows
the producer down, not the server's memory). A message costs no round trip through the trio loop:
an exec's few messages (ready, output, exit) used to cost one each. When the RPC ends early (the
client cancelled, its deadline passed, it went away), the call's cancel scope is cancelled.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Awaitable, Callable, Iterator

import grpc
import trio

from ._errors import BACKEND_UNAVAILABLE, RpcFailure

STREAM_BUFFER = 64  # messages between a producer and its server thread
_BATCH = 64


def _shutting_down() -> RpcFailure:
    return RpcFailure(grpc.StatusCode.UNAVAILABLE, "the sandpool server is shutting down", BACKEND_UNAVAILABLE)


class RpcScope:
    """The cancel scope of one RPC's work in trio, cancelled when the RPC ends before the work does."""

    def __init__(self, context: grpc.ServicerContext, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._lock = threading.Lock()
        self._scope: trio.CancelScope | None = None
        self.ended = False
        if not context.add_callback(self._on_rpc_end):
            self.ended = True

    def _on_rpc_end(self) -> None:  # in a gRPC thread
        with self._lock:
            self.ended = True
            scope = self._scope
        if scope is not None:
            try:
                self._token.run_sync_soon(scope.cancel)
            except trio.RunFinishedError:
                pass

    def open(self) -> trio.CancelScope:
        """The scope to run the RPC's work in (in the trio thread)."""
        scope = trio.CancelScope()
        with self._lock:
            self._scope = scope
            if self.ended:
                scope.cancel()
        return scope


class Bridge:
    """Runs backend coroutines for server threads: ``call`` for unary RPCs, ``stream`` for streaming."""

    def __init__(self, token: trio.lowlevel.TrioToken, nursery: trio.Nursery) -> None:
        self.token = token
        self.nursery = nursery

    def call(self, context: grpc.ServicerContext, async_fn: Callable[..., Awaitable], *args):
        """``await async_fn(*args)`` in the trio loop; its result, or its exception raised here."""
        rpc = RpcScope(context, self.token)

        async def run():
            with rpc.open():
                return await async_fn(*args)
            raise RpcFailure(grpc.StatusCode.CANCELLED, "the call ended before its result")

        try:
            return trio.from_thread.run(run, trio_token=self.token)
        except trio.RunFinishedError:
            raise _shutting_down() from None

    def stream(self, context: grpc.ServicerContext, async_fn: Callable[..., Awaitable], *args) -> Iterator:
        """Run ``async_fn(*args, send)`` in the backend's nursery; yield what it sends, then raise what it
        raised (a server closing under it is UNAVAILABLE)."""
        rpc = RpcScope(context, self.token)
        outbox = Outbox(self.token)

        async def produce() -> None:
            try:
                with rpc.open():
                    await async_fn(*args, outbox)
            except BaseException as exc:  # reported to the client by the server thread
                if not isinstance(exc, Exception):  # cancelled from outside: the server is closing
                    outbox.close(_shutting_down())
                    raise
                outbox.close(exc)
            else:
                outbox.close()

        def start() -> None:  # in the trio loop
            try:
                self.nursery.start_soon(produce)
            except RuntimeError:  # the nursery is closed
                outbox.close(_shutting_down())

        try:
            self.token.run_sync_soon(start)
        except trio.RunFinishedError:
            raise _shutting_down() from None
        try:
            while batch := outbox.get_batch():
                yield from batch
        finally:
            outbox.close()  # a producer still sending learns that nobody reads any more
        if outbox.failure is not None:
            raise outbox.failure


class Outbox:
    """Messages from a trio producer to one server thread. ``send`` (trio) waits while ``STREAM_BUFFER``
    are queued; ``get_batch`` (thread) takes up to ``_BATCH`` at once, [] at the end. ``close(failure)``
    ends it from either side; ``send`` then raises BrokenResourceError."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._closed = False
        self._room: trio.Event | None = None  # the producer waits on it while the queue is full
        self.failure: BaseException | None = None

    async def send(self, message) -> None:
        while True:
            with self._cond:
                if self._closed:
                    raise trio.BrokenResourceError("the stream's reader has gone")
                if len(self._queue) < STREAM_BUFFER:
                    self._queue.append(message)
                    self._cond.notify()
                    break
                room = self._room = self._room or trio.Event()
            await room.wait()
        await trio.lowlevel.checkpoint()

    def close(self, failure: BaseException | None = None) -> None:
        with self._cond:
            if not self._closed:
                self._closed, self.failure = True, failure
            self._cond.notify_all()
            room, self._room = self._room, None
        if room is not None:
            self._wake(room)

    def get_batch(self) -> list:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            batch = [self._queue.popleft() for _ in range(min(_BATCH, len(self._queue)))]
            room, self._room = self._room, None
        if room is not None:
            self._wake(room)
        return batch

    def _wake(self, event: trio.Event) -> None:
        if trio.lowlevel.in_trio_run() and trio.lowlevel.current_trio_token() is self._token:
            event.set()
            return
        try:
            self._token.run_sync_soon(event.set)
        except trio.RunFinishedError:
            pass
