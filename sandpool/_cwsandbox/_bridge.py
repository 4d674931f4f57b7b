"""Calls from gRPC's server threads into the backend's trio loop, each tied to the life of its RPC.

A unary call runs as ``trio.from_thread.run``; a streaming call runs its producer as a task of the
backend's nursery and hands its messages to the server thread in batches through a bounded channel
(so a slow client slows the producer down, not the server's memory). When the RPC ends early (the
client cancelled, its deadline passed, it went away), the call's cancel scope is cancelled.
"""

from __future__ import annotations

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
        failure: list[BaseException] = []

        def open_channel():
            send, receive = trio.open_memory_channel(STREAM_BUFFER)

            async def produce() -> None:
                async with send:
                    try:
                        with rpc.open():
                            await async_fn(*args, send)
                    except BaseException as exc:  # reported to the client by the server thread
                        if not isinstance(exc, Exception):  # cancelled from outside: the server is closing
                            failure.append(_shutting_down())
                            raise
                        failure.append(exc)

            self.nursery.start_soon(produce)
            return receive

        try:
            receive = trio.from_thread.run_sync(open_channel, trio_token=self.token)
        except (trio.RunFinishedError, RuntimeError):  # the loop or the nursery is closed
            raise _shutting_down() from None
        try:
            while batch := self._next_batch(receive):
                yield from batch
        finally:
            try:
                trio.from_thread.run_sync(receive.close, trio_token=self.token)
            except trio.RunFinishedError:
                pass
        if failure:
            raise failure[0]

    def _next_batch(self, receive: trio.MemoryReceiveChannel) -> list:
        async def next_batch() -> list:
            try:
                batch = [await receive.receive()]
            except trio.EndOfChannel:
                return []
            while len(batch) < _BATCH:
                try:
                    batch.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            return batch

        try:
            return trio.from_thread.run(next_batch, trio_token=self.token)
        except trio.RunFinishedError:
            raise _shutting_down() from None
