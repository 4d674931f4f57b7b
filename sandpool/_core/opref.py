"""OperationRef: one handle for an operation that runs as a trio task, usable from any thread.

An operation runs as a task in some trio loop: the portal's thread for sync and asyncio users, the
caller's own loop for trio ``async with`` users. Its ``OperationRef`` blocks (``ref.result()`` from
a thread not running trio, an asyncio loop's thread included: it then blocks that loop) and is
awaitable (``await ref`` from trio, in the same loop or another, or from asyncio; see ``_hosts``).
Helpers over many refs live in ``_waiting``.

Spawning and awaiting are on the hot path (tens of thousands of ops/s): a ref costs no thread,
and gets a threading.Event only when a thread actually blocks on it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import reprlib
import _thread
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Iterator
from typing import Any, Generic, Self, TypeVar

import trio

from .._errors import SandpoolError
from .hosts import HostEvent, current_host

__all__ = ["OperationCancelled", "OperationRef", "TaskHost", "check_not_in_trio"]

T = TypeVar("T")
logger = logging.getLogger(__name__)

_PENDING, _DONE, _FAILED, _CANCELLED = "pending", "done", "failed", "cancelled"
_SLICE = 0.1  # longest single blocking wait (s), so Ctrl-C on the main thread lands promptly
_CLOSED = "the session is closed: its trio loop or nursery no longer accepts operations"
# One lock guards the pending -> finished transition of every ref. It is held for a few
# attribute writes only, which is cheaper on the hot path than allocating a lock per ref.
_lock = threading.Lock()


class OperationCancelled(SandpoolError, concurrent.futures.CancelledError):
    """The operation was cancelled: by ``ref.cancel()``, by its awaiter being cancelled, or by
    the closing of the loop or session that ran it."""


def check_not_in_trio(call: str, fix: str) -> None:
    """Raise RuntimeError naming ``fix`` if this thread runs trio (blocking would hang its loop)."""
    if trio.lowlevel.in_trio_run():
        raise RuntimeError(f"{call} blocks; inside trio use {fix} instead")


class TaskHost:
    """Where operations run: a nursery plus the TrioToken of its loop.

    Tasks started here belong to the nursery: closing it cancels them and waits for them.
    """

    __slots__ = ("nursery", "token", "_thread")

    def __init__(self, nursery: trio.Nursery, token: trio.lowlevel.TrioToken) -> None:
        self.nursery, self.token = nursery, token
        self._thread = threading.get_ident()  # made in the loop's thread (cheap first test below)

    def in_loop_thread(self) -> bool:
        """True when called from the thread that runs this host's loop."""
        if threading.get_ident() != self._thread:  # the usual answer from other threads, cheaply
            return False
        try:
            return trio.lowlevel.current_trio_token() is self.token
        except RuntimeError:  # not inside any trio run
            return False

    def start_soon(self, async_fn: Callable[..., Awaitable[object]], *args: object,
                   on_refused: Callable[[Exception], None] | None = None) -> None:
        """Start ``async_fn(*args)`` in the nursery; thread-safe.

        From the loop's thread the task starts before this returns; from any other thread it
        starts soon after, in the loop's thread. There the nursery may have closed meanwhile: the
        task then never runs and ``on_refused(error)`` is called in the loop's thread (without
        ``on_refused``, a warning is logged).

        Raises:
            RuntimeError: the loop has finished, or (from the loop's thread) the nursery is closed.
        """
        if self.in_loop_thread():
            try:
                self.nursery.start_soon(async_fn, *args)
            except RuntimeError as exc:  # "Nursery is closed to new arrivals"
                raise RuntimeError(_CLOSED) from exc
            return
        self.call_soon(self._start_or_refuse, async_fn, args, on_refused)

    def spawn(self, async_fn: Callable[..., Awaitable[T]], *args: object) -> OperationRef[T]:
        """``OperationRef.spawn(self, async_fn, *args)``: an operation started here."""
        return OperationRef.spawn(self, async_fn, *args)

    def call_soon(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` soon in the loop's thread; thread-safe, returns at once.

        ``fn`` must not raise (an exception escaping it would crash the loop).
        Raises RuntimeError if the loop has finished.
        """
        try:
            self.token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            raise RuntimeError(_CLOSED) from None

    def call_in_loop(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` in the loop's thread: now if this is it, else soon (thread-safe);
        nothing if the loop has ended (its session closed, which settled everything)."""
        if self.in_loop_thread():
            fn(*args)
            return
        try:
            self.call_soon(fn, *args)
        except RuntimeError:
            pass

    def _start_or_refuse(self, async_fn: Any, args: tuple[Any, ...], on_refused: Any) -> None:
        # A run_sync_soon callback: an exception escaping from here would crash the loop.
        try:
            self.nursery.start_soon(async_fn, *args)
        except Exception as exc:
            error = exc
            if isinstance(exc, RuntimeError):  # "Nursery is closed to new arrivals"
                error = RuntimeError(_CLOSED)
                error.__cause__ = exc
            if on_refused is None:
                logger.warning("task %r was never started", async_fn, exc_info=error)
            else:
                on_refused(error)


class OperationRef(Generic[T]):
    """The handle of one operation: ``ref.result()`` from threads, ``await ref`` in trio or asyncio.

    The operation runs in a cancel scope of its own inside a ``TaskHost`` nursery. It ends with
    a value, an exception (the very object it raised) or cancellation.
    """

    __slots__ = ("_state", "_value", "_error", "_host", "_scope", "_callbacks", "_event")

    def __init__(self) -> None:
        """Make an unlaunched ref; subclasses build their own state, then call ``_launch``."""
        self._state = _PENDING
        self._value: Any = None
        self._error: BaseException | None = None
        self._host: TaskHost | None = None
        self._scope: trio.CancelScope | None = None
        self._callbacks: list[Callable[[Any], None]] | None = None  # each takes this ref
        self._event: _Waiter | None = None  # made only when a thread blocks on us

    @classmethod
    def spawn(cls, host: TaskHost, async_fn: Callable[..., Awaitable[T]], *args: object) -> OperationRef[T]:
        """Start ``await async_fn(*args)`` in ``host``; RuntimeError if the host is closed."""
        return cls()._launch(host, async_fn, *args)

    @classmethod
    def completed(cls, value: T) -> OperationRef[T]:
        """A ref already done with ``value``."""
        ref = cls()
        ref._finish(_DONE, value, None)
        return ref

    @classmethod
    def failed(cls, exc: BaseException) -> OperationRef[Any]:
        """A ref already failed with ``exc``."""
        ref = cls()
        ref._finish(_FAILED, None, exc)
        return ref

    def _launch(self, host: TaskHost, async_fn: Callable[..., Awaitable[T]], *args: object) -> OperationRef[T]:
        """Start the operation's task in ``host`` and return self. A ref cancelled before its
        launch stays cancelled: its body never runs. RuntimeError if the host is closed."""
        with _lock:
            if self._host is not None:
                raise RuntimeError(f"{self!r} was already launched")
            if self._state is not _PENDING:
                return self
            self._host, self._scope = host, trio.CancelScope()
        try:
            host.start_soon(self._run, async_fn, args, on_refused=self._refused)
        except RuntimeError as exc:
            self._finish(_FAILED, None, exc)
            raise
        return self

    async def _run(self, async_fn: Callable[..., Awaitable[T]], args: tuple[object, ...]) -> None:
        scope = self._scope
        assert scope is not None
        if scope.cancel_called:  # cancelled while its start was queued: never run the body
            self._finish(_CANCELLED, None, None)
            return
        value: T | None = None
        try:
            with scope:
                value = await async_fn(*args)
        except Exception as exc:  # the operation's own failure belongs to its ref, not the nursery
            self._finish(_FAILED, None, exc)
        except BaseException as exc:
            # Cancelled from outside (the host is closing), KeyboardInterrupt, SystemExit: record
            # it for the ref's readers, and let it reach the nursery, which must see it too.
            cancelled = isinstance(exc, trio.Cancelled)
            self._finish(_CANCELLED if cancelled else _FAILED, None, None if cancelled else exc)
            raise
        else:
            done = not scope.cancelled_caught
            self._finish(_DONE if done else _CANCELLED, value if done else None, None)

    def _refused(self, exc: Exception) -> None:
        self._finish(_FAILED, None, exc)

    # Settling without a task, for subclasses whose operation is carried out elsewhere (remote calls).
    def _set_result(self, value: T) -> None:
        self._finish(_DONE, value, None)

    def _set_error(self, error: BaseException) -> None:
        self._finish(_FAILED, None, error)

    def _set_cancelled(self) -> None:
        self._finish(_CANCELLED, None, None)

    def _finish(self, state: str, value: Any, error: BaseException | None) -> None:
        with _lock:
            event, callbacks = self._settle(state, value, error)
        self._notify(event, callbacks)

    def _settle(self, state: str, value: Any, error: BaseException | None) -> tuple[Any, Any]:
        # Called with _lock held. The value is written before the state, so that a reader that
        # sees a finished state without taking the lock also sees the value.
        if self._state is not _PENDING:
            return None, None
        self._value, self._error = value, error
        self._state = state
        event, callbacks, self._callbacks = self._event, self._callbacks, None
        return event, callbacks

    def _notify(self, event: _Waiter | None, callbacks: list[Any] | None) -> None:
        if event is not None:
            event.set()
        for fn in callbacks or ():
            self._call(fn)

    def _call(self, fn: Callable[[Self], None]) -> None:
        try:
            fn(self)
        except Exception:
            logger.exception("done callback %r of %r raised", fn, self)

    def done(self) -> bool:
        """True once the operation has a value, an exception, or was cancelled."""
        return self._state is not _PENDING

    def cancel(self) -> bool:
        """Ask the operation to stop; thread-safe, returns at once. False if it was already done.

        A running operation sees ``trio.Cancelled`` at its next checkpoint and runs its cleanup;
        its ref then raises OperationCancelled (if it returned before any checkpoint, it keeps
        its value). A ref not yet launched is cancelled now, and its body will never run.
        """
        with _lock:
            if self._state is not _PENDING:
                return False
            host, scope = self._host, self._scope
            event, callbacks = self._settle(_CANCELLED, None, None) if host is None else (None, None)
        if host is None:
            self._notify(event, callbacks)
        else:  # (a loop that is gone has ended the task already)
            host.call_in_loop(scope.cancel)  # type: ignore[union-attr]  # set with _host when the ref launched
        return True

    def add_done_callback(self, fn: Callable[[Self], None]) -> None:
        """Call ``fn(ref)`` once, in the loop's thread, when the operation finishes (at once, in
        this thread, if it has). Callbacks run in the order added; their exceptions are logged."""
        with _lock:
            if self._state is _PENDING:
                if self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        self._call(fn)

    def result(self, timeout: float | None = None) -> T:
        """Block until the operation finishes (at most ``timeout`` s; None: no limit); return its value.

        Raises:
            the operation's own exception (the same object it raised);
            OperationCancelled: the operation was cancelled;
            TimeoutError: ``timeout`` passed first (the operation keeps running);
            ValueError: ``timeout`` is negative, NaN or not a number;
            RuntimeError: called inside trio on an unfinished operation, where blocking would hang
                the loop (a finished one answers at once, anywhere).
        """
        _check_timeout(timeout)  # even when done: a bad value is a bug either way
        if self._state is _PENDING:
            check_not_in_trio("OperationRef.result()", "'await ref'")
            self._block(timeout)
        return self._unwrap()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Block as ``result()`` does, then return the operation's exception, or None if it
        returned a value. Raises OperationCancelled, TimeoutError and RuntimeError as ``result()``."""
        _check_timeout(timeout)
        if self._state is _PENDING:
            check_not_in_trio("OperationRef.exception()", "'await ref'")
            self._block(timeout)
        if self._state is _CANCELLED:
            raise OperationCancelled("the operation was cancelled")
        return self._error

    def _block(self, timeout: float | None) -> None:
        with _lock:
            if self._state is not _PENDING:
                return
            event = self._event = self._event or _Waiter()
        for seconds in _slices(_deadline(timeout)):
            if event.wait(seconds):
                return
        if not event.is_set():
            raise TimeoutError(f"operation did not finish within {timeout} s")

    def _unwrap(self) -> T:
        if self._state is _DONE:
            value: T = self._value
            return value
        if self._state is _FAILED:
            raise self._error  # type: ignore[misc]  # set whenever the state is _FAILED
        raise OperationCancelled("the operation was cancelled")

    def __await__(self) -> Generator[Any, None, T]:
        """Wait from trio (any loop) or asyncio, then return or raise as ``result()`` does.

        Cancelling the awaiting task cancels the operation too (the awaiter owns its interest),
        and re-raises the cancellation at once; the operation's cleanup goes on in its host.
        """
        return self._await().__await__()

    async def _await(self) -> T:
        if self._state is not _PENDING:
            if current_host() == "trio":
                await trio.lowlevel.checkpoint()
            return self._unwrap()
        finished = HostEvent()  # RuntimeError outside trio and asyncio
        self.add_done_callback(lambda _ref: finished.set())
        try:
            await finished.wait()
        except BaseException:  # trio.Cancelled, asyncio.CancelledError, KeyboardInterrupt: given up on
            self.cancel()
            raise
        return self._unwrap()

    def __repr__(self) -> str:
        name, state = type(self).__name__, self._state
        if state is _DONE:
            return f"<{name} done value={reprlib.repr(self._value)}>"
        if state is _FAILED:
            return f"<{name} failed {type(self._error).__name__}>"
        return f"<{name} {state}>"


