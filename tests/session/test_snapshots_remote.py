"""Snapshots of a sandpool server's sandboxes (the remote runtime): ``sb.snapshot()``, restores,
``fork`` and snapshot-on-stop through ``sandpool serve``, which keeps the snapshots in its own store."""

from __future__ import annotations

import pytest

from sandpool import Sandbox, SandboxFailedError, Session, SnapshotNotFoundError
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
        assert Sandbox.get_snapshot(on_stop).result().source_sandbox_id == source.sandbox_id
        listed = Sandbox.list_snapshots(source_sandbox_id=source.sandbox_id).result()
        taken = {snap, on_stop} | {x.file_system_snapshot_id for x in listed}
        assert len(taken) == 3  # the manual one, fork's and the one taken on stop
        for snapshot_id in taken:
            Sandbox.delete_snapshot(snapshot_id).result()
    assert late.status.is_terminal and all(f.status.is_terminal for f in forks)


def test_restore_from_a_snapshot_the_server_lacks_fails_the_start(server):
    """A restore from an unknown snapshot id fails that sandbox's start with the reason; the session
    (and the server) go on serving."""
    with Session(address=server.address) as s:
        ghost = s.sandbox(restore_from_snapshot_id="snap-0000000000000000")
        with pytest.raises((SandboxFailedError, SnapshotNotFoundError), match="snap-0000000000000000"):
            ghost.start().result()
        assert s.sandbox().exec(["echo", "still serving"]).result().stdout == "still serving\n"
