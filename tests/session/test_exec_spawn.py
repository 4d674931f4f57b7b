"""The agent starts most execs with posix_spawn (the sandbox's own directory and PATH) and the rest
with Popen (another cwd, a PATH of their own). Both must start the same process: the same results,
the same program found on PATH (a non-executable file earlier on it skipped), the same errors, no fd
of the agent's, and a session of its own. Every scenario runs both ways."""

from __future__ import annotations

import pytest

from sandpool import Session

SETUP = ("mkdir -p /tmp/spawn/bin /tmp/spawn/noexec && printf '#!/bin/sh\\necho from-tmp\\n' > /tmp/spawn/bin/true"
         " && chmod +x /tmp/spawn/bin/true && printf '#!/bin/sh\\necho never\\n' > /tmp/spawn/noexec/true"
         " && chmod -x /tmp/spawn/noexec/true && printf '' > /tmp/spawn/noexec/only-here")


@pytest.fixture
def sb():
    with Session() as session:
        sandbox = session.sandbox().wait()
        assert sandbox.exec(["sh", "-c", SETUP]).result(timeout=30).returncode == 0
        sandbox.path = sandbox.exec(["sh", "-c", "echo $PATH"]).result(timeout=30).stdout.strip()
        yield sandbox


@pytest.fixture(params=["posix_spawn", "popen"])
def way(request, sb):
    """Keyword arguments that take the one way or the other (the agent's cwd and PATH, or others)."""
    return {} if request.param == "posix_spawn" else {"cwd": "/tmp"}


def test_same_results(sb, way):
    r = sb.exec(["sh", "-c", "echo out; echo err >&2; exit 3"], **way).result(timeout=30)
    assert (r.stdout, r.stderr, r.returncode) == ("out\n", "err\n", 3)


def test_path_search_as_execvp(sb, way):
    assert sb.exec(["true"], **way).result(timeout=30).stdout == ""  # the sandbox's PATH: the system's true
    ours = sb.exec(["true"], env={"PATH": "/tmp/spawn/bin:" + sb.path}, **way).result(timeout=30)
    assert (ours.stdout, ours.returncode) == ("from-tmp\n", 0)  # a PATH of its own: searched in order
    skipped = sb.exec(["true"], env={"PATH": "/tmp/spawn/noexec:" + sb.path}, **way).result(timeout=30)
    assert (skipped.stdout, skipped.returncode) == ("", 0)  # not executable: the next one on PATH runs


def test_errors(sb, way):
    missing = sb.exec(["sandpool-no-such-program"], **way).result(timeout=30)
    assert missing.returncode == 127 and "No such file" in missing.stderr
    denied = sb.exec(["only-here"], env={"PATH": "/tmp/spawn/noexec:" + sb.path}, **way).result(timeout=30)
    assert denied.returncode == 126 and "Permission denied" in denied.stderr
    assert sb.exec(["/tmp/spawn/noexec/true"], **way).result(timeout=30).returncode == 126
    assert sb.exec(["true"], **way).result(timeout=30).returncode == 0  # and it serves on


def test_no_fd_of_the_agents_and_a_session_of_its_own(sb, way):
    fds = sb.exec(["sh", "-c", "ls /proc/$$/fd"], **way).result(timeout=30).stdout.split()
    assert sorted(fds) == ["0", "1", "2"]
    sid, pid = sb.exec(["sh", "-c", "cut -d' ' -f6 /proc/$$/stat; echo $$"], **way).result(timeout=30).stdout.split()
    assert sid == pid
