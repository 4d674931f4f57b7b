"""The three hosts of one trio implementation: which one is calling, and the bridge to the others.

sandpool runs on trio. Its caller is one of three hosts:

- ``"trio"``: a trio task. Operations of a session opened with ``async with`` run in that very loop;
  those of a sync session (or a standalone ``Sandbox.run()``) run in the portal's loop, another one.
- ``"asyncio"``: a coroutine under a running asyncio loop. Every operation runs in a portal's trio
  loop in a background thread, and is awaited through an asyncio future that the trio side completes
  with ``loop.call_soon_threadsafe`` (see ``OperationRef.__await__``).
- ``"sync"``: plain code; it blocks on ``ref.result()``.

The helpers here let one ``async def`` of the public API serve trio and asyncio alike: ``call_in``
runs a trio coroutine in its owner's loop and awaits it from whatever host calls, with that host's
cancellation; ``settle`` waits for a cleanup that the caller's cancellation must not cut short.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import trio

if TYPE_CHECKING:  # imported only by asyncio hosts, which have it loaded
    import asyncio

__all__ = ["Host", "HostEvent", "call_in", "checkpoint", "current_host", "settle", "to_thread"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
Host = Literal["trio", "asyncio", "sync"]


class Operation(Protocol[T_co]):
    """What ``call_in`` and ``settle`` use of an operation (``opref.OperationRef``, which imports this module)."""

    def done(self) -> bool: ...
    def result(self) -> T_co: ...
    def exception(self) -> BaseException | None: ...
    def add_done_callback(self, fn: Callable[[Operation[T_co]], None]) -> None: ...
    def __await__(self) -> Generator[Any, None, T_co]: ...


class Spawner(Protocol):
    """What ``call_in`` uses of a task host (``opref.TaskHost``)."""

    def in_loop_thread(self) -> bool: ...
    def spawn(self, async_fn: Callable[..., Awaitable[T]], *args: Any) -> Operation[T]: ...


def current_host() -> Host:
    """Who calls: ``"trio"`` inside a trio task (trio's run_sync_soon callbacks count, as they run
    in a system task), ``"asyncio"`` with an asyncio loop running in this thread, else ``"sync"``."""
    try:
        trio.lowlevel.current_task()
        return "trio"
    except RuntimeError:
        pass
    asyncio = sys.modules.get("asyncio")  # nobody runs an asyncio loop without having imported it
    if asyncio is not None:
        try:
            asyncio.get_running_loop()
            return "asyncio"
        except RuntimeError:
            pass
    return "sync"


async def call_in(host: Spawner, async_fn: Callable[..., Awaitable[T]], *args: Any,
                  abandoned: Callable[[Operation[T]], None] | None = None) -> T:
    """``await async_fn(*args)`` in ``host``'s trio loop, awaited from the calling trio or asyncio task.

    From a trio task of that very loop it is a plain call. From anywhere else (another trio loop, or
    asyncio) it runs as an operation of ``host``: cancelling the caller cancels it there (its cleanup
    runs in ``host``), and its exception is raised in the caller as itself. If the caller gave up
    while the operation could still finish with a value (it had passed its last checkpoint),
    ``abandoned(ref)`` is called with its ref once it ends, in ``host``'s loop: a reader keeps the
    item it took that way, for the next call.
    """
    if host.in_loop_thread() and current_host() == "trio":
        return await async_fn(*args)
    ref = host.spawn(async_fn, *args)
    try:
        return await ref
    except BaseException:
        if abandoned is not None:
            ref.add_done_callback(abandoned)
        raise


class HostEvent:
    """A one-shot wake-up for the trio or asyncio task that makes it: ``set()`` from any thread (or
    any trio loop), ``await wait()`` in the making task's own loop.

    Raises RuntimeError when made outside a trio task and outside a running asyncio loop.
    """

    __slots__ = ("_event", "_token", "_thread", "_loop", "_future")

    def __init__(self) -> None:
        host = current_host()
        if host == "trio":
            self._event: trio.Event | None = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._thread = threading.get_ident()  # a set() from this thread runs inside this loop
        elif host == "asyncio":
            self._event = None
            self._loop = sys.modules["asyncio"].get_running_loop()
            self._future = self._loop.create_future()
        else:
            raise RuntimeError("sandpool's async API runs under trio or asyncio; call it from a task of either, "
                               "or use the blocking forms (ref.result(), 'for', 'with') from sync code")

    @classmethod
    def for_trio(cls) -> HostEvent:
        """A HostEvent of the calling trio task, made without asking which host calls (the caller knows
        it is trio: the thread pipes' and the gRPC bridge's waits, where this is on every wait)."""
        self = cls.__new__(cls)
        self._event = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.get_ident()
        return self

    def set(self) -> None:
        """Wake the waiter; thread-safe, idempotent, never raises (a waiter whose loop ended is gone)."""
        event = self._event
        if event is not None:
            if threading.get_ident() == self._thread:
                event.set()
                return
            try:
                self._token.run_sync_soon(event.set)
            except trio.RunFinishedError:
                pass
        else:
            try:
                self._loop.call_soon_threadsafe(self._resolve)
            except RuntimeError:  # "Event loop is closed"
                pass

    def _resolve(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    async def wait(self) -> None:
        """Until ``set()``; a checkpoint of the waiting task's host (its cancellation lands here)."""
        if self._event is not None:
            await self._event.wait()
        else:
            await self._future

    async def wait_shielded(self) -> None:
        """Until ``set()``, whatever the waiter's cancellation does meanwhile (a cleanup must end);
        a cancellation that arrived is raised afterwards."""
        if self._event is not None:
            with trio.CancelScope(shield=True):  # trio's cancellation is a state: it lands at the next checkpoint
                await self._event.wait()
            return
        await _shielded(self._future)


