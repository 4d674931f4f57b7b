"""Lifetime policies: idle timeout and max lifetime stop a sandbox with a status reason."""

import time

import pytest

from sandpool import SandboxStatus, Session


@pytest.fixture(params=["process", "namespaces"])
def session(request):
    from sandpool._isolation import probe

    why = probe.unavailable(request.param)
    if why:
        pytest.skip(f"{request.param} level unavailable: {why}")
    with Session(defaults={"isolation": request.param}) as s:
        yield s


def test_idle_timeout_stops_a_sandbox_nobody_uses(session):
    """With nothing running and no request for idle_timeout_seconds, the sandbox stops, saying why."""
    sb = session.sandbox(idle_timeout_seconds=0.3)
    started = time.monotonic()  # before the start: the agent's idle clock cannot begin earlier
    sb.wait()
    sb.wait_until_complete(timeout=30, raise_on_termination=False).result()
    assert 0.3 <= time.monotonic() - started < 20  # a real clock is the point: not before, not much after
    assert sb.status == SandboxStatus.TERMINATED and sb.status_reason == "idle_timeout_seconds elapsed with nothing running"


def test_running_work_and_requests_keep_a_sandbox_alive(session):
    """A command running longer than the idle timeout, then requests back to back for longer than
    it, keep it alive; then it idles out."""
    sb = session.sandbox(idle_timeout_seconds=1.0)
    assert sb.exec(["sleep", "1.5"]).result().returncode == 0
    sb.write_file("/probe", b"x").result()
    busy_until = time.monotonic() + 1.5
    while time.monotonic() < busy_until:  # each gap is one request's round trip, far below 1 s
        sb.read_file("/probe").result()
    assert sb.status == SandboxStatus.RUNNING
    sb.wait_until_complete(timeout=30, raise_on_termination=False).result()
    assert sb.status_reason.startswith("idle_timeout_seconds")


def test_max_lifetime_ends_a_busy_sandbox(session):
    """max_lifetime_seconds ends the sandbox even while it works, with its own reason."""
    sb = session.sandbox(max_lifetime_seconds=0.5)
    sb.exec(["sleep", "30"])
    sb.wait_until_complete(timeout=25, raise_on_termination=False).result()  # long before the sleep's 30 s
    assert sb.status == SandboxStatus.TERMINATED and sb.status_reason == "max_lifetime_seconds elapsed"


def test_idle_timeout_is_validated():
    """A non-positive idle timeout is refused naming the field and an example."""
    with pytest.raises(ValueError, match=r"idle_timeout_seconds .*use e\.g\. idle_timeout_seconds=600"):
        Session().sandbox(idle_timeout_seconds=0)
