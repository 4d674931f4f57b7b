"""Sandbox.shell / TerminalSession: a real pseudo-terminal with resize and a controlling terminal."""

import pytest

import sandpool
from sandpool import Session, TerminalResult


@pytest.fixture
def sandbox():
    with Session() as s:
        yield s.sandbox()


def _read_until(chunks, marker: bytes, seen: bytes = b"") -> bytes:
    for chunk in chunks:
        seen += chunk
        if marker in seen:
            return seen
    raise AssertionError(f"the output ended before {marker!r}: {seen!r}")


def test_a_terminal_has_a_size_a_tty_and_resizes(sandbox):
    """The command sees a tty of the asked size; resize changes it; input is echoed as by a terminal."""
    term = sandbox.shell(["sh", "-c", 'stty size; [ -t 0 ] && echo isatty; read line; stty size; echo "got $line"'],
                         width=80, height=24)
    chunks = iter(term.output)
    seen = _read_until(chunks, b"isatty")
    assert seen.startswith(b"24 80\r\n")
    term.resize(100, 40).result()
    term.stdin.write(b"hello\n").result()
    seen = _read_until(chunks, b"got hello", seen)
    assert b"40 100\r\n" in seen
    assert b"".join(chunks) in (b"", b"\r\n")  # the newline after "got hello", if not read yet
    assert term.result() == TerminalResult(0, term.command) and term.returncode == 0


def test_ctrl_c_interrupts_the_foreground_command(sandbox):
    """^C on the terminal interrupts what runs in it (it is the controlling terminal), and the
    sandbox keeps working."""
    # The command itself says ready, once its own SIGINT handling is in place: a shell's "echo ready;
    # sleep 30" has a window between the two where dash swallows a SIGINT and runs the sleep anyway.
    term = sandbox.shell(["python3", "-c", "import time; print('ready', flush=True); time.sleep(30); print('never')"])
    seen = _read_until(iter(term.output), b"ready")
    term.stdin.write(b"\x03").result()
    assert term.wait(timeout=30) != 0
    assert b"never" not in seen
    assert sandbox.exec(["echo", "ok"]).result().stdout == "ok\n"


def test_bad_terminal_arguments(sandbox):
    """A size out of range or a string command is a ValueError naming the argument."""
    with pytest.raises(ValueError, match="width"):
        sandbox.shell(["sh"], width=0)
    with pytest.raises(ValueError, match="command"):
        sandbox.shell("sh")  # type: ignore[arg-type]


def test_cancel_kills_the_command(sandbox):
    """Cancelling a terminal session kills its command; waiting then raises OperationCancelled."""
    term = sandbox.shell(["sh", "-c", "echo ready; sleep 30"])
    _read_until(iter(term.output), b"ready")
    term.cancel()
    with pytest.raises(sandpool.OperationCancelled):
        term.result(timeout=30)
    assert sandbox.exec(["true"]).result().returncode == 0
