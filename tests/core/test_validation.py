"""Bad arguments to stop() and non-positive or non-numeric timeouts: each is a ValueError naming the
argument, the value and a fix, raised at the call, and the sandbox it was aimed at goes on working."""

from __future__ import annotations

import math

import pytest

import sandpool
from sandpool import SandboxDefaults, SandboxStatus, Session

BAD_SECONDS = [0, -1, math.nan, math.inf, "5"]
BAD_WAITS = [-1, -0.001, math.nan, "5", True]


@pytest.fixture
def session():
    with Session() as s:
        yield s


@pytest.fixture
def sb(session):
    sandbox = session.sandbox()
    sandbox.wait()
    yield sandbox


def still_works(sb) -> None:
    assert sb.status == SandboxStatus.RUNNING
    assert sb.exec(["echo", "ok"]).result().stdout == "ok\n"


@pytest.mark.parametrize("grace", [-1, -0.5, math.nan, math.inf, "1", None])
def test_stop_refuses_a_bad_grace_and_leaves_the_sandbox_running(sb, grace):
    """graceful_shutdown_seconds must be a finite number >= 0: anything else is refused before
    anything is stopped."""
    with pytest.raises(ValueError, match=r"graceful_shutdown_seconds must be a number >= 0, got "):
        sb.stop(graceful_shutdown_seconds=grace)
    still_works(sb)


@pytest.mark.parametrize("arguments", [{"graceful_shutdown_seconds": True}, {"missing_ok": "yes"}])
def test_stop_refuses_booleans_for_seconds_and_non_booleans_for_missing_ok(sb, arguments):
    """True is not a number of seconds; missing_ok is a bool."""
    with pytest.raises((ValueError, TypeError)):
        sb.stop(**arguments)
    still_works(sb)
    sb.stop(graceful_shutdown_seconds=0).result()


@pytest.mark.parametrize("seconds", BAD_SECONDS)
def test_exec_refuses_a_non_positive_timeout(sb, seconds):
    """exec(timeout_seconds=) must be a number > 0 (inf: no limit)."""
    if seconds == math.inf:
        assert sb.exec(["true"], timeout_seconds=seconds).result().returncode == 0
        return
    with pytest.raises(ValueError, match=r"timeout_seconds must be a number > 0, got "):
        sb.exec(["true"], timeout_seconds=seconds)
    still_works(sb)


@pytest.mark.parametrize("seconds", [0, -1, math.nan, "5"])
def test_file_ops_refuse_a_non_positive_timeout(sb, seconds):
    """read_file/write_file(timeout_seconds=) as exec: a number > 0, refused with the name."""
    for op in (lambda: sb.read_file("/etc/hostname", timeout_seconds=seconds),
               lambda: sb.write_file("/tmp/x", b"", timeout_seconds=seconds)):
        with pytest.raises(ValueError, match="timeout_seconds"):
            op().result()
    still_works(sb)


@pytest.mark.parametrize("seconds", [-1, math.nan])
def test_sandbox_waits_refuse_a_negative_timeout(sb, seconds):
    for op in (lambda: sb.wait(timeout=seconds), lambda: sb.wait_until_complete(timeout=seconds).result()):
        with pytest.raises(ValueError, match="timeout"):
            op()


@pytest.mark.parametrize("seconds", BAD_SECONDS)
def test_configured_durations_refuse_non_positive_values(session, seconds):
    """A function's timeout_seconds, the defaults' request_timeout_seconds and a sandbox's
    max_lifetime_seconds and idle_timeout_seconds: finite numbers > 0, each named when wrong."""
    with pytest.raises(ValueError, match=r"timeout_seconds must be a number of seconds > 0 or None, got "):
        session.function(timeout_seconds=seconds)(abs)
    for name, make in (("request_timeout_seconds", lambda: SandboxDefaults(request_timeout_seconds=seconds)),
                       ("max_lifetime_seconds", lambda: session.sandbox(max_lifetime_seconds=seconds)),
                       ("idle_timeout_seconds", lambda: session.sandbox(idle_timeout_seconds=seconds))):
        with pytest.raises((ValueError, TypeError), match=f"{name} must be a finite number of seconds > 0"):
            make()


@pytest.mark.parametrize("seconds", BAD_WAITS)
def test_waiting_on_refs_refuses_a_negative_or_nan_timeout(sb, seconds):
    """result(), exception(), Process.wait(), sandpool.wait() and as_completed() take None or
    seconds >= 0; a bad value fails at once, even on a finished ref, and the work goes on."""
    running = sb.exec(["sleep", "30"])
    done = sb.exec(["true"])
    done.result()
    for op in (lambda: running.result(timeout=seconds), lambda: running.exception(timeout=seconds),
               lambda: running.wait(timeout=seconds), lambda: done.result(timeout=seconds),
               lambda: sandpool.wait([running], timeout=seconds),
               lambda: list(sandpool.as_completed([running], seconds))):
        with pytest.raises(ValueError, match=r"timeout must be a number of seconds >= 0 or None, got .*timeout=30"):
            op()
    assert not running.done()
    running.kill().result()
    still_works(sb)


def test_a_zero_timeout_only_looks(sb):
    """timeout=0 is a look, not an error: a finished ref answers, an unfinished one raises
    TimeoutError at once and keeps running."""
    done = sb.exec(["echo", "done"])
    assert done.result().stdout == "done\n"
    assert done.result(timeout=0).stdout == "done\n"
    running = sb.exec(["sleep", "30"])
    with pytest.raises(TimeoutError):
        running.result(timeout=0)
    assert not running.done()
    running.kill().result()
