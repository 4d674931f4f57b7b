"""Snapshots of a sandpool server's sandboxes (the remote runtime): ``sb.snapshot()``, restores,
``fork`` and snapshot-on-stop through ``sandpool serve``, which keeps the snapshots in its own store,
and their management by its clients (``Sandbox.get/list/delete_snapshot(address=)``, the CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sandpool import Sandbox, SandboxFailedError, Session, SnapshotNotFoundError, SnapshotNotSupportedError
from sandpool._isolation import probe
from sandpool._runtime.remote import RemoteRuntime

from service_helpers import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    why = probe.unavailable("namespaces")
    if why or probe.rootless():
        pytest.skip(f"snapshots need the namespaces level as root: {why or 'rootless here'}")
    with ServerProcess(str(tmp_path_factory.mktemp("serve-snap"))) as srv:
        yield srv


def _cat(sb: Sandbox, path: str) -> str:
    return sb.exec(["cat", path], check=True).result().stdout


def test_snapshot_restore_fork_and_snapshot_on_stop_through_a_server(server):
    """A server's sandbox is snapshotted by the server; restores and forks start from it there, each
    with its own copy (changes flow neither way), and stop(snapshot_on_stop=True) fills its id."""
    with Session(address=server.address) as s:
        source = s.sandbox()
        source.exec(["sh", "-c", "echo original > /root/state"], check=True).result()
        assert isinstance(source._runtime, RemoteRuntime)
        snap = source.snapshot().result()
        source.exec(["sh", "-c", "echo changed > /root/state"], check=True).result()
        copy = s.sandbox(restore_from_snapshot_id=snap)
        assert _cat(copy, "/root/state") == "original\n"
        copy.exec(["sh", "-c", "echo in-copy > /root/state"], check=True).result()
        assert _cat(source, "/root/state") == "changed\n"
        forks = source.fork(2).result()
        assert [_cat(f, "/root/state") for f in forks] == ["changed\n"] * 2
        forks[0].exec(["sh", "-c", "echo in-fork > /root/state"], check=True).result()
        assert _cat(forks[1], "/root/state") == "changed\n"
        source.stop(snapshot_on_stop=True).result()
        on_stop = source.file_system_snapshot_id
        assert on_stop and on_stop != snap
        late = s.sandbox(restore_from_snapshot_id=on_stop)  # the source is gone by now
        assert _cat(late, "/root/state") == "changed\n"
        at = server.address
        assert Sandbox.get_snapshot(on_stop, address=at).result().source_sandbox_id == source.sandbox_id
        listed = Sandbox.list_snapshots(source_sandbox_id=source.sandbox_id, address=at).result()
        taken = {snap, on_stop} | {x.file_system_snapshot_id for x in listed}
        assert len(taken) == 3  # the manual one, fork's and the one taken on stop
        for snapshot_id in taken:
            Sandbox.delete_snapshot(snapshot_id, address=at).result()
    assert late.status.is_terminal and all(f.status.is_terminal for f in forks)


def test_restore_from_a_snapshot_the_server_lacks_fails_the_start(server):
    """A restore from an unknown snapshot id fails that sandbox's start with the reason; the session
    (and the server) go on serving."""
    with Session(address=server.address) as s:
        ghost = s.sandbox(restore_from_snapshot_id="snap-0000000000000000")
        with pytest.raises((SandboxFailedError, SnapshotNotFoundError), match="snap-0000000000000000"):
            ghost.start().result()
        assert s.sandbox().exec(["echo", "still serving"]).result().stdout == "still serving\n"


def _cli(server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SANDPOOL_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "sandpool", "snapshots", *args, "--address", server.address],
                          env=env, capture_output=True, text=True, timeout=60)


def test_a_client_manages_the_servers_snapshots(server, monkeypatch):
    """get/list/delete_snapshot with address= (or $SANDPOOL_ADDRESS) and 'sandpool snapshots ls|rm
    --address' ask the server: they see its snapshot, delete it there, and then find it gone (the
    error carrying the id)."""
    with Session(address=server.address) as s:
        sb = s.sandbox()
        sb.exec(["sh", "-c", "echo kept > /root/state"], check=True).result()
        snap = sb.snapshot().result()
    monkeypatch.setenv("SANDPOOL_ADDRESS", server.address)
    assert Sandbox.get_snapshot(snap).result().source_sandbox_id == sb.sandbox_id
    assert snap in [x.file_system_snapshot_id for x in Sandbox.list_snapshots().result()]
    monkeypatch.delenv("SANDPOOL_ADDRESS")
    listed = _cli(server, "ls", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert [r["source_sandbox_id"] for r in json.loads(listed.stdout) if r["snapshot_id"] == snap] == [sb.sandbox_id]
    table = _cli(server, "ls")
    assert snap in table.stdout and sb.sandbox_id in table.stdout
    removed = _cli(server, "rm", snap)
    assert removed.returncode == 0 and f"removed {snap}" in removed.stdout, removed.stderr
    again = _cli(server, "rm", snap)
    assert again.returncode == 1 and "no snapshot" in again.stderr
    with pytest.raises(SnapshotNotFoundError) as info:
        Sandbox.get_snapshot(snap, address=server.address).result()
    assert info.value.file_system_snapshot_id == snap
    assert Sandbox.delete_snapshot(snap, missing_ok=True, address=server.address).result() is None
    assert snap not in [x.file_system_snapshot_id for x in Sandbox.list_snapshots(address=server.address).result()]


def test_a_servers_refusal_keeps_its_attributes(tmp_path):
    """A SnapshotNotSupportedError from a server (a process-level sandbox has no layer to capture)
    reaches the client with its ``feature`` and ``sandbox_id``, as a local one has them."""
    with ServerProcess(str(tmp_path), "--min-isolation", "process") as srv, Session(address=srv.address) as s:
        sb = s.sandbox(isolation="process")
        sb.start().result()
        with pytest.raises(SnapshotNotSupportedError) as info:
            sb.snapshot().result()
        assert info.value.feature == "snapshot" and info.value.sandbox_id == sb.sandbox_id
        assert sb.exec(["echo", "still running"]).result().stdout == "still running\n"


def test_error_attributes_from_a_server_are_bounded():
    """What a server's error trailer may set on the client's exception: only string attributes the
    class declares (never sandbox_id, which the client knows), each short; anything else is ignored."""
    from sandpool._grpc import messages as m

    sent = m.error_extras(SnapshotNotSupportedError("no", feature="snapshot", file_system_snapshot_id="snap-1"))
    assert m.extras_for(SnapshotNotSupportedError, sent) == {"feature": "snapshot", "file_system_snapshot_id": "snap-1"}
    hostile = json.dumps({"feature": "x" * 300, "__class__": "int", "sandbox_id": "sb-other", "reason": 3,
                          "file_system_snapshot_id": "snap-2"})
    assert m.extras_for(SnapshotNotSupportedError, hostile) == {"file_system_snapshot_id": "snap-2"}
    for text in (None, "not json", "[1]", json.dumps({"feature": "x" * 10_000})):
        assert m.extras_for(SnapshotNotSupportedError, text) == {}


def test_a_session_asks_its_server_and_the_server_remembers_across_restarts(tmp_path):
    """Session(address=).get/list/delete_snapshot ask that session's server; a snapshot taken through
    a server is still its clients' after the server restarts on the same record file (its ledger)."""
    with ServerProcess(str(tmp_path)) as first, Session(address=first.address) as s:
        sb = s.sandbox()
        sb.exec(["sh", "-c", "echo before-restart > /root/state"], check=True).result()
        snap = sb.snapshot().result()
        assert s.get_snapshot(snap).result().source_sandbox_id == sb.sandbox_id
        assert [x.file_system_snapshot_id for x in s.list_snapshots(source_sandbox_id=sb.sandbox_id).result()] == [snap]
    with ServerProcess(str(tmp_path)) as second, Session(address=second.address) as s:
        assert s.get_snapshot(snap).result().file_system_snapshot_id == snap
        assert _cat(s.sandbox(restore_from_snapshot_id=snap), "/root/state") == "before-restart\n"
        assert s.delete_snapshot(snap).result() is None
        with pytest.raises(SnapshotNotFoundError):
            s.get_snapshot(snap).result()
