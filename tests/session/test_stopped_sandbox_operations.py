"""Every operation on a sandbox that has ended returns at once: with the sandbox's error
(SandboxNotRunningError naming it), or with what is left (its log, its end state); none waits for a
sandbox that will never answer. Locally and through a sandpool server."""

from __future__ import annotations

import time

import pytest

from sandpool import SandboxNotRunningError, Session

from test_remote_errors_both_ways import server, where  # noqa: F401 (fixtures: local, or through a server)

#: A bound for a hang, far above what any of these takes (milliseconds).
AT_ONCE_SECONDS = 10.0

REFUSED = {
    "read_file": lambda sb: sb.read_file("/etc/hostname").result(),
    "write_file": lambda sb: sb.write_file("/tmp/x", b"x").result(),
    "read_file_streaming": lambda sb: list(sb.read_file_streaming("/etc/hostname")),
    "write_file_streaming": lambda sb: sb.write_file_streaming("/tmp/x", iter([b"x"])).result(),
    "exec": lambda sb: sb.exec(["echo", "hi"]).result(),
    "exec stdout": lambda sb: list(sb.exec(["echo", "hi"]).stdout),
    "exec with stdin": lambda sb: sb.exec(["cat"], stdin=True).result(),
    "shell": lambda sb: list(sb.shell(["sh"]).output),
}


def test_operations_on_a_stopped_sandbox_end_at_once(where):
    with Session(**where) as s:
        sb = s.sandbox(command="sh", args=["-c", "echo started; exec sleep 1000"])
        sb.start().result()
        following = iter(sb.stream_logs(follow=True))
        assert next(following) == "started\n"  # the main command runs: stop it now
        sb.stop().result()
        assert list(following) == []  # a follow stream ends with the sandbox
        for name, operation in REFUSED.items():
            began = time.monotonic()
            with pytest.raises(SandboxNotRunningError, match=sb.sandbox_id):
                operation(sb)
            assert time.monotonic() - began < AT_ONCE_SECONDS, name
        began = time.monotonic()
        assert list(sb.stream_logs(follow=True)) == ["started\n"]  # what it wrote, then the end
        assert sb.wait_until_complete(raise_on_termination=False).result() is sb
        assert time.monotonic() - began < AT_ONCE_SECONDS
        assert s.sandbox().exec(["echo", "still serving"]).result().stdout == "still serving\n"
