"""Contract tests for Portal, with real threads and a real trio loop."""

from __future__ import annotations

import logging
import threading

import pytest
import trio

from sandpool._core.opref import OperationCancelled
from sandpool._core.portal import Portal


def threads_named(name):
    return [thread for thread in threading.enumerate() if thread.name == name]


async def add(a, b):
    await trio.lowlevel.checkpoint()
    return a + b


async def fail():
    raise KeyError("remote")


def test_run_returns_the_value_and_spawn_returns_a_ref():
    """run() blocks for the value; spawn() returns an OperationRef at once."""
    with Portal("test-portal-run") as portal:
        assert portal.run(add, 1, 2) == 3
        assert portal.spawn(add, 2, 3).result(timeout=5) == 5
        with pytest.raises(KeyError):
            portal.run(fail)
        assert repr(portal) == "<Portal 'test-portal-run' running>"
    assert repr(portal) == "<Portal 'test-portal-run' closed>"


def test_run_inside_trio_raises_runtimeerror_naming_await():
    """run() inside trio raises RuntimeError that says to await instead."""
    with Portal("test-portal-in-trio") as portal:

        async def main():
            with pytest.raises(RuntimeError, match="Portal.run.* blocks; inside trio use 'await"):
                portal.run(add, 1, 2)

        trio.run(main)


def test_spawn_before_start_raises_naming_the_fix():
    """spawn() on a portal that was never started raises RuntimeError that names 'with Portal()'."""
    portal = Portal("test-portal-unstarted")
    assert repr(portal) == "<Portal 'test-portal-unstarted' not started>"
    with pytest.raises(RuntimeError, match="with Portal"):
        portal.spawn(add, 1, 2)
    portal.close()


def test_close_cancels_pending_operations_and_joins_the_thread():
    """close() cancels running operations, lets their shielded cleanup finish, and joins the thread."""
    started, cleaned_up = threading.Event(), threading.Event()

    async def hold():
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(0.05)
                cleaned_up.set()

    portal = Portal("test-portal-close")
    portal.start()
    refs = [portal.spawn(hold) for _ in range(3)]
    assert started.wait(5)
    assert len(threads_named("test-portal-close")) == 1
    portal.close()
    assert threads_named("test-portal-close") == []
    assert cleaned_up.is_set()
    for ref in refs:
        with pytest.raises(OperationCancelled):
            ref.result(timeout=0)


def test_after_close_spawn_run_and_start_raise_and_close_is_idempotent():
    """Once closed, spawn(), run() and start() raise RuntimeError('portal is closed'); close() again is a no-op."""
    with Portal("test-portal-closed") as portal:
        pass
    portal.close()
    for call in (lambda: portal.spawn(add, 1, 2), lambda: portal.run(add, 1, 2), portal.start):
        with pytest.raises(RuntimeError, match="portal is closed"):
            call()


def test_close_is_bounded_by_its_timeout(caplog):
    """close() returns after its timeout when a task holds out, logs it, and a later close() joins."""
    release = threading.Event()
    started = threading.Event()

    async def stubborn():
        started.set()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(release.wait)

    portal = Portal("test-portal-stubborn")
    portal.start()
    portal.spawn(stubborn)
    assert started.wait(5)
    with caplog.at_level(logging.WARNING, logger="sandpool._core.portal"):
        portal.close(timeout=0.1)
    assert "leaving its daemon thread behind" in caplog.text
    assert len(threads_named("test-portal-stubborn")) == 1
    release.set()
    portal.close()
    assert threads_named("test-portal-stubborn") == []


def test_close_from_inside_the_portal_raises_runtimeerror():
    """close() called by one of the portal's own tasks raises RuntimeError instead of deadlocking."""
    with Portal("test-portal-self-close") as portal:

        async def close_self():
            portal.close()

        with pytest.raises(RuntimeError, match="Portal.close.* blocks"):
            portal.run(close_self)


def test_request_close_from_the_portals_own_task_ends_the_thread():
    """request_close() may be called from a task of the portal itself (where close() refuses): the
    loop ends on its own, and a later close() joins the thread; the portal then refuses work."""
    portal = Portal("test-portal-request-close")
    portal.start()

    async def close_soon():
        portal.request_close()

    portal.spawn(close_soon)
    portal.close(timeout=10)
    assert not any(t.name == "test-portal-request-close" for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="closed"):
        portal.spawn(add, 1, 1)

