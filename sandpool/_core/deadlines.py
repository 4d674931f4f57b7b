"""Deadlines of operations that run without a task of their own, kept by one lazy task of a loop.

An operation started from a thread other than its loop's (an exec from a sync caller) can go out
with no hop into the loop; its timeout still needs the loop's clock. ``Deadlines`` keeps such
timeouts: ``add`` from any thread costs no hop into the loop unless the new deadline comes before
the one its task sleeps until (or no task runs), and ``discard`` never does. The task wakes at
that deadline even if its operation finished meanwhile, looks at what is still due, and sleeps
again or ends, so a steady stream of operations with the same timeout wakes the loop about once
per timeout.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable

import trio

from .opref import TaskHost

__all__ = ["Deadlines"]


class Deadlines:
    """Timeouts by key, each calling its ``expire()`` in the loop's thread once due (monotonic clock)."""

    def __init__(self, host: Callable[[], TaskHost]) -> None:
        self._host = host
        self._lock = threading.Lock()  # guards _due and _armed against add's and discard's threads
        self._due: dict[Hashable, tuple[float, Callable[[], None]]] = {}
        self._armed = math.inf  # when the task wakes next (inf: no task runs, or it is about to end)
        self._running = False  # a task runs (loop thread only)
        self._wake: trio.Event | None = None  # set to make the running task look again (loop thread only)

    def __repr__(self) -> str:
        return f"<Deadlines {len(self._due)} due, {'running' if self._running else 'idle'}>"

    def add(self, key: Hashable, seconds: float, expire: Callable[[], None]) -> None:
        """Call ``expire()`` in the loop's thread ``seconds`` from now, unless ``discard(key)``
        comes first. Any thread. RuntimeError if the loop has finished."""
        due = time.monotonic() + seconds
        with self._lock:
            self._due[key] = (due, expire)
            if due >= self._armed:
                return
            self._armed = due
        host = self._host()
        if host.in_loop_thread():
            self._rearm()
        else:
            host.call_soon(self._rearm)

    def discard(self, key: Hashable) -> None:
        """Forget ``key``'s deadline (nothing if it has none). Any thread."""
        with self._lock:
            self._due.pop(key, None)

    def _rearm(self) -> None:
        # In the loop's thread (a run_sync_soon callback: it must not raise).
        if self._running:
            if self._wake is not None:  # else its first look, still to come, sees the new deadline
                self._wake.set()
            return
        try:
            self._host().nursery.start_soon(self._watch)
        except RuntimeError:  # the nursery is closing: so is everything whose deadline this was
            with self._lock:
                self._armed = math.inf
            return
        self._running = True

    async def _watch(self) -> None:
        try:
            while True:
                with self._lock:
                    now = time.monotonic()
                    expired = [(key, expire) for key, (due, expire) in self._due.items() if due <= now]
                    for key, _ in expired:
                        del self._due[key]
                    self._armed = min((due for due, _ in self._due.values()), default=math.inf)
                    armed = self._armed
                for _, expire in expired:
                    expire()
                if armed == math.inf:
                    return
                self._wake = trio.Event()
                with trio.move_on_after(armed - now):
                    await self._wake.wait()
        finally:
            self._running, self._wake = False, None
            with self._lock:
                self._armed = math.inf
