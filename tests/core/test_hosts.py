"""The public API under its three hosts: each scenario runs as sync code, inside trio and inside asyncio.

A scenario is one ``async def body(h)``, ``h`` being the host (see host_helpers.py: ``await ref``,
``async for``, ``async with`` under trio and asyncio; ``result()``, ``for``, ``with`` under sync).
Some scenarios also run against a sandpool server (the remote runtime).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest
import trio

import sandpool
from sandpool import OperationCancelled, Sandbox, SandboxNotRunningError, SandboxStatus, Session

from host_helpers import HOSTS, Step
from service_helpers import ServerProcess

PID_AND_SLEEP = ["sh", "-c", "echo $$; exec sleep 1000"]


@pytest.fixture(params=list(HOSTS))
def host(request):
    return HOSTS[request.param]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(str(tmp_path_factory.mktemp("serve")), grace=30.0) as srv:
        yield srv


@pytest.fixture(params=["local", "remote"])
def where(request):
    """Session options for the local runtime, or for a sandpool server's (started on first use)."""
    if request.param == "local":
        return {}
    return {"address": request.getfixturevalue("server").address}


async def _pid_of(h, proc) -> int:
    """The pid a ``PID_AND_SLEEP`` process printed first (reading stops at its first line)."""
    chunks = []
    stream = proc.stdout
    if h.name == "sync":
        for chunk in stream:
            chunks.append(chunk)
            if "\n" in chunk:
                break
    else:
        async for chunk in stream:
            chunks.append(chunk)
            if "\n" in chunk:
                break
    return int("".join(chunks).split()[0])


async def _assert_gone(h, sb, pid: int) -> None:
    """No process ``pid`` is left inside ``sb`` (not even a zombie)."""
    probe = await h.wait(sb.exec(["sh", "-c", f"test -e /proc/{pid} && cat /proc/{pid}/stat; echo checked"]))
    assert probe.stdout == "checked\n", f"process {pid} is still there: {probe.stdout!r}"


def test_exec_streaming_stdin_and_files(host, where):
    """In 'async with Session' (or 'with'): exec, output streamed in order, stdin, files; the
    session's end stops its sandbox."""
    async def body(h):
        async with h.session(**where) as s:
            sb = s.sandbox()
            assert (await h.wait(sb.exec(["echo", "hi"]))).stdout == "hi\n"
            proc = sb.exec(["sh", "-c", "for i in 1 2 3; do echo line-$i; done; echo err >&2"])
            assert "".join(await h.lines(proc.stdout)) == "line-1\nline-2\nline-3\n"
            assert "".join(await h.lines(proc.stderr)) == "err\n"
            assert (await h.wait(proc)).returncode == 0
            cat = sb.exec(["cat"], stdin=True)
            await h.wait(cat.stdin.write(b"to stdin "))
            await h.wait(cat.stdin.writeline("and a line"))
            await h.wait(cat.stdin.close())
            assert (await h.wait(cat)).stdout == "to stdin and a line\n"
            await h.wait(sb.write_file("/data/f.txt", b"payload"))
            assert await h.wait(sb.read_file("/data/f.txt")) == b"payload"
            kept = sb
        assert kept.status == SandboxStatus.TERMINATED
        return h.name
    assert host.run(body) == host.name


def test_body_exception_propagates_unchanged_and_sandbox_stops(host):
    """The block's own exception leaves 'async with Sandbox.run()' / 'async with sandbox' /
    'async with Session' as itself, and each sandbox is stopped by then."""
    seen = []

    async def body(h):
        error = KeyError("from the body")
        with pytest.raises(KeyError) as caught:
            async with h.run_sandbox() as sb:
                seen.append(sb)
                assert (await h.wait(sb.exec(["echo", "standalone"]))).stdout == "standalone\n"
                raise error
        assert caught.value is error and caught.value.__context__ is None
        with pytest.raises(KeyError) as caught:
            async with h.session() as s:
                async with h.enter(s.sandbox()) as sb:
                    seen.append(sb)
                    assert sb.status == SandboxStatus.RUNNING
                    raise error
        assert caught.value is error
        with pytest.raises(ValueError):
            async with h.session() as s:
                sb = s.sandbox()
                seen.append(sb)
                await h.wait(sb.exec(["true"]))
                raise ValueError("body")
    host.run(body)
    assert [sb.status for sb in seen] == [SandboxStatus.TERMINATED] * 3


def test_cancellation_from_the_host_kills_the_remote_command(host, where):
    """Giving up on an exec the host's way (trio cancel scope, asyncio task.cancel, ref.cancel)
    cancels it: the ref ends cancelled and its process tree is gone from the sandbox."""
    async def body(h):
        async with h.session(**where) as s:
            sb = s.sandbox()
            proc = sb.exec(PID_AND_SLEEP)
            pid = await _pid_of(h, proc)
            await h.cancel_while_waiting(proc)
            with pytest.raises(OperationCancelled):
                await h.wait(proc)  # until its cleanup (the kill) is done
            await _assert_gone(h, sb, pid)
            assert (await h.wait(sb.exec(["echo", "still serving"]))).stdout == "still serving\n"
    host.run(body)


