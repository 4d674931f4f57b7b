"""The one bridge between grpcio's threads and trio, for servers and clients alike.

grpcio's sync API (the only one usable beside trio) moves every message in threads of its own:
a server runs each handler in a pool thread, a client blocks whoever pulls a response iterator.
sandpool's servers and clients live in a trio loop. Everything that crosses between the two goes
through here:

- **Server** (:class:`ServerBridge`, one per servicer): ``run`` awaits a coroutine in the loop for
  a unary handler; ``stream`` runs a producer task there and hands its messages to the handler's
  thread through an :class:`Outbox` (bounded; a message costs no round trip through the loop);
  ``run_sync``/``soon`` call plain functions there; ``pump`` moves a request iterator into a
  :class:`ThreadPipe` from a thread of its own. Work started for an RPC runs in an
  :class:`RpcScope`, cancelled when the RPC ends first (client gone, cancelled, deadline).
- **Client**: ``await result_of(future)`` for a unary call (cancelling the task cancels the call),
  ``await next_message(iterator)`` for one message of a stream, ``await pump_responses(call,
  pipe)`` to move a whole response stream into a ThreadPipe.

Failures are not translated here: the loop being gone (``trio.RunFinishedError``) becomes
:func:`shutting_down` (a SandboxUnavailableError), an RPC ended before its work did becomes
:class:`RpcEnded`; each servicer maps them to its own statuses, in its one place for that.
Wake-ups between a thread and the loop are :class:`~sandpool._core.hosts.HostEvent` s.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator
from typing import Any, Protocol, TypeVar

import grpc
import trio

from .._core.hosts import HostEvent
from .._errors import SandboxUnavailableError
from .threadpipe import ThreadPipe

#: Messages between a stream's producer and its server thread, by default.
STREAM_BUFFER = 64
#: Messages a server thread takes from an Outbox at once.
BATCH = 64


def shutting_down() -> SandboxUnavailableError:
    """The error of a call whose server loop is gone or going."""
    return SandboxUnavailableError("the sandpool server is shutting down")


T = TypeVar("T")


class RpcEnded(Exception):
    """The RPC ended (the client cancelled, went away, or its deadline passed) before its result."""


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

    @contextlib.contextmanager
    def open(self) -> Iterator[trio.CancelScope]:
        """The scope to run the RPC's work in (in the trio thread). Once the work is over the RPC's
        end has nothing to cancel: it then costs the loop no wake-up."""
        scope = trio.CancelScope()
        with self._lock:
            self._scope = scope
            if self.ended:
                scope.cancel()
        try:
            with scope:
                yield scope
        finally:
            with self._lock:
                self._scope = None


class ServerBridge:
    """Runs a servicer's work in its trio loop (``token``), streams' producers in ``nursery``."""

    def __init__(self, token: trio.lowlevel.TrioToken, nursery: trio.Nursery) -> None:
        self.token = token
        self.nursery = nursery

    def run(self, context: grpc.ServicerContext, async_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """``await async_fn(*args)`` in the loop, cancelled if the RPC ends first; its result, or its
        exception raised here (RpcEnded if cancelled so, ``shutting_down()`` if the loop is gone)."""
        rpc = RpcScope(context, self.token)

        async def run() -> Any:
            with rpc.open():
                return await async_fn(*args)
            raise RpcEnded("the call ended before its result")

        try:
            return trio.from_thread.run(run, trio_token=self.token)
        except trio.RunFinishedError:
            raise shutting_down() from None

    def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the loop; its result (``shutting_down()`` if the loop is gone)."""
        try:
            return trio.from_thread.run_sync(fn, *args, trio_token=self.token)
        except trio.RunFinishedError:
            raise shutting_down() from None

    def soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)`` soon in the loop, not waited for; nothing if the loop is gone."""
        try:
            self.token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    def stream(self, context: grpc.ServicerContext, async_fn: Callable[..., Awaitable[Any]], *args: Any,
               buffer: int = STREAM_BUFFER) -> Generator[list[Any], None, None]:
        """Run ``async_fn(*args, outbox)`` in the nursery, cancelled if the RPC ends first; yield what
        it sends through ``await outbox.send(message)``, in batches (lists) of what is queued, then
        raise what it raised (the loop closing under it: ``shutting_down()``). At most ``buffer`` messages
        wait: a slow client slows the producer down, not the server's memory."""
        rpc = RpcScope(context, self.token)
        outbox = Outbox(buffer)

        async def produce() -> None:
            try:
                with rpc.open():
                    await async_fn(*args, outbox)
            except BaseException as exc:  # reported to the client by the server thread
                if not isinstance(exc, Exception):  # cancelled from outside: the server is closing
                    outbox.close(shutting_down())
                    raise
                outbox.close(exc)
            else:
                outbox.close()

        def start() -> None:  # in the trio loop
            try:
                self.nursery.start_soon(produce)
            except RuntimeError:  # the nursery is closed
                outbox.close(shutting_down())

        try:
            self.token.run_sync_soon(start)
        except trio.RunFinishedError:
            raise shutting_down() from None
        try:
            while batch := outbox.get_batch():
                yield batch
        finally:
            outbox.close()  # a producer still sending learns that nobody reads any more
        if outbox.failure is not None:
            raise outbox.failure

    @staticmethod
    def pump(requests: Iterable[bytes], pipe: ThreadPipe, name: str) -> None:
        """Move a request iterator's messages into ``pipe`` from a daemon thread of its own, until
        either ends; then close ``pipe`` (a client that went away ends the stream's requests)."""

        def pump() -> None:
            try:
                for message in requests:
                    if not pipe.put_blocking(message):
                        return
            except Exception:  # the client went away; the stream's own status says how
                pass
            finally:
                pipe.close()

        threading.Thread(target=pump, daemon=True, name=name).start()