async def _shielded(future: asyncio.Future[T]) -> T:
    """Await an asyncio future to its end, holding back the awaiting task's cancellation meanwhile;
    a cancellation that arrived is raised then (asyncio delivers one only once: it must not be lost)."""
    aio = sys.modules["asyncio"]
    held: BaseException | None = None
    while not future.done():
        try:
            await aio.shield(future)
        except aio.CancelledError as exc:
            if future.cancelled():  # the future itself was cancelled, not the awaiting task
                raise
            held = exc
    if held is not None:
        raise held
    return future.result()


async def checkpoint() -> None:
    """Let the calling trio or asyncio task's loop run others (and deliver a pending cancellation)."""
    if current_host() == "trio":
        await trio.lowlevel.checkpoint()
    else:
        await sys.modules["asyncio"].sleep(0)


async def settle(ref: Operation[T]) -> T:
    """Wait for ``ref`` (a cleanup: a stop, a close) from trio or asyncio, whatever the caller's
    cancellation does meanwhile, then return or raise as ``ref.result()`` does.

    The wait never cancels ``ref``; a cancellation of the caller that arrived meanwhile is raised once
    ``ref`` has ended, instead of its outcome. The cleanup must be bounded on its own (stops escalate
    to kill).
    """
    if not ref.done():
        finished = HostEvent()
        ref.add_done_callback(lambda _ref: finished.set())
        await finished.wait_shielded()
    return ref.result()


async def to_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a short blocking ``fn(*args)`` (opening a session: starting the portal and its runtime)
    in a worker thread, awaited from trio or asyncio, so that the caller's loop keeps running.

    Under both hosts a cancellation waits for ``fn`` to return (what it opened must be known, to be
    closed), then is raised."""
    if current_host() == "trio":
        return await trio.to_thread.run_sync(fn, *args)
    loop = sys.modules["asyncio"].get_running_loop()
    future: asyncio.Future[T] = loop.run_in_executor(None, fn, *args)
    return await _shielded(future)