def test_timeout_from_the_host_kills_the_remote_command(host, where):
    """A host timeout around an exec (trio.fail_after, asyncio.timeout, result(timeout=)) raises
    the host's timeout error, and the command is killed in the sandbox."""
    async def body(h):
        async with h.session(**where) as s:
            sb = s.sandbox()
            proc = sb.exec(PID_AND_SLEEP)
            pid = await _pid_of(h, proc)
            with pytest.raises((TimeoutError, trio.TooSlowError)):
                await h.wait_with_timeout(proc, 0.2)
            with pytest.raises(OperationCancelled):
                await h.wait(proc)
            await _assert_gone(h, sb, pid)
    host.run(body)


def test_output_of_an_exec_on_a_stopped_sandbox_ends_with_its_error(host, where):
    """stdout of an exec on a stopped sandbox ends at once with the sandbox's error, and so does
    awaiting the exec; nothing waits for ever."""
    async def body(h):
        async with h.session(**where) as s:
            sb = s.sandbox()
            await h.wait(sb.start())
            await h.wait(sb.stop())
            proc = sb.exec(["echo", "hi"])
            with pytest.raises(SandboxNotRunningError, match="stopped"):
                await h.lines(proc.stdout)
            with pytest.raises(SandboxNotRunningError):
                await h.wait(proc)
    host.run(body)


def test_await_session_close_stops_every_sandbox(host):
    """``await session.close()`` (``.result()`` in sync code) stops every sandbox of the session."""
    async def body(h):
        session = h.session()
        async with session as s:
            boxes = [s.sandbox() for _ in range(2)]
            for sb in boxes:
                await h.wait(sb.start())
            await h.close(s)
            assert [sb.status for sb in boxes] == [SandboxStatus.TERMINATED] * 2
    host.run(body)


@pytest.mark.parametrize("library", ["trio", "asyncio"])
def test_async_iteration_over_a_sandbox_of_a_sync_session(library):
    """trio or asyncio code iterates over the output of a sandbox owned by a sync Session (whose
    loop is another thread's), and over a standalone Sandbox.run()'s: no crash, all output."""
    with Session() as s:
        sb = s.sandbox()

        async def main():
            proc = sb.exec(["sh", "-c", "echo one; echo two"])
            got = [chunk async for chunk in proc.stdout]
            async with Sandbox.run() as standalone:
                more = [chunk async for chunk in standalone.exec(["echo", "three"]).stdout]
            return "".join(got + more), standalone.status

        text, status = trio.run(main) if library == "trio" else asyncio.run(main())
        assert text == "one\ntwo\nthree\n" and status == SandboxStatus.TERMINATED
        assert (sb.exec(["echo", "after"]).result().stdout) == "after\n"  # the session's loop lives on


def test_blocking_result_inside_asyncio_blocks_the_loop_but_works():
    """cwsandbox's habit: ``.result()`` and sync ``for`` inside a running asyncio loop block that
    loop until done (the work runs in sandpool's own thread), and never deadlock."""
    async def main():
        async with Session() as s:
            sb = s.sandbox()
            assert sb.exec(["echo", "blocking"]).result().stdout == "blocking\n"
            assert list(sb.exec(["echo", "iterated"]).stdout) == ["iterated\n"]
            sb.wait()
            return sb
    assert asyncio.run(main()).status == SandboxStatus.TERMINATED


def test_asyncio_cancellation_during_session_exit_still_stops_sandboxes():
    """An asyncio task cancelled while its 'async with Session' is closing finishes the close
    before it ends cancelled: no sandbox is left running."""
    boxes = []

    async def body():
        async with Session() as s:
            sb = s.sandbox()
            boxes.append(sb)
            proc = sb.exec(["sh", "-c", "trap '' TERM; echo ready; exec sleep 1000"])
            await anext(aiter(proc.stdout))
            asyncio.current_task().cancel()  # lands in the exit, which waits for the stop

    async def main():
        with pytest.raises(asyncio.CancelledError):
            await body()

    asyncio.run(main())
    assert boxes[0].status == SandboxStatus.TERMINATED


def test_awaiting_outside_trio_and_asyncio_names_the_fix():
    """Awaiting a ref from a coroutine driven by neither trio nor asyncio says what works."""
    with Session() as s:
        ref = s.sandbox().exec(["true"])

        async def drive():
            await ref

        coro = drive()
        with pytest.raises(RuntimeError, match="trio or asyncio"):
            coro.send(None)
        ref.result()


def test_signal_to_a_running_command_from_asyncio():
    """proc.send_signal()/terminate() are awaitable from asyncio and reach the command."""
    async def main():
        async with Session() as s:
            proc = s.sandbox().exec(["sh", "-c", "echo ready; exec sleep 1000"])
            await anext(aiter(proc.stdout))
            await proc.send_signal(signal.SIGTERM)
            return (await proc).returncode
    assert asyncio.run(main()) in (-signal.SIGTERM, 128 + signal.SIGTERM)



