"""Snapshots and volumes through ``sandpool serve --cwsandbox``, driven by the published cwsandbox client.

One server for the module; each test runs an unmodified cwsandbox program in its own process (only
``CWSANDBOX_BASE_URL`` and ``CWSANDBOX_API_KEY`` point it here), which asserts what the cloud would
give and prints OK. The server's sandboxes are clients of its own sandpool runtime, so these also
cover snapshots of a sandpool server's sandboxes (the remote runtime).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from sandpool._grpc import endpoint
from sandpool._isolation import probe

from service_helpers import REPO, ServerProcess, wait_until
from test_cwsandbox_client import cwsandbox_client  # noqa: F401 (the fixture: installs the client)

pytestmark = pytest.mark.skipif(probe.unavailable("namespaces") is not None,
                                reason="snapshots and volumes need the namespaces level")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A ``sandpool serve --cwsandbox`` on loopback, with a volume store of its own; the client's env."""
    work = tmp_path_factory.mktemp("cwstate")
    port = _free_port()
    saved = os.environ.get("SANDPOOL_VOLUME_DIR")
    os.environ["SANDPOOL_VOLUME_DIR"] = str(work / "volumes")  # the server's (inherited) and this process's
    try:
        with ServerProcess(str(work), "--cwsandbox", f"127.0.0.1:{port}",
                           env={"SANDPOOL_IMAGE_FALLBACK": "host"}):
            key = wait_until(lambda: endpoint.token_for(f"127.0.0.1:{port}"), timeout=30)
            assert key, "the cwsandbox listener wrote no token"
            yield {"CWSANDBOX_BASE_URL": f"http://127.0.0.1:{port}", "CWSANDBOX_API_KEY": key,
                   "GRPC_VERBOSITY": "ERROR"}
    finally:
        if saved is None:
            os.environ.pop("SANDPOOL_VOLUME_DIR", None)
        else:
            os.environ["SANDPOOL_VOLUME_DIR"] = saved


def run_program(listener: dict[str, str], program: str, tmp_path) -> str:
    """Run ``program`` (dedented) in a fresh interpreter pointed at ``listener``; its stdout."""
    path = tmp_path / "program.py"
    path.write_text(textwrap.dedent(program))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SANDPOOL_ADDRESS", "SANDPOOL_TOKEN"))}
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**env, **listener})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_snapshot_restore_and_isolation_of_the_copies(cwsandbox_client, listener, tmp_path):  # noqa: F811
    """snapshot() of a running sandbox's scratch volume, restored into two new sandboxes: each sees the
    state at the snapshot, and changes flow neither from the source nor between the copies; the
    records are READY, listed by source, and gone once deleted."""
    out = run_program(listener, """
        import cwsandbox
        from cwsandbox import FileSystemSnapshotOptions, Sandbox, SnapshotNotFoundError

        def cat(sb):
            return sb.exec(["cat", "/workspace/state.txt"], check=True).result().stdout

        with Sandbox.run(file_system_snapshot=FileSystemSnapshotOptions(mount_path="/workspace")) as source:
            source.exec(["sh", "-c", "echo original > /workspace/state.txt"], check=True).result()
            snap = source.snapshot().result()
            source.exec(["sh", "-c", "echo changed-in-source > /workspace/state.txt"], check=True).result()
            restore = FileSystemSnapshotOptions(mount_path="/workspace", file_system_snapshot_id=snap)
            with Sandbox.run(file_system_snapshot=restore) as a, Sandbox.run(file_system_snapshot=restore) as b:
                assert cat(a) == "original\\n", cat(a)
                a.exec(["sh", "-c", "echo changed-in-a > /workspace/state.txt"], check=True).result()
                assert cat(b) == "original\\n", cat(b)
                assert cat(source) == "changed-in-source\\n"
            record = Sandbox.get_snapshot(snap).result()
            assert record.file_system_snapshot_id == snap and record.status.value == "ready", record
            assert record.source_sandbox_id == source.sandbox_id, record
            listed = Sandbox.list_snapshots(source_sandbox_id=source.sandbox_id).result()
            assert [s.file_system_snapshot_id for s in listed] == [snap], listed
        Sandbox.delete_snapshot(snap).result()
        try:
            Sandbox.get_snapshot(snap).result()
        except SnapshotNotFoundError:
            pass
        else:
            raise AssertionError("a deleted snapshot is still there")
        Sandbox.delete_snapshot(snap, missing_ok=True).result()
        print("OK")
    """, tmp_path)
    assert out.strip().endswith("OK")


