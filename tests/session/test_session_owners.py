"""Every background thread and process of a session has an owner: its ``with`` block.

Sync sessions share a background trio thread and the default LocalRuntime (its template process)
while any of them is open; the last one to close stops both. A runtime passed in is treated the same
by sync and async sessions: the session opens it, and the last session using it closes it.
"""

from __future__ import annotations

import os
import threading

import psutil
import pytest
import trio

import sandpool
from sandpool import Session, testing
from sandpool._runtime.fake.runtime import FakeRuntime
from sandpool._errors import SandboxUnavailableError

PORTAL_THREAD = "sandpool-session-portal"


def portal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == PORTAL_THREAD]


def templates() -> list[psutil.Process]:
    """This process's template processes (one per open LocalRuntime)."""
    return [p for p in psutil.Process(os.getpid()).children()
            if any("_sandpool_agent.template" in part for part in p.cmdline())]


@pytest.fixture
def quiet_background():
    """Start with no hidden default session (an earlier test's ``Sandbox.run()``) holding the portal."""
    testing.close_shared_runtime()
    assert portal_threads() == [] and templates() == []


def test_a_sync_session_leaves_no_thread_and_no_template_behind(quiet_background):
    """Inside the block the portal thread and the template run; after it, neither does (the thread
    is joined and the template has exited, with nothing to wait for)."""
    with Session() as s:
        assert s.sandbox().exec(["true"]).result().returncode == 0
        assert len(portal_threads()) == 1 and len(templates()) == 1
    assert portal_threads() == []
    assert templates() == []


def test_open_sessions_share_one_thread_and_template_and_the_last_closes_them(quiet_background):
    """Two overlapping sync sessions use one portal thread and one template; closing the first
    leaves the second working; closing the second stops both."""
    first = Session().__enter__()
    second = Session().__enter__()
    try:
        assert first.sandbox().exec(["true"]).result().returncode == 0
        assert second.sandbox().exec(["true"]).result().returncode == 0
        assert len(portal_threads()) == 1 and len(templates()) == 1
    finally:
        first.__exit__(None, None, None)
    assert second.sandbox().exec(["echo", "still"]).result().stdout == "still\n"
    assert len(portal_threads()) == 1
    second.__exit__(None, None, None)
    assert portal_threads() == [] and templates() == []


def test_close_without_the_with_block_also_lets_the_thread_go(quiet_background):
    """``session.close().result()`` alone gives the portal back: its thread ends on its own."""
    s = Session()
    s.sandbox().exec(["true"]).result()
    s.close().result()
    for thread in portal_threads():
        thread.join(timeout=10)
    assert portal_threads() == [] and templates() == []


def test_sync_and_async_sessions_both_close_a_runtime_they_were_given(quiet_background):
    """``Session(runtime=r)`` opens ``r`` and closes it at the end, sync as async: a FakeRuntime then
    refuses further use, and nothing runs in the background."""
    given = FakeRuntime()
    with Session(runtime=given) as s:
        s.sandbox().exec(["true"]).result()
    with pytest.raises(SandboxUnavailableError, match="create a new FakeRuntime"):
        with Session(runtime=given) as s:
            s.sandbox().exec(["true"]).result()
    assert portal_threads() == []

    async def main() -> None:
        given = FakeRuntime()
        async with Session(runtime=given) as s:
            await s.sandbox().exec(["true"])
        with pytest.raises(SandboxUnavailableError, match="create a new FakeRuntime"):
            async with Session(runtime=given):
                pass

    trio.run(main)


def test_the_hidden_session_of_sandbox_run_is_closed_by_close_all(quiet_background):
    """A standalone sandbox belongs to the hidden default session; closing the default sessions (as
    exit does) stops it and lets the thread and template go."""
    sb = sandpool.Sandbox.run()
    assert sb.exec(["true"]).result().returncode == 0
    testing.close_shared_runtime()
    assert sb.status.is_terminal
    assert portal_threads() == [] and templates() == []


def test_an_asyncio_session_leaves_no_thread_and_no_template_behind(quiet_background):
    """Under asyncio the session runs in the background portal as a sync one does, and gives it back
    the same way when its ``async with`` block ends."""
    import asyncio

    async def main() -> None:
        async with Session() as s:
            assert (await s.sandbox().exec(["true"])).returncode == 0
            assert len(portal_threads()) == 1 and len(templates()) == 1

    asyncio.run(main())
    assert portal_threads() == [] and templates() == []
