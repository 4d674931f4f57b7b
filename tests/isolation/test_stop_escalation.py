"""Stopping a sandbox escalates: SIGTERM to every process, the grace period, then SIGKILL of the
whole tree, daemons included; the sandbox then reports how its main command ended (143 for a
SIGTERM it obeyed, 137 for the SIGKILL it earned) and refuses to be waited on as running."""

from __future__ import annotations

import os
import time

import pytest
from proc_helpers import running
from service_helpers import wait_until

from sandpool import SandboxNotRunningError, SandboxStatus, SandboxTerminatedError, Session
from sandpool._isolation import probe

LEVELS = [pytest.param(level, marks=pytest.mark.skipif(probe.unavailable(level) is not None,
                                                       reason=f"{level} level unavailable: {probe.unavailable(level)}"))
          for level in ("process", "namespaces")]

#: A main command that ignores SIGTERM and says when it does (a file in its /tmp).
IGNORES_TERM = ("import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "pathlib.Path('ready').touch(); time.sleep(600)")
OBEYS_TERM = "import pathlib, time; pathlib.Path('ready').touch(); time.sleep(600)"


def ready(sb) -> bool:
    try:
        sb.read_file("ready").result()
    except Exception:
        return False
    return True


@pytest.mark.parametrize("isolation", LEVELS)
def test_sigterm_ignored_means_sigkill_after_the_grace_and_137(isolation):
    """A main command that ignores SIGTERM, and a daemon (setsid, empty environment, its parent
    gone, SIGTERM ignored too) that an exec left behind: stop waits the whole grace period, then
    kills both; the sandbox is TERMINATED with the main command's 137 (128 + SIGKILL)."""
    marker = str(6_000_000 + os.getpid() % 1_000_000)
    with Session(defaults={"isolation": isolation}) as s:
        sb = s.sandbox(command="python3", args=["-c", IGNORES_TERM])
        daemonise = f"setsid sh -c 'trap \"\" TERM; exec env -i sleep {marker}' </dev/null >/dev/null 2>&1 &"
        assert sb.exec(["sh", "-c", daemonise]).result().returncode == 0
        assert wait_until(lambda: ready(sb) and running(["sleep", marker])), "the main command or daemon never ran"
        grace = 1.0
        began = time.monotonic()
        sb.stop(graceful_shutdown_seconds=grace).result()
        took = time.monotonic() - began
        assert took >= grace, f"stop did not wait the grace period for a process that ignores SIGTERM: {took:.2f} s"
        assert (sb.status, sb.returncode, sb.status_reason) == (SandboxStatus.TERMINATED, 137, "stopped")
        assert running(["sleep", marker]) == [], "the daemonised descendant outlived the sandbox"


@pytest.mark.parametrize("isolation", LEVELS)
def test_sigterm_obeyed_ends_the_stop_early_with_143(isolation):
    """A main command that dies of SIGTERM ends the stop long before a 30 s grace: 143."""
    with Session(defaults={"isolation": isolation}) as s:
        sb = s.sandbox(command="python3", args=["-c", OBEYS_TERM])
        assert wait_until(lambda: ready(sb))
        began = time.monotonic()
        sb.stop(graceful_shutdown_seconds=30).result()
        assert time.monotonic() - began < 15, "stop waited for the grace although everything had exited"
        assert (sb.status, sb.returncode, sb.status_reason) == (SandboxStatus.TERMINATED, 143, "stopped")


def test_a_stopped_sandbox_raises_sandbox_terminated_error_when_waited_on():
    """wait() on a sandbox that was stopped raises SandboxTerminatedError (cwsandbox's error for
    it), naming the sandbox; exec on it raises SandboxNotRunningError; stop again is a no-op."""
    with Session() as s:
        sb = s.sandbox()
        sb.wait()
        sb.stop(graceful_shutdown_seconds=0).result()
        with pytest.raises(SandboxTerminatedError, match=f"sandbox {sb.sandbox_id} was stopped") as info:
            sb.wait()
        assert info.value.sandbox_id == sb.sandbox_id
        with pytest.raises(SandboxNotRunningError, match="has been stopped"):
            sb.exec(["true"]).result()
        sb.stop().result()
        assert sb.status == SandboxStatus.TERMINATED
