"""The exec fast path: a sync caller's exec frame leaves from its own thread and, with no task of its
own, the agent's frames, its deadline or a cancel settle it. It must end exactly as the slow path
(a task of the loop sends the frame and waits) does: the same results, errors, timeouts,
cancellation and cleanup. Every scenario runs both ways; ``slow`` turns the fast path off."""

from __future__ import annotations

import dataclasses

import pytest
import trio

from sandpool import OperationCancelled, SandboxError, SandboxExecutionError, SandboxTimeoutError, Session


@pytest.fixture
def session():
    with Session() as s:
        yield s


@pytest.fixture(params=["fast", "slow"])
def sb(request, session, monkeypatch):
    sandbox = session.sandbox().wait()
    if request.param == "slow":  # the loop's task sends every exec frame, as before the fast path
        monkeypatch.setattr(sandbox, "_link", dataclasses.replace(sandbox._link, send_now=lambda handler, make: 0))
    sandbox.fast = request.param == "fast"
    yield sandbox


def _settled(sb) -> None:
    """Nothing of an exec is left on the client: no request registered, no deadline kept."""
    assert sb._requests.handlers == {}
    assert "0 due" in repr(sb._link.deadlines)


def _alive(sb, pid: int) -> bool:
    return sb.exec(["sh", "-c", f"kill -0 {pid} 2>/dev/null"]).result(timeout=30).returncode == 0


def test_results_match(sb):
    """Output, exit codes, cwd, env and a command that cannot start give the same results."""
    proc = sb.exec(["sh", "-c", "echo out; echo err >&2; pwd; echo $X; exit 3"], cwd="/tmp", env={"X": "y"})
    assert proc._detached is sb.fast
    result = proc.result(timeout=30)
    assert (result.stdout, result.stderr, result.returncode) == ("out\n/tmp\ny\n", "err\n", 3)
    missing = sb.exec(["no-such-command-here"]).result(timeout=30)
    assert missing.returncode == 127 and "no-such-command-here" in missing.stderr
    big = sb.exec(["head", "-c", "3000000", "/dev/zero"]).result(timeout=30)  # crosses the output window
    assert len(big.stdout_bytes) == 3_000_000
    _settled(sb)


def test_many_short_execs_each_settle(sb):
    """An answer may come before exec() has returned: each of many quick execs still settles."""
    for i in range(200):
        assert sb.exec(["sh", "-c", f"exit {i % 7}"]).result(timeout=30).returncode == i % 7
    _settled(sb)


def test_check_raises_the_same_error(sb):
    """check=True: a non-zero exit is a SandboxExecutionError carrying the result."""
    with pytest.raises(SandboxExecutionError) as info:
        sb.exec(["sh", "-c", "echo no; exit 2"], check=True).result(timeout=30)
    assert info.value.exec_result.returncode == 2 and info.value.exec_result.stdout == "no\n"
    _settled(sb)


def test_timeout_kills_the_tree(sb):
    """A timeout is a SandboxTimeoutError; the process is killed and its streams end."""
    proc = sb.exec(["sleep", "600"], timeout_seconds=0.5)
    with pytest.raises(SandboxTimeoutError, match="timed out after 0.5 s"):
        proc.result(timeout=30)
    assert list(proc.stdout) == [] and proc.returncode == 137  # 128 + SIGKILL
    assert proc._pid is not None and not _alive(sb, proc._pid)
    _settled(sb)


def test_cancel_kills_the_tree(sb):
    """cancel(): OperationCancelled, the process is killed, the sandbox goes on."""
    proc = sb.exec(["sh", "-c", "echo up; exec sleep 600"])
    assert next(iter(proc.stdout)) == "up\n"  # it runs
    assert proc.cancel() is True
    with pytest.raises(OperationCancelled):
        proc.result(timeout=30)
    assert proc.cancel() is False
    assert not _alive(sb, proc._pid)
    assert sb.exec(["echo", "still here"]).result(timeout=30).stdout == "still here\n"
    _settled(sb)


def test_cancel_at_once(sb):
    """A cancel right after the exec (the frame may still be on its way) ends it all the same."""
    for _ in range(20):
        proc = sb.exec(["sleep", "600"])
        proc.cancel()
        with pytest.raises(OperationCancelled):
            proc.result(timeout=30)
    assert sb.exec(["sh", "-c", "pgrep -x sleep || true"]).result(timeout=30).stdout == ""
    _settled(sb)


def test_sandbox_stopped_under_a_running_exec(sb):
    """The sandbox stops while a command runs: its result raises the sandbox's error, its streams end."""
    proc = sb.exec(["sleep", "600"])
    sb.stop(graceful_shutdown_seconds=0).result(timeout=30)
    with pytest.raises(SandboxError) as info:
        proc.result(timeout=30)
    assert "stopped" in str(info.value)
    with pytest.raises(type(info.value)):
        list(proc.stdout)
    assert sb._requests.handlers == {}


def test_stdin_and_signals_after_a_fast_send(sb):
    """A process sent from the caller's thread takes stdin and signals as any other."""
    proc = sb.exec(["sh", "-c", "read line; echo got $line; exec sleep 600"], stdin=True)
    proc.stdin.writeline("hi").result(timeout=30)
    assert next(iter(proc.stdout)) == "got hi\n"
    proc.kill().result(timeout=30)
    assert proc.result(timeout=30).returncode == 137  # 128 + SIGKILL
    _settled(sb)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "slow"])
def test_trio_path_matches(fast):
    """In trio (the loop's own thread) exec sends its frame at once and has no task either: results,
    errors, a timeout, a cancel at once and the awaiting task's cancellation end as on the slow path
    (a task of the loop sends the frame and waits): the command is killed and nothing is left."""

    async def main():
        async with Session() as session:
            sandbox = await session.sandbox()
            if not fast:
                sandbox._link = dataclasses.replace(sandbox._link, send_now=lambda handler, make: 0)
            proc = sandbox.exec(["sh", "-c", "echo hi; echo err >&2; exit 4"])
            assert bool(proc._req_id) is fast and proc._detached is fast  # the frame went out already
            result = await proc
            assert (result.stdout, result.stderr, result.returncode) == ("hi\n", "err\n", 4)
            with pytest.raises(SandboxExecutionError) as info:
                await sandbox.exec(["sh", "-c", "echo no; exit 2"], check=True)
            assert info.value.exec_result.stdout == "no\n"
            with pytest.raises(SandboxTimeoutError):
                await sandbox.exec(["sleep", "600"], timeout_seconds=0.3)
            early = sandbox.exec(["sleep", "600"])
            early.cancel()  # before a task ran, or at once after the frame went out
            with pytest.raises(OperationCancelled):
                await early
            with pytest.raises(SandboxExecutionError, match="cancelled"):  # its streams end with why
                [chunk async for chunk in early.stdout]
            with trio.CancelScope() as scope:  # the awaiting task is cancelled: so is the command
                running = sandbox.exec(["sh", "-c", "echo up; exec sleep 600"])
                async for chunk in running.stdout:
                    assert chunk == "up\n"
                    break
                scope.cancel()
                await running
            with pytest.raises(OperationCancelled):
                await running
            # the kills go out by tasks of their own: the commands are gone soon after (else this times out)
            await sandbox.exec(["sh", "-c", "while pgrep -x sleep >/dev/null; do :; done"], timeout_seconds=20,
                               check=True)
            _settled(sandbox)

    trio.run(main)