def _check_timeout(timeout: float | None) -> None:
    """A wait's ``timeout``: None (no limit) or seconds >= 0 (0 only looks); anything else is a bug."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout >= 0):  # NaN is not >= 0 either
        raise ValueError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}; "
                         f"use e.g. timeout=30 (0 only looks, None waits for ever)")


def _deadline(timeout: float | None) -> float | None:
    _check_timeout(timeout)
    return None if timeout is None else time.monotonic() + timeout


class _Waiter:
    """What threads blocked on a ref wait for: a one-shot event on a bare lock, held until
    ``set`` (threading.Event's condition costs each wait and wake a Python-level lock dance,
    ~10 us of a sync round trip). ``set`` is called once (under the ref's settling)."""

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()
        self._set = False

    def set(self) -> None:
        self._set = True
        self._lock.release()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """True once set (waiting at most ``timeout`` s); each waiter passes the lock on."""
        if self._lock.acquire(timeout=timeout):
            self._lock.release()
            return True
        return self._set


def _slices(deadline: float | None) -> Iterator[float]:
    """Wait lengths of at most _SLICE s until ``deadline`` passes (for ever if it is None)."""
    while deadline is None:
        yield _SLICE
    while (left := deadline - time.monotonic()) > 0:
        yield min(left, _SLICE)
