"""Portal: a trio loop in one daemon thread, the single bridge from sync code into trio.

Sync users get their operations run as tasks in the portal's root nursery and hold them as
``OperationRef``s. Use a portal as a ``with`` block (or give it an owner that closes it): leaving
it cancels whatever still runs, lets shielded cleanup finish, and joins the thread. There is no
process-wide portal: sync sessions share one through a reference-counted lease
(``sandpool._session.background``), and the last session to close stops it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeVar

import trio

from .opref import OperationRef, TaskHost, check_not_in_trio

__all__ = ["Portal"]

T = TypeVar("T")
logger = logging.getLogger(__name__)


class Portal:
    """A trio event loop running in one daemon thread; the single sync-to-async bridge.

    Thread-safe: any thread may spawn into it. The loop's root nursery owns every operation.
    """

    def __init__(self, name: str = "sandpool-portal") -> None:
        """Make a portal whose thread will be called ``name``; nothing starts until ``start()``."""
        self.name = name
        self._lock = threading.Lock()
        self._ready = threading.Event()  # set once the loop runs, or once it failed to start
        self._thread: threading.Thread | None = None
        self._host: TaskHost | None = None
        self._stop: trio.Event | None = None
        self._closed = False

    def start(self) -> None:
        """Start the thread and return once its loop runs; idempotent.

        Raises:
            RuntimeError: the portal is closed, or its loop failed to start.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("portal is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
                self._thread.start()
        self._ready.wait()
        if self._host is None:
            raise RuntimeError(f"portal {self.name!r} failed to start; see the logged error")

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException:  # a crashed loop must not end silently in its thread
            logger.exception("portal %r: its trio loop crashed", self.name)
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._host = TaskHost(nursery, trio.lowlevel.current_trio_token())
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed

    @property
    def host(self) -> TaskHost:
        """The portal's root nursery and loop token.

        Raises:
            RuntimeError: the portal is closed, or not started.
        """
        if self._closed:
            raise RuntimeError("portal is closed")
        if self._host is None:
            raise RuntimeError("portal is not running; use 'with Portal() as portal:' or call portal.start()")
        return self._host

    def spawn(self, async_fn: Callable[..., Awaitable[T]], *args: object) -> OperationRef[T]:
        """Start ``await async_fn(*args)`` in the portal's loop and return its ref at once.

        Raises:
            RuntimeError: the portal is closed, or not started.
        """
        return OperationRef.spawn(self.host, async_fn, *args)

    def run(self, async_fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run ``await async_fn(*args)`` in the portal's loop; block until it ends and return its value.

        Its exception is raised here as itself. If this thread is interrupted while it waits
        (Ctrl-C), the operation is cancelled before the interruption propagates.

        Raises:
            RuntimeError: called inside trio (where it would hang the loop), or the portal is
                closed or not started.
        """
        check_not_in_trio("Portal.run()", "'await async_fn(*args)'")
        ref = self.spawn(async_fn, *args)
        try:
            return ref.result()
        except BaseException:
            ref.cancel()  # the caller gave up on its call: stop it (a no-op if it had ended)
            raise

    def request_close(self) -> None:
        """Ask the loop to cancel everything and end, without waiting; callable from any thread,
        the portal's own tasks included. Idempotent; ``close()`` afterwards joins the thread."""
        with self._lock:
            self._closed = True
        if self._host is not None and self._stop is not None:
            try:
                self._host.token.run_sync_soon(self._stop.set)
            except trio.RunFinishedError:  # the loop has ended already
                pass

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every task still running, let their shielded cleanup finish, join the thread.

        Idempotent; afterwards ``start``, ``spawn`` and ``run`` raise RuntimeError. The join
        waits at most ``timeout`` s: a task that holds out longer is logged, and its daemon
        thread is left behind (a later ``close()`` joins again).

        Raises:
            RuntimeError: called inside trio, including from the portal's own tasks.
        """
        check_not_in_trio("Portal.close()", "'await trio.to_thread.run_sync(portal.close)'")
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        self._ready.wait(timeout)
        self.request_close()
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("portal %r: tasks still running %s s after cancellation; "
                           "leaving its daemon thread behind", self.name, timeout)

    def __enter__(self) -> Portal:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._host is None:
            state = "not started"
        else:
            state = "running"
        return f"<Portal {self.name!r} {state}>"
