"""The background trio thread and runtimes that sync sessions share, counted by their users.

Sync sessions (and ``async with`` sessions under asyncio) run in a trio loop of their own thread, a
:class:`~sandpool._core.portal.Portal`. Starting one per session would cost a thread and, for the
default :class:`LocalRuntime`, a template process each time, so open sessions share them: the first
to open starts the portal (:func:`lease`) and, inside it, each runtime (:meth:`Shelf.hold`); the last
to close stops the runtime (:meth:`Shelf.release`) and then the portal (:meth:`Lease.release`).
Once every session has closed, nothing of sandpool runs in the background. A session never closed
(no ``with``) keeps them until exit, when an atexit hook closes the portal as a courtesy (its
runtimes stop what is left); nothing relies on it: sandboxes notice their owner's death.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

import trio

from .._core.portal import Portal
from .._runtime.contract import Runtime
from .._runtime.local import LocalRuntime

__all__ = ["Lease", "Shelf", "call_blocking", "lease", "owner_dirs", "register_exit_hook"]


class _Held:
    """One runtime the shelf holds open: its users, and the event that lets its keeper close it."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.users = 0
        self.ready = trio.Event()
        self.error: BaseException | None = None
        self.release = trio.Event()
        self.closed = trio.Event()


class Shelf:
    """The runtimes open in one portal, each held open while a session uses it. Used in the portal's
    loop only (no locking needed)."""

    def __init__(self, portal: Portal) -> None:
        self._portal = portal
        self._held: dict[int, _Held] = {}
        self._local: LocalRuntime | None = None

    def runtimes(self) -> list[Runtime]:
        return [held.runtime for held in self._held.values()]

    def choose(self, runtime: Runtime | None) -> Runtime:
        """The runtime ``hold(runtime)`` would open now (None: the shared LocalRuntime), not opened."""
        if runtime is None:
            runtime = self._local = self._local or LocalRuntime()
        return runtime

    async def hold(self, runtime: Runtime | None) -> Runtime:
        """``runtime`` (None: the shared LocalRuntime) opened, and counted as used once more."""
        runtime = self.choose(runtime)
        held = self._held.get(id(runtime))
        if held is None:
            held = self._held[id(runtime)] = _Held(runtime)
            try:
                await self._portal.host.nursery.start(_keep, held)
            except BaseException as exc:
                # opening failed: raise that error itself, not the keeper's nursery group around it
                inner = exc.exceptions[0] if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1 else None
                held.error = exc if inner is None else inner
                self._forget(held)
                if inner is not None:
                    raise inner from None
                raise
            finally:
                held.ready.set()
        else:
            await held.ready.wait()
            if held.error is not None:
                raise held.error
        held.users += 1
        return runtime

    async def release(self, runtime: Runtime) -> None:
        """One user less; the last one closes the runtime (stopping what is left) and waits for that."""
        held = self._held.get(id(runtime))
        if held is None:
            return
        held.users -= 1
        if held.users == 0:
            self._forget(held)
            held.release.set()
            await held.closed.wait()

    def _forget(self, held: _Held) -> None:
        self._held.pop(id(held.runtime), None)
        if held.runtime is self._local:
            self._local = None


async def _keep(held: _Held, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Hold ``held.runtime`` open until its last user leaves (or the portal closes), then close it.

    The close runs inside the nursery, while the runtime's own tasks still run: they report the
    sandboxes' exits that the close waits for.
    """
    try:
        async with trio.open_nursery() as nursery:
            try:
                await held.runtime.open(nursery)
                task_status.started()
                await held.release.wait()
            finally:
                with trio.CancelScope(shield=True):
                    await held.runtime.aclose()
            nursery.cancel_scope.cancel()
    finally:
        held.closed.set()


class Lease:
    """One session's use of the shared portal. ``release()`` once; the last user's stops the portal."""

    def __init__(self, registry: _Registry, portal: Portal, shelf: Shelf) -> None:
        self._registry = registry
        self.portal = portal
        self.shelf = shelf
        self._released = False
        self._last = False

    def release(self) -> None:
        """Give the portal back; the last user's release stops it and, outside its own loop, joins
        its thread. Idempotent: a second call only joins (when the first could not)."""
        with self._registry.lock:
            first = not self._released
            self._released = True
            if first:
                self._last = self._registry.give_back(self.portal)
        if not self._last:
            return
        if trio.lowlevel.in_trio_run():
            self.portal.request_close()  # from a task: the thread ends on its own; a later release joins it
        else:
            self.portal.close()


class _Registry:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.portal: Portal | None = None
        self.shelf: Shelf | None = None
        self.users = 0

    def take(self) -> Lease:
        with self.lock:
            register_exit_hook()
            if self.portal is None or self.portal.closed:
                portal = Portal("sandpool-session-portal")
                portal.start()
                self.portal, self.shelf, self.users = portal, Shelf(portal), 0
            self.users += 1
            assert self.shelf is not None
            return Lease(self, self.portal, self.shelf)

    def give_back(self, portal: Portal) -> bool:
        """One user less (the caller holds the lock); True when it was the portal's last."""
        if portal is not self.portal:
            return False
        self.users -= 1
        if self.users > 0:
            return False
        self.portal = self.shelf = None
        return True


_REGISTRY = _Registry()
_AT_EXIT: list[bool] = []


def register_exit_hook() -> None:
    """Register the exit hook that closes the portal (once). atexit runs hooks last-registered
    first, so a hook that still needs the portal at exit (the default sessions' close) registers
    after calling this."""
    if not _AT_EXIT:
        atexit.register(_close_at_exit)
        _AT_EXIT.append(True)


def _close_at_exit() -> None:
    with _REGISTRY.lock:
        portal = _REGISTRY.portal
    if portal is not None:
        portal.close()


def lease() -> Lease:
    """A share of the background portal, started if no session holds it. Release it when done."""
    return _REGISTRY.take()


T = TypeVar("T")


def call_blocking(fn: Callable[..., T], *args: object) -> T:
    """Run a blocking call; from inside a trio loop, in a helper thread (a one-time, short wait)."""
    if not trio.lowlevel.in_trio_run():
        return fn(*args)
    box: list[tuple[bool, Any]] = []

    def target() -> None:
        try:
            box.append((True, fn(*args)))
        except BaseException as exc:  # handed to the caller below
            box.append((False, exc))

    thread = threading.Thread(target=target, name="sandpool-open")
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return cast(T, value)


def owner_dirs() -> list[str]:
    """Owner directories of the LocalRuntimes open in the background portal now (for leak checks)."""
    shelf = _REGISTRY.shelf
    runtimes = shelf.runtimes() if shelf is not None else []
    return [r.owner_dir for r in runtimes if isinstance(r, LocalRuntime) and r.owner_dir]


def _forget_after_fork() -> None:
    # A forked child has no portal thread, and the lock may have been held at the fork.
    global _REGISTRY
    _REGISTRY = _Registry()


os.register_at_fork(after_in_child=_forget_after_fork)
