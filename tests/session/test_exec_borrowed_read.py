"""A sync caller reads its exec's answer itself: blocked on the result, it borrows the reading of its
sandbox's connection from the loop (FrameChannel.borrow), so the answer wakes the caller alone. It
must end exactly as the loop's reading does: the same results, errors, timeouts, cancellation and
cleanup, with frames for anything else handed to the loop in order. Scenarios run both ways;
``loop`` turns the borrowing off."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import signal
import threading
import time

import pytest
import trio

from sandpool import (OperationCancelled, SandboxDiedError, SandboxError, SandboxExecutionError, SandboxStatus, SandboxTimeoutError,
                      Session)
from sandpool._core import channel as _channel


@pytest.fixture
def session():
    with Session() as s:
        yield s


@pytest.fixture(params=["borrowed", "loop"])
def sb(request, session, monkeypatch):
    sandbox = session.sandbox().wait()
    if request.param == "loop":  # the loop's reader reads every answer, as before the borrowing
        monkeypatch.setattr(sandbox, "_link", dataclasses.replace(
            sandbox._link, read_answer=lambda req_id, take, waiting, deadline: None))
    sandbox.borrowed = request.param == "borrowed"
    yield sandbox


def _settled(sb) -> None:
    """Nothing of an exec is left on the client: no request registered, no deadline kept."""
    assert sb._requests.handlers == {}
    assert "0 due" in repr(sb._link.deadlines)


def _loop_batches(sb, monkeypatch) -> list[int]:
    """A counter of the frame batches the loop's reader reads from now on."""
    channel, count = sb._record.channel, [0]
    receive_batch = channel.receive_batch

    async def counted():
        batch = await receive_batch()
        count[0] += 1
        return batch

    monkeypatch.setattr(channel, "receive_batch", counted)
    return count


def _reading(sb, monkeypatch) -> threading.Event:
    """Set once a caller waits for an answer of an exec made from now on: borrowed, when it reads
    the socket; else when it blocks."""
    began = threading.Event()
    if sb.borrowed:
        channel = sb._record.channel
        read = channel.read_borrowed

        def read_borrowed(deadline):
            began.set()
            return read(deadline)

        monkeypatch.setattr(channel, "read_borrowed", read_borrowed)
    else:
        read_answer = sb._link.read_answer

        def noted(*args):
            began.set()
            return read_answer(*args)

        monkeypatch.setattr(sb, "_link", dataclasses.replace(sb._link, read_answer=noted))
    return began


def _park(sb) -> None:
    """Exec until a caller's borrowed reading leaves the loop's reader parked (a caller may not
    borrow while the loop still handles what it read last)."""
    for _ in range(20):
        assert sb.exec(["true"]).result(timeout=30).returncode == 0
        if sb._record.channel.parked:
            return
    raise AssertionError("the reader was never parked")


def test_answers_skip_the_loop(session, monkeypatch):
    """A sync caller's execs are answered to its own thread: the loop's reader reads (almost) none."""
    sb = session.sandbox().wait()
    batches = _loop_batches(sb, monkeypatch)
    for i in range(50):
        assert sb.exec(["sh", "-c", f"echo {i}"]).result(timeout=30).stdout == f"{i}\n"
    assert batches[0] < 10
    _settled(sb)


def test_results_match(sb):
    """Output, exit codes, check=True, a command that cannot start, and output across the window."""
    result = sb.exec(["sh", "-c", "echo out; echo err >&2; exit 3"]).result(timeout=30)
    assert (result.stdout, result.stderr, result.returncode) == ("out\n", "err\n", 3)
    with pytest.raises(SandboxExecutionError) as info:
        sb.exec(["sh", "-c", "echo no; exit 2"], check=True).result(timeout=30)
    assert info.value.exec_result.returncode == 2 and info.value.exec_result.stdout == "no\n"
    missing = sb.exec(["no-such-command-here"]).result(timeout=30)
    assert missing.returncode == 127 and "no-such-command-here" in missing.stderr
    big = sb.exec(["head", "-c", "5000000", "/dev/zero"]).result(timeout=30)  # crosses the output window
    assert big.stdout_bytes == bytes(5_000_000)
    assert sb.exec(["true"]).result(timeout=30).returncode == 0
    _settled(sb)


