"""A trio task awaiting an exec in its sandbox's own loop reads the answer itself: it borrows the
reading of the agent's connection from the loop's reader (FrameChannel.borrow, receive_lent), so the
answer wakes the awaiting task alone. It must end exactly as the loop's reading does: the same
results, errors, timeouts, cancellation and cleanup, with frames for anything else handed to the
loop in order. Scenarios run both ways; ``loop`` turns the task's own reading off."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal

import pytest
import trio

from sandpool import OperationCancelled, SandboxDiedError, SandboxError, SandboxExecutionError, SandboxTimeoutError, Session
from sandpool._core import channel as _channel
from sandpool._session import process as _process


async def _not_read(req_id, take, waiting):
    """``await_answer`` that leaves every answer to the loop's reader (as before the task's own reading)."""


def _run(body, way: str = "own"):
    """Run ``body(sandbox)`` in a trio loop holding a session of its own and a running sandbox; ``way``
    "loop" makes the loop's reader read every answer."""

    async def main():
        async with Session() as session:
            sandbox = await session.sandbox()
            if way == "loop":
                sandbox._link = dataclasses.replace(sandbox._link, await_answer=_not_read)
            try:
                with trio.fail_after(30):
                    await body(sandbox)
            finally:
                await sandbox.stop(graceful_shutdown_seconds=0)

    trio.run(main)


@contextlib.asynccontextmanager
async def _awaited(proc, raises=None, match=None):
    """``proc`` awaited by a task of its own (which expects ``raises``, matching ``match``; returns
    go to the yielded dict's "result"), waiting by the time the block runs; the block's end waits
    for that task."""
    got = {}

    async def awaiting():
        if raises is None:
            got["result"] = await proc
        else:
            with pytest.raises(raises, match=match):
                await proc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(awaiting)
        await trio.testing.wait_all_tasks_blocked()
        yield got


def _settled(sb) -> None:
    """Nothing of an exec is left on the client: no request registered, no deadline kept."""
    assert sb._requests.handlers == {}
    assert "0 due" in repr(sb._link.deadlines)


def _counted(monkeypatch, name: str) -> list[int]:
    """A counter of the calls of the channels' coroutine method ``name`` from now on (FrameChannel's
    ``receive_lent``: the reads of awaiting tasks; ``receive_batch``: the loop reader's)."""
    count = [0]
    method = getattr(_channel.FrameChannel, name)

    async def counted(self):
        count[0] += 1
        return await method(self)

    monkeypatch.setattr(_channel.FrameChannel, name, counted)
    return count


ways = pytest.mark.parametrize("way", ["own", "loop"])


class _ReaderSteps(trio.abc.Instrument):
    """Counts the steps the sandboxes' frame readers run."""

    def __init__(self) -> None:
        self.count = 0

    def before_task_step(self, task) -> None:
        if task.name.endswith("._reader"):
            self.count += 1


def test_answers_skip_the_reader(monkeypatch):
    """A trio task's execs are answered to the task itself: the loop's reader reads (almost) none,
    and is (almost) never woken: an exec sent from the loop leaves a parked reader asleep."""
    batches = _counted(monkeypatch, "receive_batch")

    async def body(sb):
        await sb.exec(["true"])
        before, steps = batches[0], _ReaderSteps()
        trio.lowlevel.add_instrument(steps)
        for i in range(50):
            assert (await sb.exec(["sh", "-c", f"echo {i}"])).stdout == f"{i}\n"
        trio.lowlevel.remove_instrument(steps)
        assert batches[0] - before < 10
        assert steps.count < 10
        _settled(sb)

    _run(body)


@ways
def test_results_match(way):
    """Output, exit codes, cwd, env, check=True, a command that cannot start, output across the window."""

    async def body(sb):
        result = await sb.exec(["sh", "-c", "echo out; echo err >&2; pwd; echo $X; exit 3"], cwd="/tmp", env={"X": "y"})
        assert (result.stdout, result.stderr, result.returncode) == ("out\n/tmp\ny\n", "err\n", 3)
        with pytest.raises(SandboxExecutionError) as info:
            await sb.exec(["sh", "-c", "echo no; exit 2"], check=True)
        assert info.value.exec_result.returncode == 2 and info.value.exec_result.stdout == "no\n"
        missing = await sb.exec(["no-such-command-here"])
        assert missing.returncode == 127 and "no-such-command-here" in missing.stderr
        big = await sb.exec(["head", "-c", "5000000", "/dev/zero"])  # crosses the output window
        assert big.stdout_bytes == bytes(5_000_000)
        assert (await sb.exec(["true"])).returncode == 0
        _settled(sb)

    _run(body, way)


