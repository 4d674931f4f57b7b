"""A client of ``sandpool serve`` against the snapshots the server did not take for its clients: the
machine's own (a local session's, in the same store). It can neither read them (get, list, restore
from them) nor delete them, nor tell them apart from ids that do not exist, through sandpool's API
or through the server's cwsandbox listener with the published client; hostile ids in raw calls are
refused by field. The server, its own snapshots and the machine's snapshot keep working."""

from __future__ import annotations

import grpc
import pytest

from sandpool._grpc import endpoint

from sandpool import (
    Sandbox,
    SandboxDefaults,
    SandboxFailedError,
    Session,
    SnapshotNotFoundError,
)
from sandpool._grpc import messages as m
from sandpool._isolation import probe
from sandpool._isolation.snapshots import store

from service_helpers import ServerProcess, wait_until
from test_cwsandbox_client import cwsandbox_client  # noqa: F401 (the fixture: installs the client)
from test_cwsandbox_state import _free_port, run_program

pytestmark = pytest.mark.needs_root("snapshots need the namespaces level as root")

GHOST = "snap-0123456789abcdef"


def _cat(sb: Sandbox, path: str) -> str:
    return sb.exec(["cat", path], check=True).result().stdout


def _raw(srv: ServerProcess, method: str, request: dict[str, object]) -> grpc.RpcError:
    """The error of one raw call (the attacker's own client, past every client-side check)."""
    channel = grpc.insecure_channel(srv.address)
    try:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(m.path(method))(m.pack(request), metadata=srv.metadata, timeout=30)
        return info.value
    finally:
        channel.close()


def _refusal(call) -> str:
    """The message of the SnapshotNotFoundError (or failed start) ``call()`` raises, the id blanked."""
    with pytest.raises((SnapshotNotFoundError, SandboxFailedError)) as info:
        call()
    return str(info.value)


#: With the published client, through the listener: the machine's snapshot is "not found" to get and
#: delete, and left out of the list; the client's own snapshot works.
CW_PROGRAM = """
    from cwsandbox import Sandbox

    for attempt in (lambda: Sandbox.get_snapshot(PRIVATE).result(), lambda: Sandbox.delete_snapshot(PRIVATE).result()):
        try:
            attempt()
        except Exception as exc:
            assert "does not exist" in str(exc), exc
        else:
            raise AssertionError("the machine's snapshot was reached")
    assert PRIVATE not in [s.file_system_snapshot_id for s in Sandbox.list_snapshots().result()]
    with Sandbox.run() as sb:
        own = sb.snapshot().result()
    assert Sandbox.get_snapshot(own).result().file_system_snapshot_id == own
    Sandbox.delete_snapshot(own).result()
    print("OK")
"""


def test_a_client_cannot_read_restore_or_delete_the_machines_snapshots(cwsandbox_client, tmp_path,  # noqa: F811
                                                                       monkeypatch):
    """The machine's snapshot (taken by a local session in the store the server uses) is invisible
    to the server's client: get, delete and a restore from it fail exactly as for an id that does not
    exist, list leaves it out, raw calls with hostile ids are refused by field; afterwards the
    snapshot is intact and restores locally, and the client's own snapshot works on the server."""
    why = probe.unavailable("namespaces")
    if why or probe.rootless():
        pytest.skip(f"snapshots need the namespaces level as root: {why or 'rootless here'}")
    dirs = {"SANDPOOL_IMAGE_DIR": str(tmp_path / "images"), "SANDPOOL_VOLUME_DIR": str(tmp_path / "volumes")}
    for name, value in dirs.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "srv").mkdir()
    with Session(defaults=SandboxDefaults(isolation="namespaces")) as local:
        owner = local.sandbox()
        owner.exec(["sh", "-c", "echo machine-secret > /root/secret"], check=True).result()
        private = owner.snapshot().result()
    # (the server starts once the local session has closed: its leak check at its stop wants no other sandbox)
    port = _free_port()
    with ServerProcess(str(tmp_path / "srv"), "--cwsandbox", f"127.0.0.1:{port}",
                       env={**dirs, "SANDPOOL_IMAGE_FALLBACK": "host"}) as srv, Session(address=srv.address) as client:
        at = srv.address
        key = wait_until(lambda: endpoint.token_for(f"127.0.0.1:{port}"), timeout=30)
        listener = {"CWSANDBOX_BASE_URL": f"http://127.0.0.1:{port}", "CWSANDBOX_API_KEY": key,
                    "GRPC_VERBOSITY": "ERROR"}
        assert run_program(listener, f"    PRIVATE = {private!r}" + CW_PROGRAM, tmp_path).strip().endswith("OK")

        def blank(text: str, snapshot_id: str) -> str:
            return text.replace(snapshot_id, "ID")

        for attempt in (lambda i: Sandbox.get_snapshot(i, address=at).result(),
                        lambda i: Sandbox.delete_snapshot(i, address=at).result(),
                        lambda i: client.sandbox(restore_from_snapshot_id=i).start().result()):
            seen = blank(_refusal(lambda: attempt(private)), private)
            assert seen == blank(_refusal(lambda: attempt(GHOST)), GHOST)  # nothing tells them apart
        Sandbox.delete_snapshot(private, missing_ok=True, address=at).result()
        assert private not in [x.file_system_snapshot_id for x in Sandbox.list_snapshots(address=at).result()]
        assert store().get(private).source_sandbox_id == owner.sandbox_id  # still there, whole

        hostile = [("GetSnapshot", {"snapshot_id": "../records/" + private}),
                   ("GetSnapshot", {"snapshot_id": 7}),
                   ("DeleteSnapshot", {"snapshot_id": "snap-" + "0" * 5000}),
                   ("DeleteSnapshot", {"snapshot_id": private, "missing_ok": "yes"}),
                   ("ListSnapshots", {"source_sandbox_id": "x" * 100_000})]
        for method, request in hostile:
            error = _raw(srv, method, request)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.details())
        assert store().get(private).snapshot_id == private

        mine = client.sandbox()
        mine.exec(["sh", "-c", "echo client-state > /root/state"], check=True).result()
        own = mine.snapshot().result()
        assert Sandbox.get_snapshot(own, address=at).result().source_sandbox_id == mine.sandbox_id
        assert _cat(client.sandbox(restore_from_snapshot_id=own), "/root/state") == "client-state\n"
        Sandbox.delete_snapshot(own, address=at).result()
    with Session(defaults=SandboxDefaults(isolation="namespaces")) as local:
        assert _cat(local.sandbox(restore_from_snapshot_id=private), "/root/secret") == "machine-secret\n"
    Sandbox.delete_snapshot(private).result()
