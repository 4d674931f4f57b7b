"""The three hosts of tests/core/test_hosts.py: one scenario body, run as sync code, in trio or in asyncio.

A scenario is one ``async def body(h)``. Under trio and asyncio, ``h.wait(ref)`` is ``await ref``,
``h.lines(stream)`` is ``async for`` and ``h.session()`` is ``async with Session``; under sync it is
``ref.result()``, ``for`` and ``with``, and the body runs to its end without ever suspending
(``SyncHost.run`` checks that), so the sync API is what it exercises.
"""

from __future__ import annotations

import asyncio

import pytest
import trio

from sandpool import Sandbox, Session


class _Awaited:
    """A sync value dressed as an awaitable that never suspends (what sync scenarios await)."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __await__(self):
        return self.fn(*self.args)
        yield  # makes this a generator: the body above runs when awaited, without suspending


class _SyncCM:
    """``async with`` over a sync ``with`` block, for sync scenarios."""

    def __init__(self, cm) -> None:
        self.cm = cm

    async def __aenter__(self):
        return self.cm.__enter__()

    async def __aexit__(self, *exc):
        return self.cm.__exit__(*exc)


class SyncHost:
    name = "sync"

    def run(self, body):
        coro = body(self)
        try:
            coro.send(None)
        except StopIteration as stop:
            return stop.value
        coro.close()
        raise AssertionError("a sync scenario suspended: it awaited a real awaitable instead of h.*")

    def wait(self, ref):
        return _Awaited(ref.result)

    def lines(self, stream):
        return _Awaited(list, stream)

    def session(self, **kw):
        return _SyncCM(Session(**kw))

    def run_sandbox(self, *args, **kw):
        return _SyncCM(Sandbox.run(*args, **kw))

    def enter(self, sandbox):
        return _SyncCM(sandbox)

    def close(self, session):
        return _Awaited(session.close().result)

    def cancel_while_waiting(self, ref):
        """The sync host gives up on an operation by cancelling its ref."""
        return _Awaited(ref.cancel)

    def wait_with_timeout(self, ref, seconds):
        """Sync: ``result(timeout=)`` raises TimeoutError and leaves the operation running; cancel it."""
        def wait():
            try:
                ref.result(timeout=seconds)
            except TimeoutError:
                ref.cancel()
                raise
        return _Awaited(wait)


class _AsyncHost:
    """What trio and asyncio share: the async forms themselves."""

    async def wait(self, ref):
        return await ref

    async def lines(self, stream):
        return [chunk async for chunk in stream]

    def session(self, **kw):
        return Session(**kw)

    def run_sandbox(self, *args, **kw):
        return Sandbox.run(*args, **kw)

    def enter(self, sandbox):
        return sandbox

    async def close(self, session):
        return await session.close()


class TrioHost(_AsyncHost):
    name = "trio"

    def run(self, body):
        return trio.run(body, self)

    async def cancel_while_waiting(self, ref):
        """A trio task awaiting ``ref`` has its cancel scope cancelled."""
        async def waiter(task_status=trio.TASK_STATUS_IGNORED):
            with trio.CancelScope() as scope:
                task_status.started(scope)
                await ref
            assert scope.cancelled_caught

        async with trio.open_nursery() as nursery:
            scope = await nursery.start(waiter)
            scope.cancel()

    async def wait_with_timeout(self, ref, seconds):
        with trio.fail_after(seconds):
            await ref


class AsyncioHost(_AsyncHost):
    name = "asyncio"

    def run(self, body):
        return asyncio.run(body(self))

    async def cancel_while_waiting(self, ref):
        """An asyncio task awaiting ``ref`` is cancelled."""
        async def waiter():
            await ref

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0)  # one turn of the loop: the task is now awaiting ref
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def wait_with_timeout(self, ref, seconds):
        async with asyncio.timeout(seconds):
            await ref


HOSTS = {"sync": SyncHost(), "trio": TrioHost(), "asyncio": AsyncioHost()}


class Step:
    """One step of an async iterator as an awaitable (what the hosts' timeouts wrap)."""

    def __init__(self, iterator) -> None:
        self.iterator = iterator

    def __await__(self):
        return anext(self.iterator).__await__()