@ways
def test_timeout_cancel_and_cancelled_awaiter(way):
    """A timeout kills the command; a cancel from another task while one awaits, and the awaiting
    task's own cancellation, end it as the loop's reading does; the sandbox goes on serving."""

    async def body(sb):
        proc = sb.exec(["sleep", "600"], timeout_seconds=0.3)
        with pytest.raises(SandboxTimeoutError, match="timed out after 0.3 s"):
            await proc
        assert proc.returncode == 137  # 128 + SIGKILL
        proc = sb.exec(["sleep", "600"])
        async with _awaited(proc, OperationCancelled):
            assert proc.cancel() is True
        with trio.move_on_after(0.3):  # the awaiting task is cancelled: so is its command
            await (running := sb.exec(["sh", "-c", "exec sleep 600"]))
        with pytest.raises(OperationCancelled):
            await running
        # the kills go out by tasks of their own: the commands are gone soon after (else this times out)
        await sb.exec(["sh", "-c", "while pgrep -x sleep >/dev/null; do :; done"], timeout_seconds=20, check=True)
        await sb.write_file("/tmp/after", b"still")
        assert await sb.read_file("/tmp/after") == b"still"
        _settled(sb)

    _run(body, way)


@ways
def test_timeout_while_the_agent_says_nothing(way, monkeypatch):
    """The agent is stopped (SIGSTOP) while a task awaits a command with a timeout: no frame comes,
    yet the awaiting task gets its timeout error (the process's kill waits a bounded time); once
    the agent runs again, the sandbox serves on."""
    monkeypatch.setattr(_process, "_KILL_WAIT_SECONDS", 0.5)

    async def body(sb):
        pid = sb._record.agent_pid
        os.kill(pid, signal.SIGSTOP)
        try:
            with trio.fail_after(20):
                with pytest.raises(SandboxTimeoutError, match="timed out after 0.3 s"):
                    await sb.exec(["true"], timeout_seconds=0.3)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert (await sb.exec(["echo", "on"])).stdout == "on\n"
        _settled(sb)

    _run(body, way)


@ways
def test_sandbox_killed_mid_wait(way):
    """The agent is killed while a task awaits: the same error as the loop's, its streams end too."""

    async def body(sb):
        proc = sb.exec(["sh", "-c", "echo up; exec sleep 600"])
        async with _awaited(proc, SandboxError, "killed by SIGKILL"):
            os.kill(sb._record.agent_pid, signal.SIGKILL)
        with pytest.raises(SandboxError, match="killed by SIGKILL"):
            [chunk async for chunk in proc.stdout]
        assert sb._requests.handlers == {}
        with pytest.raises(SandboxError, match="killed by SIGKILL"):
            await sb.exec(["true"])

    _run(body, way)


@ways
def test_connection_closed_under_an_awaiting_task(way):
    """The client closes the agent's connection while a task awaits (the agent still holds its end
    open): the task gives the socket back before it is closed, and gets the loop's error."""

    async def body(sb):
        async with _awaited(sb.exec(["sleep", "600"]), SandboxDiedError, "ended"):
            await sb._record.channel.aclose()
        assert sb._requests.handlers == {}

    _run(body, way)


@ways
def test_socket_closed_under_an_awaiting_task(way):
    """The connection's socket is closed outright (not shut down first) while a task awaits: its wait
    ends as the loop reader's does, and the task gets the loop's error, not trio's."""

    async def body(sb):
        async with _awaited(sb.exec(["sleep", "600"]), SandboxDiedError, "ended"):
            await sb._record.channel._stream.aclose()
        assert sb._requests.handlers == {}

    _run(body, way)


@ways
def test_malformed_frame_while_a_task_awaits(way, monkeypatch):
    """A frame the client cannot decode comes while a task awaits: the sandbox fails as when the
    loop's reader meets it, and the task gets that failure."""
    from _sandpool_agent import wire

    feed = wire.FrameBuffer.feed

    def garbled(self, data):  # the next read is garbled, once: whoever reads it must not lose that
        monkeypatch.setattr(wire.FrameBuffer, "feed", feed)
        raise wire.ProtocolError("a garbled frame")

    async def body(sb):
        proc = sb.exec(["sleep", "600"])
        async with _awaited(proc, SandboxError, "protocol error: a garbled frame"):
            monkeypatch.setattr(wire.FrameBuffer, "feed", garbled)
            with pytest.raises(SandboxError, match="protocol error: a garbled frame"):
                await sb.exec(["true"])  # its answer is the garbled frame
        assert sb._requests.handlers == {}

    _run(body, way)


