"""The test run's leak check, run after every test, when a server that spans tests stops, and once
at the end of the session (``conftest.py`` wires it in).

Nothing of a sandbox may outlive its owner: ``check`` fails when ``sandpool.testing.leftovers``
finds anything of the run's state directory (and of the directories given, such as a test's
``tmp_path``): processes, directories, mounts, cgroups, and a bridge sandbox's veth and nftables
chains. Two kinds of template are kept, because they deliberately outlive one test: this
process's shared runtime (closed at the end of the session, then checked), and the runtimes of
servers that fixtures keep across tests (checked when the server stops: ``server_stopped``, then
``check``).
"""

from __future__ import annotations

import os
import time

import pytest
import trio

from sandpool import testing

STATE_DIR = os.environ["SANDPOOL_STATE_DIR"]  # conftest.py sets it before anything imports sandpool
#: pid of a server process -> (when it started (time.monotonic()), its kernel start time): the second
#: tells the server from a later process that got its pid
_servers: dict[int, tuple[float, str | None]] = {}
_test_started = [float("inf")]  # when the running test's body started: servers started before are fixtures'


def server_started(pid: int) -> None:
    """A server process started: its runtime may outlive the test if a fixture started it."""
    _servers[pid] = (time.monotonic(), _start_time(pid))


def server_stopped(pid: int) -> None:
    _servers.pop(pid, None)


def body_starts() -> None:
    """The running test's body starts now (conftest's pytest_runtest_call)."""
    _test_started[0] = time.monotonic()


def check(what: str, *more: str) -> None:
    """pytest.fail if anything of the run (or of ``more``) is left; what is left is then killed and
    removed, so the next test starts clean. Kept: the shared runtime, and the runtimes of servers
    started before the test body (by fixtures that span tests)."""
    parents = {pid for pid, (started, _) in _servers.items() if started < _test_started[0]}
    report = testing.wait_for_no_leftovers(STATE_DIR, *more, keep_parents=parents, timeout=5.0)
    if report:
        testing.kill_leftovers(report)
        pytest.fail(f"{what} leaked: {report}", pytrace=False)


def close_runtime(runtime) -> None:
    """Close a runtime that a sync ``Session(runtime=...)`` was given. The last session using it
    closes it already, so this only checks that nothing of it is left open (a no-op when closed)."""
    trio.run(runtime.aclose)


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(") ")[2].split()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields else None  # starttime, field 22 of stat


def _running(pid: int, started: str | None) -> bool:
    """Whether the server ``pid`` that started at kernel time ``started`` still runs (not a zombie,
    and not another process that reused its pid)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z" and fields[19] == started


def session_leftovers(*more: str) -> testing.Leftovers:
    """At the end of the run: close the shared runtime, then nothing at all may be left."""
    try:
        testing.close_shared_runtime()
    except RuntimeError as exc:  # e.g. a test's trio.run was interrupted: its template is then reported
        print(f"leak check: could not close the shared runtime: {exc}")
    report = testing.wait_for_no_leftovers(STATE_DIR, *more, keep_owners=(), timeout=5.0)
    report.processes += [(pid, "a server no test or fixture stopped") for pid, (_, started) in _servers.items()
                         if _running(pid, started)]
    if report:
        testing.kill_leftovers(report)
    return report