class Sender(Protocol):
    """Where a stream's producer sends its messages: the :class:`Outbox` ``stream`` hands it (or a
    trio memory channel)."""

    async def send(self, message: Any, /) -> None: ...


class Outbox:
    """Messages from a trio producer to one server thread. ``send`` (trio) waits while ``limit``
    are queued; ``get_batch`` (thread) takes up to ``BATCH`` at once, [] at the end. ``close(failure)``
    ends it from either side; ``send`` then raises BrokenResourceError."""

    def __init__(self, limit: int = STREAM_BUFFER) -> None:
        self._limit = limit
        self._cond = threading.Condition()
        self._queue: collections.deque[Any] = collections.deque()
        self._closed = False
        self._room: HostEvent | None = None  # the producer waits on it while the queue is full
        self.failure: BaseException | None = None

    def __repr__(self) -> str:
        return f"<Outbox {'closed' if self._closed else 'open'} {len(self._queue)}/{self._limit} queued>"

    async def send(self, message: Any) -> None:
        while True:
            with self._cond:
                if self._closed:
                    raise trio.BrokenResourceError("the stream's reader has gone")
                if len(self._queue) < self._limit:
                    self._queue.append(message)
                    self._cond.notify()
                    break
                room = self._room = self._room or HostEvent.for_trio()
            await room.wait()
        await trio.lowlevel.checkpoint()

    def close(self, failure: BaseException | None = None) -> None:
        with self._cond:
            if not self._closed:
                self._closed, self.failure = True, failure
            self._cond.notify_all()
            room, self._room = self._room, None
        if room is not None:
            room.set()

    def get_batch(self) -> list[Any]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            room, self._room = self._room, None
        if room is not None:
            room.set()
        return batch


# -- client side ---------------------------------------------------------------------------------

async def result_of(future: grpc.Future) -> Any:
    """The result of a unary call's ``future`` (or its RpcError raised), awaited without blocking the
    loop; cancelling the awaiting task cancels the call."""
    done = HostEvent.for_trio()
    future.add_done_callback(lambda _future: done.set())  # in a gRPC thread, or here if done already
    try:
        await done.wait()
    except BaseException:
        future.cancel()
        raise
    return future.result()


async def next_message(iterator: Iterator[Any], default: Any = None) -> Any:
    """The next message of a response stream (``default`` at its end), pulled in a worker thread;
    a cancelled task leaves the thread behind, to end when the caller cancels the call."""
    return await trio.to_thread.run_sync(next, iterator, default, abandon_on_cancel=True)


async def in_thread(fn: Callable[[], T]) -> T:
    """``fn()``, a blocking wait on a call (draining it), in a worker thread that a cancelled task
    leaves behind (it ends when the call is cancelled)."""
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


async def pump_responses(call: Any, pipe: ThreadPipe) -> tuple[str, Any]:
    """Move a response stream's messages into ``pipe`` (from a worker thread) until it ends:
    ``("ended", trailing metadata)``, or ``("failed", the RpcError)``. If ``pipe`` is closed first
    the call is cancelled (and reported as it then ends)."""

    def read() -> tuple[str, Any]:
        try:
            for message in call:
                if not pipe.put_blocking(message):
                    call.cancel()
                    break
            return "ended", dict(call.trailing_metadata() or ())
        except grpc.RpcError as exc:
            return "failed", exc

    return await in_thread(read)
