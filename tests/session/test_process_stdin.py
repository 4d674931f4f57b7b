"""Signals to and stdin of exec'd processes: terminate() sends exactly SIGTERM; stdin refuses data
after close() and after the process exited, with an error that says so, and the sandbox goes on."""

from __future__ import annotations

import pytest

from sandpool import SandboxExecutionError, Session


@pytest.fixture
def sb():
    with Session() as s:
        yield s.sandbox()


def test_terminate_sends_sigterm_which_the_process_can_handle(sb):
    """A process that traps SIGTERM runs its handler (and exits 3 from it); one that does not dies
    of it: returncode 143."""
    trapping = sb.exec(["sh", "-c", "trap 'echo got TERM; exit 3' TERM; echo ready; while :; do sleep 0.05; done"])
    assert next(iter(trapping.stdout)) == "ready\n"  # the trap is set
    trapping.terminate().result()
    result = trapping.result(timeout=30)
    assert (result.returncode, result.stdout) == (3, "ready\ngot TERM\n")
    plain = sb.exec(["sh", "-c", "echo ready; exec sleep 600"])
    assert next(iter(plain.stdout)) == "ready\n"
    plain.terminate().result()
    assert plain.result(timeout=30).returncode == 143
    assert sb.exec(["echo", "still here"]).result().stdout == "still here\n"


def test_terminate_after_exit_is_a_no_op(sb):
    """terminate() on a process that already exited changes nothing and raises nothing."""
    proc = sb.exec(["sh", "-c", "exit 5"])
    assert proc.result().returncode == 5
    proc.terminate().result()
    assert proc.returncode == 5


def test_stdin_after_close_is_refused_at_once(sb):
    """close() sends EOF; a later write raises SandboxExecutionError at the call, and what was
    written before the close arrived in full."""
    proc = sb.exec(["cat"], stdin=True)
    proc.stdin.write(b"before").result()
    proc.stdin.close().result()
    with pytest.raises(SandboxExecutionError, match="stdin is closed"):
        proc.stdin.write(b"after")
    with pytest.raises(SandboxExecutionError, match="stdin is closed"):
        proc.stdin.writeline("after")
    assert proc.stdin.close().result() is None  # close is idempotent
    assert proc.result().stdout == "before"


def test_stdin_after_the_process_exited_fails_with_the_reason(sb):
    """Writing to the stdin of a process that exited fails with 'has exited'; the sandbox goes on."""
    proc = sb.exec(["sh", "-c", "exit 0"], stdin=True)
    assert proc.result().returncode == 0
    with pytest.raises(SandboxExecutionError, match="the process has exited"):
        proc.stdin.write(b"late").result()
    with pytest.raises(SandboxExecutionError, match="the process has exited"):
        proc.stdin.close().result()
    assert sb.exec(["echo", "ok"]).result().stdout == "ok\n"


def test_a_process_started_without_stdin_has_no_writer(sb):
    """exec without stdin=True: ``proc.stdin`` is None (cwsandbox's shape), and the command reads EOF."""
    proc = sb.exec(["sh", "-c", "cat; echo eof"])
    assert proc.stdin is None
    assert proc.result(timeout=30).stdout == "eof\n"