@ways
def test_concurrent_execs_in_one_loop(way):
    """Several tasks exec at once in one sandbox: each gets its own answer, whoever reads it."""

    async def body(sb):
        async def run(t: int) -> None:
            for i in range(40):
                result = await sb.exec(["sh", "-c", f"echo {t}-{i}; exit {i % 5}"])
                assert (result.stdout, result.returncode) == (f"{t}-{i}\n", i % 5)

        async with trio.open_nursery() as nursery:
            for t in range(4):
                nursery.start_soon(run, t)
        _settled(sb)

    _run(body, way)


@ways
def test_other_traffic_while_a_task_awaits(way):
    """While a task awaits a running command, files, another exec, a live stream of the awaited
    command itself and output of another go through the same connection; all arrive."""

    async def body(sb):
        assert (await sb.exec(["mkfifo", "/tmp/gate"])).returncode == 0
        proc = sb.exec(["sh", "-c", "echo first; read x < /tmp/gate; echo got $x"])
        results = {}
        async with trio.open_nursery() as nursery, _awaited(proc) as awaited:
            await sb.write_file("/tmp/data", b"y" * 300_000)
            assert await sb.read_file("/tmp/data") == b"y" * 300_000
            assert "".join([chunk async for chunk in sb.exec(["sh", "-c", "echo one; echo two"]).stdout]) == "one\ntwo\n"

            async def live():
                results["live"] = "".join([chunk async for chunk in proc.stdout])

            nursery.start_soon(live)
            await trio.testing.wait_all_tasks_blocked()
            assert (await sb.exec(["sh", "-c", "echo go > /tmp/gate"])).returncode == 0
        assert results["live"] == awaited["result"].stdout == "first\ngot go\n"
        _settled(sb)

    _run(body, way)


@ways
def test_output_taken_by_an_awaiting_task_is_acknowledged(way, monkeypatch):
    """A task takes output of a running command (up to half its window) before the loop reads on:
    every byte is acknowledged to the agent all the same, or the agent would hold the rest back."""
    from _sandpool_agent import wire

    credited, all_credited = [0], None
    send_bytes = _channel.FrameChannel.send_bytes

    async def counting(self, data):
        for frame in wire.FrameBuffer().feed(bytes(data)):
            if frame["t"] == "credit":
                credited[0] += frame["n"]
        if credited[0] >= 3_000_000 and all_credited is not None:
            all_credited.set()
        await send_bytes(self, data)

    monkeypatch.setattr(_channel.FrameChannel, "send_bytes", counting)

    async def body(sb):
        nonlocal all_credited
        all_credited = trio.Event()
        assert (await sb.exec(["mkfifo", "/tmp/gate"])).returncode == 0
        proc = sb.exec(["sh", "-c", "head -c 3000000 /dev/zero; read x < /tmp/gate"])
        async with _awaited(proc) as awaited:
            with trio.fail_after(30):
                await all_credited.wait()
            assert credited[0] == 3_000_000
            await sb.exec(["sh", "-c", "echo go > /tmp/gate"])
        assert len(awaited["result"].stdout_bytes) == 3_000_000
        _settled(sb)

    _run(body, way)


def test_awaited_otherwise_the_loop_reads(monkeypatch):
    """With the reader parked after a task read its own answer (and the park's bound made long), an
    exec sent from the loop and then waited on otherwise is read by the loop at once: a done
    callback, a live stream, a poll, an await once another task's answer is read."""
    monkeypatch.setattr(_channel, "PARK_SECONDS", 3600.0)

    async def park(sb):
        for _ in range(20):
            await sb.exec(["true"])
            if sb._record.channel.parked:
                return
        raise AssertionError("the reader was never parked")

    async def body(sb):
        await park(sb)
        called = trio.Event()
        sb.exec(["echo", "a"]).add_done_callback(lambda proc: called.set())
        await called.wait()
        await park(sb)
        assert "".join([chunk async for chunk in sb.exec(["echo", "b"]).stdout]) == "b\n"
        await park(sb)
        proc = sb.exec(["echo", "c"])
        with trio.fail_after(20):
            while proc.poll() is None:  # looks only, never waits on the process: the loop must read
                await trio.sleep(0.001)
        assert (await proc).stdout == "c\n"
        await park(sb)
        gate = sb.exec(["sleep", "0.3"])
        other = sb.exec(["echo", "d"])
        async with _awaited(gate):  # that task reads the connection now
            assert (await other).stdout == "d\n"
        _settled(sb)

    _run(body)


def test_own_reading_is_used(monkeypatch):
    """The scenarios above run the task's own reading (else the "own" runs test nothing new)."""
    reads = _counted(monkeypatch, "receive_lent")

    async def body(sb):
        for _ in range(5):
            await sb.exec(["true"])

    _run(body)
    assert reads[0] >= 4