def test_sandbox_killed_mid_wait(sb, monkeypatch):
    """The agent is killed while a caller waits: the same error as the loop's, its streams end too."""
    began = _reading(sb, monkeypatch)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lambda: sb.exec(["sleep", "600"]).result(timeout=30))
        assert began.wait(30)
        os.kill(sb._record.agent_pid, signal.SIGKILL)
        with pytest.raises(SandboxError, match="killed by SIGKILL"):
            waiting.result(timeout=30)
    assert sb._requests.handlers == {}
    with pytest.raises(SandboxError, match="killed by SIGKILL"):
        sb.exec(["true"]).result(timeout=30)


def test_timeout_and_cancel_hand_back(sb, monkeypatch):
    """A timeout kills the command; a wait that times out, then a cancel from another thread while
    the caller waits again, end it as the loop would; the sandbox goes on serving."""
    proc = sb.exec(["sleep", "600"], timeout_seconds=0.3)
    with pytest.raises(SandboxTimeoutError, match="timed out after 0.3 s"):
        proc.result(timeout=30)
    assert proc.returncode == 137  # 128 + SIGKILL
    began = _reading(sb, monkeypatch)
    proc = sb.exec(["sleep", "600"])
    with pytest.raises(TimeoutError):
        proc.result(timeout=0.2)
    assert not proc.done()
    began.clear()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(proc.result, 30)
        assert began.wait(30)
        assert proc.cancel() is True
        with pytest.raises(OperationCancelled):
            waiting.result(timeout=30)
    assert sb.exec(["sh", "-c", "pgrep -x sleep || echo none"]).result(timeout=30).stdout == "none\n"
    sb.write_file("/tmp/after", b"still").result(timeout=30)
    assert sb.read_file("/tmp/after").result(timeout=30) == b"still"
    _settled(sb)


def test_concurrent_execs_from_threads(sb):
    """Several threads exec at once: each gets its own answer, whoever reads the connection."""
    def run(t: int) -> None:
        for i in range(60):
            result = sb.exec(["sh", "-c", f"echo {t}-{i}; exit {i % 5}"]).result(timeout=30)
            assert (result.stdout, result.returncode) == (f"{t}-{i}\n", i % 5)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for done in [pool.submit(run, t) for t in range(4)]:
            done.result(timeout=120)
    _settled(sb)


def test_other_traffic_while_a_caller_reads(sb, monkeypatch):
    """While a caller waits on a running command, files, another exec and a live stream go through
    the same connection; all arrive, and the waiting command's answer too."""
    assert sb.exec(["mkfifo", "/tmp/gate"]).result(timeout=30).returncode == 0
    began = _reading(sb, monkeypatch)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lambda: sb.exec(["sh", "-c", "read x < /tmp/gate; echo got $x"]).result(timeout=30))
        assert began.wait(30)
        sb.write_file("/tmp/data", b"y" * 300_000).result(timeout=30)
        assert sb.read_file("/tmp/data").result(timeout=30) == b"y" * 300_000
        live = sb.exec(["sh", "-c", "echo one; echo two"])
        assert "".join(live.stdout) == "one\ntwo\n"
        assert sb.exec(["sh", "-c", "echo go > /tmp/gate"]).result(timeout=30).returncode == 0
        assert waiting.result(timeout=30).stdout == "got go\n"
    _settled(sb)


def test_the_agents_unasked_frames_are_read(session):
    """After a caller's borrowed read, the loop's reader is parked; what the agent then says unasked
    (its main command's exit, its end) is read all the same, within the park's bound."""
    sb = session.sandbox(command="sh", args=["-c", "until [ -e /tmp/go ]; do sleep 0.01; done"]).wait()
    _park(sb)
    # The main command ends a little after this exec's answer (else its exit may come in the same
    # read as that answer, and go to the loop with it): the reader is parked by then.
    sb.exec(["sh", "-c", "(sleep 0.2; touch /tmp/go) >/dev/null 2>&1 </dev/null &"]).result(timeout=30)
    assert sb.status == SandboxStatus.RUNNING
    sb.wait_until_complete(timeout=20, raise_on_termination=False).result(timeout=30)
    assert sb.status == SandboxStatus.COMPLETED


