"""Shared sandboxes through a real server: several clients on one sandbox, handles found by other
processes, what a client leaves behind when it exits, and the end of a sandbox told to latecomers."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
from service_helpers import ServerProcess, run_client

from sandpool import Sandbox, SandboxFailedError, SandboxStatus, Session
from _sandpool_agent import wire as _wire
from sandpool._grpc import messages as m


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(str(tmp_path_factory.mktemp("serve")), grace=30.0) as srv:
        yield srv


OTHER_CLIENT = """
import sys, sandpool
sb = sandpool.Sandbox.from_id(sys.argv[1] if len(sys.argv) > 1 else "{sandbox_id}").result()
for i in range(30):
    r = sb.exec(["sh", "-c", f"echo other-{{i}}; echo err-{{i}} >&2"]).result()
    assert (r.stdout, r.stderr) == (f"other-{{i}}\\n", f"err-{{i}}\\n"), r
sb.write_file("/from-other", b"hello").result()
print("ok")
"""


def test_two_processes_share_a_sandbox_without_crossing_streams(server):
    """Another process attaches to this process's sandbox; both exec at once, and each sees only
    its own output (frame ids are kept apart per client); files are shared."""
    with Session(address=server.address) as s:
        sb = s.sandbox()
        sb.wait()
        other = subprocess.Popen([sys.executable, "-c", OTHER_CLIENT.format(sandbox_id=sb.sandbox_id)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "SANDPOOL_ADDRESS": server.address})
        for i in range(30):
            r = sb.exec(["sh", "-c", f"echo mine-{i}"]).result()
            assert r.stdout == f"mine-{i}\n" and r.stderr == ""
        out, err = other.communicate(timeout=60)
        assert other.returncode == 0 and out == "ok\n", err
        assert sb.read_file("/from-other").result() == b"hello"
        assert sb.status == SandboxStatus.RUNNING  # the other client's exit did not stop it
    assert sb.status == SandboxStatus.TERMINATED


def test_a_client_that_exits_without_stopping_leaves_nothing_running(server):
    """A standalone Sandbox.run() in a process that just exits: its lease is released and the
    server stops the sandbox at once (no grace: the client went away cleanly)."""
    result = run_client("import sandpool\n"
                        "sb = sandpool.Sandbox.run('sleep', '300', tags=['left-behind'])\n"
                        "print(sb.sandbox_id)\n", env={"SANDPOOL_ADDRESS": server.address})
    assert result.returncode == 0, result.stderr
    sandbox_id = result.stdout.strip()
    found = Sandbox.from_id(sandbox_id, address=server.address).result()
    assert found.status == SandboxStatus.TERMINATED
    assert Sandbox.list(tags=["left-behind"], address=server.address).result() == []


def test_found_handles_attach_on_first_use(server):
    """A handle from another client's listing knows the state without a connection, attaches on its
    first exec, and stopping it through the handle ends it for everyone."""
    with Session(address=server.address, defaults={"tags": ["found"]}) as s:
        sb = s.sandbox()
        sb.wait()
        result = run_client(
            "import sandpool\n"
            "[h] = sandpool.Sandbox.list(tags=['found']).result()\n"
            "print(h.status.value, h._record.channel is None, end=' ')\n"
            "print(h.exec(['echo', 'hi']).result().stdout.strip(), h._record.channel is not None, end=' ')\n"
            "h.stop(graceful_shutdown_seconds=1).result()\n"
            "print(h.status.value)\n", env={"SANDPOOL_ADDRESS": server.address})
        assert result.stdout.split() == ["running", "True", "hi", "True", "terminated"], result.stderr
        sb.wait_until_complete(timeout=10, raise_on_termination=False).result()
        assert sb.status == SandboxStatus.TERMINATED and sb.returncode == 143


def test_attaching_after_the_end_still_tells_how_it_ended(server):
    """A client attaching after the sandbox's main command ended gets the hello, the main command's
    exit and the farewell, then the stream ends OK with the agent's exit report."""
    with Session(address=server.address) as s:
        sb = s.sandbox(command="sh", args=["-c", "exit 4"])
        with pytest.raises(SandboxFailedError):
            sb.wait_until_complete(timeout=10).result()
        assert sb.status == SandboxStatus.FAILED and sb.returncode == 4
        channel = grpc.insecure_channel(server.address)
        call = channel.stream_stream(m.path(m.ATTACH_METHOD))(
            iter([_wire.encode(_wire.hello())]), metadata=(*server.metadata, (m.META_SANDBOX, sb.sandbox_id)))
        buffer = _wire.FrameBuffer()
        frames = [f for message in call for f in buffer.feed(message)]
        assert [f["t"] for f in frames][:2] == ["hello", "main_exit"] and frames[1]["code"] == 4
        assert dict(call.trailing_metadata())[m.TRAILER_CODE] != ""
        channel.close()
        again = Sandbox.from_id(sb.sandbox_id, address=server.address).result()
        assert again is sb


def test_a_found_handle_can_wait_for_the_end(server):
    """wait_until_complete on a handle found by another process returns when the sandbox ends,
    with its status and exit code."""
    with Session(address=server.address) as s:
        # it ends once the other client, holding its handle, says so (not after a guessed 0.5 s)
        sb = s.sandbox(command="sh", args=["-c", "while [ ! -e /tmp/go ]; do sleep 0.02; done; exit 3"])
        sb.wait()
        result = run_client(
            "import sys, sandpool\n"
            f"h = sandpool.Sandbox.from_id({sb.sandbox_id!r}).result()\n"
            "assert h.status.value == 'running', h.status\n"
            "h.write_file('/tmp/go', b'').result()\n"
            "try:\n    h.wait_until_complete(timeout=20).result()\nexcept sandpool.SandboxFailedError:\n    pass\n"
            "print(h.status.value, h.returncode)\n", env={"SANDPOOL_ADDRESS": server.address})
        assert result.stdout.split() == ["failed", "3"], result.stderr