def test_output_of_an_exec_cancelled_before_it_ran_ends():
    """An exec cancelled at once ends its streams with why, instead of leaving a reader waiting for ever."""
    async def main():
        async with Session() as s:
            sb = s.sandbox()
            await sb
            proc = sb.exec(["echo", "never"])
            proc.cancel()  # in the same loop, at once
            with pytest.raises(sandpool.SandboxExecutionError, match="was cancelled"):
                [chunk async for chunk in proc.stdout]
            with pytest.raises(OperationCancelled):
                await proc
    trio.run(main)


def test_cli_exec_on_a_terminated_sandbox_fails_at_once(server):
    """``sandpool exec <terminated-id> -- echo hi`` says the sandbox was stopped and exits 1, at once."""
    with Session(address=server.address) as s:
        sb = s.sandbox()
        sb.wait()
        sb.stop().result()
    env = {k: v for k, v in os.environ.items() if k not in ("SANDPOOL_ADDRESS", "SANDPOOL_TOKEN")}
    result = subprocess.run([sys.executable, "-m", "sandpool", "exec", "--address", server.address, sb.sandbox_id,
                             "--", "echo", "hi"], capture_output=True, text=True, timeout=60, env=env)
    assert (result.returncode, result.stdout) == (1, ""), result.stderr
    assert f"sandbox {sb.sandbox_id} has been stopped" in result.stderr


@pytest.mark.parametrize("name", ["trio", "asyncio"])
def test_a_timeout_during_async_for_stops_the_read_not_the_process(name):
    """A host timeout around one step of ``async for`` ends that step only: the command lives on,
    and reading on later yields the rest of its output, nothing lost or doubled."""
    h = HOSTS[name]

    async def body(h):
        async with h.session() as s:
            proc = s.sandbox().exec(["sh", "-c", "echo first; read go; echo second-$go"], stdin=True)
            reader = aiter(proc.stdout)
            assert await anext(reader) == "first\n"
            with pytest.raises((TimeoutError, trio.TooSlowError)):
                await h.wait_with_timeout(Step(reader), 0.2)  # nothing comes until stdin is written
            await h.wait(proc.stdin.writeline("now"))
            assert [chunk async for chunk in reader] == ["second-now\n"]
            assert (await h.wait(proc)).stdout == "first\nsecond-now\n"
    h.run(body)


def test_asyncio_loop_stays_free_while_an_exec_is_awaited():
    """While one asyncio task awaits an exec, the loop runs the others: here the very task that
    feeds the command its stdin, which the first one's result needs."""
    async def main():
        async with Session() as s:
            cat = s.sandbox().exec(["cat"], stdin=True)

            async def feed():
                await cat.stdin.write(b"fed by another task")
                await cat.stdin.close()

            async with asyncio.timeout(60):  # a blocked loop would never get to feed()
                result, _ = await asyncio.gather(cat, feed())
            return result.stdout
    assert asyncio.run(main()) == "fed by another task"


def test_asyncio_wait_for_cancels_the_exec_and_kills_it():
    """``asyncio.wait_for`` on an exec that outlives it raises TimeoutError and kills the command."""
    async def main():
        async with Session() as s:
            sb = s.sandbox()
            proc = sb.exec(PID_AND_SLEEP)
            pid = await _pid_of(HOSTS["asyncio"], proc)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(proc, 0.2)
            with pytest.raises(OperationCancelled):
                await proc
            await _assert_gone(HOSTS["asyncio"], sb, pid)
    asyncio.run(main())


def test_asyncio_cancellation_while_a_session_opens_closes_it():
    """An asyncio task cancelled while 'async with Session' opens never runs the body, and the
    session it was opening is closed by the time the cancellation arrives."""
    session = Session()
    ran = []

    async def enter():
        async with session:
            ran.append(True)

    async def main():
        task = asyncio.create_task(enter())
        await asyncio.sleep(0)  # one turn: the task is opening the session in a worker thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert ran == [] and "closed" in repr(session)
    assert session._finished is None or session._finished.is_set()  # nothing of it runs on in the portal
    with pytest.raises(sandpool.SandboxError, match="session is closed"):
        session.sandbox()


def test_imap_async_for_under_asyncio_and_trio():
    """``async for`` over ``f.imap`` (ordered) and ``f.imap(ordered=False)`` works under asyncio as
    under trio: every result arrives, in input order when ordered."""
    async def body():
        async with Session() as s:
            @s.function()
            def square(x):
                return x * x

            ordered = [r async for r in square.imap(range(20))]
            unordered = sorted([r async for r in square.imap(range(20), ordered=False)])
            return ordered, unordered

    expected = [i * i for i in range(20)]
    assert asyncio.run(body()) == (expected, expected)
    assert trio.run(body) == (expected, expected)
