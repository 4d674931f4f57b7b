"""cwsandbox's remaining Sandbox methods with their local meaning, on real sandboxes."""

import pytest
from exec_helpers import FOUR_OUTCOMES, run_four_outcomes

import sandpool
from sandpool import (
    Sandbox,
    SandboxFailedError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxStatus,
    SandboxTerminatedError,
    Session,
    SnapshotNotSupportedError,
)


@pytest.fixture
def session():
    with Session() as s:
        yield s


def test_get_status_needs_a_started_sandbox(session):
    """get_status raises before the start and reports the pushed status after, without a request."""
    sb = session.sandbox()
    with pytest.raises(SandboxNotRunningError):
        sb.get_status()
    sb.wait()
    assert sb.get_status() == SandboxStatus.RUNNING


def test_exec_stats_counts_four_outcomes(session):
    """exec_count, ok, nonzero (checked or not) and failures (a timeout) are counted once each."""
    sb = session.sandbox()
    run_four_outcomes(sb)
    assert sb.exec_stats == FOUR_OUTCOMES
    assert "exec_stats" in dir(Sandbox)


def test_wait_until_complete_raises_as_cwsandbox_does(session):
    """A failed sandbox raises SandboxFailedError; a stopped one SandboxTerminatedError unless
    raise_on_termination=False; a completed one resolves to itself."""
    failed = session.sandbox(command="sh", args=["-c", "exit 3"])
    with pytest.raises(SandboxFailedError) as info:
        failed.wait_until_complete(timeout=30).result()
    assert "code 3" in info.value.status_reason
    stopped = session.sandbox()
    stopped.wait()
    stopped.stop(graceful_shutdown_seconds=1).result()
    with pytest.raises(SandboxTerminatedError):
        stopped.wait_until_complete().result()
    assert stopped.wait_until_complete(raise_on_termination=False).result() is stopped
    done = session.sandbox(command="true")
    assert done.wait_until_complete(timeout=30).result() is done and done.status == SandboxStatus.COMPLETED


def test_delete_by_id_and_missing_ok(session):
    """Sandbox.delete stops a sandbox by id; an unknown id raises unless missing_ok."""
    sb = session.sandbox()
    sb.wait()
    Sandbox.delete(sb.sandbox_id).result()
    assert sb.status == SandboxStatus.TERMINATED
    with pytest.raises(SandboxNotFoundError):
        Sandbox.delete("sb-00000000").result()
    assert Sandbox.delete("sb-00000000", missing_ok=True).result() is None


def test_snapshots_at_the_process_level_are_refused_and_stop_still_stops():
    """At the process level sb.snapshot() raises SnapshotNotSupportedError (a NotImplementedError) and
    leaves the sandbox running; stop(snapshot_on_stop=True) stops it and then raises the same."""
    with Session(defaults={"isolation": "process"}) as s:
        sb = s.sandbox()
        sb.wait()
        with pytest.raises(NotImplementedError):
            sb.snapshot().result()
        assert sb.exec(["echo", "ok"]).result().stdout == "ok\n"
        with pytest.raises(SnapshotNotSupportedError, match="isolation='namespaces'"):
            sb.stop(snapshot_on_stop=True, wait_for_ready=False, request_id="r-1").result()
        assert sb.status == SandboxStatus.TERMINATED and sb.file_system_snapshot_id is None


def test_mounted_files_exist_before_start_resolves(session):
    """mounted_files (list or dict form, str or bytes) are in place when the sandbox is first usable."""
    sb = session.sandbox(mounted_files=[{"mount_path": "/conf/a.json", "file_content": b'{"a": 1}'}])
    sb.wait()
    assert sb.read_file("/conf/a.json").result() == b'{"a": 1}'
    other = session.sandbox(mounted_files={"/b.txt": "text"})
    assert other.read_file("/b.txt").result() == b"text"


def test_a_mounted_file_that_cannot_be_written_fails_the_start(session):
    """A mount over a directory fails the start with SandboxFailedError; nothing is left behind."""
    sb = session.sandbox(mounted_files={"/": b"x"})
    with pytest.raises(SandboxFailedError, match="mounted file"):
        sb.wait()
    assert sb.status.is_terminal
    assert session.sandbox().exec(["true"]).result().returncode == 0


def test_session_alias_and_reports(session):
    """Sandbox.session makes a Session; a local sandbox reports one runner and its isolation level."""
    with Sandbox.session({"tags": ["t"]}) as s:
        assert isinstance(s, Session) and s.defaults.tags == ("t",)
    sb = session.sandbox()
    sb.wait()
    assert sb.runner_id == "local" and sb.effective_runtime_class == sb.isolation
    assert sb.service_urls == () and sb.container_statuses[0].state == SandboxStatus.RUNNING
    with pytest.raises(ValueError, match="no such template"):
        Sandbox.run_from_template("no-such-tpl")