def test_snapshot_on_stop_then_restore_after_the_source_is_gone(cwsandbox_client, listener, tmp_path):  # noqa: F811
    """stop(snapshot_on_stop=True) fills file_system_snapshot_id; a sandbox restored from it after the
    source has ended sees the source's last state."""
    out = run_program(listener, """
        from cwsandbox import FileSystemSnapshotOptions, Sandbox

        source = Sandbox.run(file_system_snapshot=FileSystemSnapshotOptions(mount_path="/workspace"))
        source.exec(["sh", "-c", "echo at-stop > /workspace/last.txt"], check=True).result()
        source.stop(snapshot_on_stop=True).result()
        snap = source.file_system_snapshot_id
        assert snap, "stop(snapshot_on_stop=True) reported no snapshot"
        restore = FileSystemSnapshotOptions(mount_path="/workspace", file_system_snapshot_id=snap)
        with Sandbox.run(file_system_snapshot=restore) as copy:
            assert copy.exec(["cat", "/workspace/last.txt"]).result().stdout == "at-stop\\n"
        assert Sandbox.get_snapshot(snap).result().trigger.value == "on_delete"
        Sandbox.delete_snapshot(snap).result()
        print("OK")
    """, tmp_path)
    assert out.strip().endswith("OK")


def test_registered_volume_shared_outlives_sandboxes_and_read_only_refuses(cwsandbox_client, listener,  # noqa: F811
                                                                         tmp_path):
    """RegisteredVolumeOptions(volume_id=NAME) mounts the server's named volume NAME: two sandboxes
    share it, what they wrote is there for a later one, and a read-only mount refuses writes."""
    from sandpool._isolation import volumes

    volumes.create("cwshared")
    try:
        out = run_program(listener, """
            from cwsandbox import RegisteredVolumeOptions, Sandbox

            def vol(read_only=False):
                return [RegisteredVolumeOptions(name="data", volume_id="cwshared", mount_path="/data",
                                                read_only=read_only)]

            with Sandbox.run(volumes=vol()) as a, Sandbox.run(volumes=vol()) as b:
                a.exec(["sh", "-c", "echo from-a > /data/note"], check=True).result()
                assert b.exec(["cat", "/data/note"]).result().stdout == "from-a\\n"
            with Sandbox.run(volumes=vol(read_only=True)) as later:
                assert later.exec(["cat", "/data/note"]).result().stdout == "from-a\\n"
                refused = later.exec(["sh", "-c", "echo x > /data/other"]).result()
                assert refused.returncode != 0 and "Read-only" in refused.stderr, refused
                assert later.exec(["echo", "still serving"]).result().stdout == "still serving\\n"
            print("OK")
        """, tmp_path)
        assert out.strip().endswith("OK")
        with open(os.path.join(volumes.data_dir("cwshared"), "note")) as f:
            assert f.read() == "from-a\n"
    finally:
        volumes.remove("cwshared")


def _spec(volumes: list, mounts: list) -> object:
    from sandpool._cwsandbox._proto import pb

    return pb.SandboxSpec(volumes=volumes, containers=[pb.Container(image="", volume_mounts=mounts)])


def test_volume_mapping_of_a_spec():
    """A registered volume becomes the named local volume at its mount; scratch volumes become
    directories made in the sandbox's filesystem, and one restored from a snapshot restores the
    sandbox from it."""
    from sandpool._cwsandbox._proto import pb
    from sandpool._cwsandbox._spec import sandbox_options, scratch_dirs

    spec = _spec([pb.SandboxVolume(name="ws", scratch=pb.ScratchVolume(restore_from_snapshot_id="snap-0123456789abcdef")),
                  pb.SandboxVolume(name="data", volume_id="datasets")],
                 [pb.VolumeMount(volume="ws", mount_path="/workspace"),
                  pb.VolumeMount(volume="data", mount_path="/data", read_only=True, sub_path="train")])
    options = sandbox_options(spec)
    assert options["restore_from_snapshot_id"] == "snap-0123456789abcdef"
    assert options["volumes"] == [{"name": "data", "volume_id": "datasets", "mount_path": "/data",
                                   "sub_path": "train", "read_only": True}]
    assert scratch_dirs(spec) == ["/workspace"]


@pytest.mark.parametrize(("volumes", "mounts", "says"), [
    ([], [("ghost", "/x", False)], "'ghost', which sandbox.spec.volumes does not have"),
    ([("d", "vol", "")], [], "has no volume_mount"),
    ([("s", "", "")], [("s", "/s", True)], "cannot be mounted read-only"),
    ([("a", "", "snap-0123456789abcdef"), ("b", "", "snap-fedcba9876543210")], [], "give one"),
    ([("s", "", "")], [("s", "/s", False), ("s", "/t", False)], "mounted twice"),
])
def test_volume_specs_that_cannot_map_are_refused_naming_the_fix(volumes, mounts, says):
    """Each volume spec that has no local meaning is INVALID_ARGUMENT naming the volume and the fix."""
    from sandpool._cwsandbox._errors import RpcFailure
    from sandpool._cwsandbox._proto import pb
    from sandpool._cwsandbox._spec import sandbox_options

    import grpc

    spec = _spec([pb.SandboxVolume(name=n, volume_id=v, **({"scratch": pb.ScratchVolume(
                      restore_from_snapshot_id=r)} if not v else {})) for n, v, r in volumes],
                 [pb.VolumeMount(volume=n, mount_path=p, read_only=ro) for n, p, ro in mounts])
    with pytest.raises(RpcFailure) as info:
        sandbox_options(spec)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and says in info.value.message