def test_waited_otherwise_the_loop_reads(session, monkeypatch):
    """With the reader parked (and its bound made long), an exec awaited otherwise than by a blocked
    thread is read by the loop at once: a done callback, a live stream, another trio loop, a look."""
    monkeypatch.setattr(_channel, "PARK_SECONDS", 3600.0)
    sb = session.sandbox().wait()

    park = functools.partial(_park, sb)
    park()
    called = threading.Event()
    sb.exec(["echo", "a"]).add_done_callback(lambda proc: called.set())
    assert called.wait(20)
    park()
    assert list(sb.exec(["echo", "b"]).stdout) == ["b\n"]
    park()
    proc = sb.exec(["echo", "c"])

    async def awaited():
        return await proc

    assert trio.run(awaited).stdout == "c\n"
    park()
    proc = sb.exec(["echo", "d"])
    deadline = time.monotonic() + 20
    while not proc.done() and time.monotonic() < deadline:  # looks only, never blocks: the loop must read
        try:
            proc.result(timeout=0)
        except TimeoutError:
            pass
    assert proc.result(timeout=0).stdout == "d\n"
    _settled(sb)


def test_sandbox_stopped_while_a_caller_reads(sb, monkeypatch):
    """The sandbox is stopped while a caller waits on a running command: the same error as the loop's
    (it was stopped), whoever reads; the connection is closed under the reading thread and nothing
    is left."""
    began = _reading(sb, monkeypatch)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lambda: sb.exec(["sleep", "600"]).result(timeout=30))
        assert began.wait(30)
        sb.stop(graceful_shutdown_seconds=0).result(timeout=30)
        with pytest.raises(SandboxError, match="stopped"):
            waiting.result(timeout=30)
    assert sb._requests.handlers == {} and sb._record.channel.closed


def test_connection_closed_under_a_reading_thread(sb, monkeypatch):
    """The client closes the agent's connection while a caller waits (the agent still holds its end
    open): the reading thread is woken and gives the socket back before it is closed; the caller
    gets the same error as the loop's reading gives."""
    began = _reading(sb, monkeypatch)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lambda: sb.exec(["sleep", "600"]).result(timeout=30))
        assert began.wait(30)
        sb._host.spawn(sb._record.channel.aclose).result(timeout=30)
        with pytest.raises(SandboxDiedError, match="ended"):
            waiting.result(timeout=30)
    assert sb._requests.handlers == {}
    sb.stop(graceful_shutdown_seconds=0).result(timeout=30)


def test_output_taken_by_a_reading_thread_is_acknowledged(sb, monkeypatch):
    """A caller takes output of a running command (up to half its window) before the loop reads on:
    every byte is acknowledged to the agent all the same, or the agent would hold the rest back."""
    from _sandpool_agent import wire

    credited, all_credited = [0], threading.Event()
    send_bytes = _channel.FrameChannel.send_bytes

    async def counting(self, data):
        for frame in wire.FrameBuffer().feed(bytes(data)):
            if frame["t"] == "credit":
                credited[0] += frame["n"]
        if credited[0] >= 3_000_000:
            all_credited.set()
        await send_bytes(self, data)

    monkeypatch.setattr(_channel.FrameChannel, "send_bytes", counting)
    assert sb.exec(["mkfifo", "/tmp/gate"]).result(timeout=30).returncode == 0
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lambda: sb.exec(["sh", "-c", "head -c 3000000 /dev/zero; read x < /tmp/gate"])
                              .result(timeout=60))
        assert all_credited.wait(30), f"{credited[0]} of 3000000 bytes acknowledged"
        assert credited[0] == 3_000_000
        sb.exec(["sh", "-c", "echo go > /tmp/gate"]).result(timeout=30)
        assert len(waiting.result(timeout=30).stdout_bytes) == 3_000_000
    _settled(sb)
