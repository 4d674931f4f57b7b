"""Exec answers batched by the agent: a round of its loop leaves in one write, and a short command's
``started`` frame gives way to its exit. Nothing may be held back for that: output of a running process
still streams before it exits, each exec gets its own output and exit code, and a process the agent
starts but cannot finish (cancelled at once) is answered and cleaned up."""

from __future__ import annotations

import pytest

from sandpool import OperationCancelled, Session


@pytest.fixture
def sb():
    with Session() as s:
        yield s.sandbox()


def test_short_execs_each_get_their_own_output_and_exit_code(sb):
    """Many short execs, in a row and at once: each result is its own (no frame crossed to another id)."""
    for i in range(30):
        result = sb.exec(["sh", "-c", f"echo out{i}; echo err{i} >&2; exit {i % 5}"]).result(timeout=30)
        assert (result.stdout, result.stderr, result.returncode) == (f"out{i}\n", f"err{i}\n", i % 5)
    procs = [sb.exec(["sh", "-c", f"echo {i}; exit {i % 3}"]) for i in range(20)]
    assert [(p.result(timeout=30).stdout, p.result().returncode) for p in procs] == [
        (f"{i}\n", i % 3) for i in range(20)]


def test_output_of_a_running_process_streams_before_it_exits(sb):
    """A process that prints, then waits for its stdin, is read while it runs: its first line comes
    before its exit (which it only reaches once told to), so no answer waits for the exit."""
    proc = sb.exec(["sh", "-c", "echo ready; read line; echo got $line"], stdin=True)
    assert next(iter(proc.stdout)) == "ready\n"
    assert proc.returncode is None
    proc.stdin.writeline("go").result()
    result = proc.result(timeout=30)
    assert (result.stdout, result.returncode) == ("ready\ngot go\n", 0)


def test_an_exec_cancelled_at_once_is_answered_and_the_sandbox_goes_on(sb):
    """Cancelling an exec right after it was sent (its ``started`` frame may still wait in the
    agent) kills it; the sandbox keeps running commands."""
    proc = sb.exec(["sleep", "600"])
    proc.cancel()
    with pytest.raises(OperationCancelled):
        proc.result(timeout=30)
    assert sb.exec(["echo", "still here"]).result(timeout=30).stdout == "still here\n"
